import time

from django.http import HttpResponse
from django.urls import path


def hello(request):
    return HttpResponse(b"Hello, world!\n", content_type="text/plain")


def io(request):
    # Stands in for a view waiting on a database or an API.
    time.sleep(0.01)
    return HttpResponse(b"waited\n", content_type="text/plain")


urlpatterns = [path("hello", hello), path("io", io)]
