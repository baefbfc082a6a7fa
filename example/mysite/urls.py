from django.contrib import admin
from django.urls import include, path

from demo import views

urlpatterns = [
    path("", views.home, name="home"),
    path("import", views.start_import, name="import"),
    path("jobs/<uuid:job_id>.json", views.job_status, name="job-status"),
    path("jobs/<uuid:job_id>/cancel", views.cancel_job, name="job-cancel"),
    # The progress widget's status and cancel views ({% lrp_job_progress %}).
    path("lrp/", include("twistedlrp.urls")),
    path("admin/", admin.site.urls),
]
