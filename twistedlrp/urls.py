"""The progress widget's views: C{path("lrp/", include("twistedlrp.urls"))}."""

from django.urls import path

from twistedlrp import views

app_name = "twistedlrp"

urlpatterns = [
    path("jobs/<uuid:job_id>/status", views.job_status, name="job-status"),
    path("jobs/<uuid:job_id>/cancel", views.cancel_job, name="job-cancel"),
]
