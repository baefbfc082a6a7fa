import json
import os
import threading
import time

from django.http import HttpResponse, JsonResponse, StreamingHttpResponse

from testapp.lrp import STATE


def hello(request):
    return HttpResponse(b"hello\n", content_type="text/plain")


def sleep(request):
    seconds = float(request.GET.get("seconds", "1"))
    started = time.time()
    time.sleep(seconds)
    return JsonResponse(
        {"slept": seconds, "started": started, "thread": threading.current_thread().name}
    )


def hook(request):
    return JsonResponse({"value": STATE["value"], "hook_done_at": STATE["hook_done_at"]})


def environ(request):
    keys = [
        "REMOTE_ADDR",
        "wsgi.url_scheme",
        "SERVER_NAME",
        "SERVER_PORT",
        "PATH_INFO",
        "QUERY_STRING",
        "SCRIPT_NAME",
        "SERVER_PROTOCOL",
    ]
    data = {k: request.META.get(k) for k in keys}
    data["is_secure"] = request.is_secure()
    data["headers"] = {k: v for k, v in request.META.items() if k.startswith("HTTP_")}
    data["pid"] = os.getpid()
    return JsonResponse(data)


def body(request):
    data = request.body
    return JsonResponse({"length": len(data)})


def outbound(request):
    from twistedlrp import http

    url = request.GET["url"]
    count = int(request.GET.get("count", "1"))
    statuses = []
    for _ in range(count):
        response = http.get(url, timeout=10)
        statuses.append(response.status_code)
    return JsonResponse({"statuses": statuses, "last": response.text})


def stream(request):
    count = int(request.GET.get("count", "5"))

    def chunks():
        for i in range(count):
            yield f"chunk {i}\n".encode()

    return StreamingHttpResponse(chunks(), content_type="text/plain")


def error(request):
    raise RuntimeError("this view fails on purpose")


def db(request):
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("select 1")
        (one,) = cursor.fetchone()
    return HttpResponse(json.dumps({"one": one, "thread": threading.current_thread().name}))
