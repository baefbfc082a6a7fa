import time

from django.http import HttpResponse
from django.shortcuts import render
from django.urls import path

from benchsite.models import Article


def hello(request):
    return HttpResponse(b"Hello, world!\n", content_type="text/plain")


def io(request):
    # Stands in for a view waiting on a database or an API.
    time.sleep(0.01)
    return HttpResponse(b"waited\n", content_type="text/plain")


def page(request):
    # What a site's page does: a query, a template with a base, filters and a loop.
    articles = Article.objects.order_by("-published")[:20]
    return render(request, "benchsite/page.html", {"articles": articles})


urlpatterns = [path("hello", hello), path("io", io), path("page", page)]
