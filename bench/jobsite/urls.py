from django.urls import path

from jobsite import views

urlpatterns = [path("submit-many", views.submit_many)]
