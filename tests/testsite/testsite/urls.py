from django.urls import include, path

from testapp import views

urlpatterns = [
    path("", views.hello),
    path("hello", views.hello),
    path("template", views.template_page),
    path("sleep", views.sleep),
    path("hook", views.hook),
    path("environ", views.environ),
    path("body", views.body),
    path("outbound", views.outbound),
    path("stream", views.stream),
    path("error", views.error),
    path("db", views.db),
    path("service", views.service),
    path("jobs/api", views.jobs_api),
    path("tasks/api", views.tasks_api),
    path("txn/api", views.txn_api),
    path("progress/<uuid:job_id>", views.progress_page),
    path("lrp/", include("twistedlrp.urls")),
]
