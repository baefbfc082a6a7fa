import json
import os
import threading
import time

from django.http import HttpResponse, JsonResponse, StreamingHttpResponse

from testapp.lrp import STATE


def hello(request):
    return HttpResponse(b"hello\n", content_type="text/plain")


def template_page(request):
    """testapp/page.html rendered, and the pid of the process that rendered it."""
    from django.template.loader import render_to_string

    return JsonResponse({"pid": os.getpid(), "text": render_to_string("testapp/page.html")})


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
        "wsgi.multiprocess",
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


# -- jobs -------------------------------------------------------------------


def jobs_api(request):
    """POST {"op": "submit"|"get"|"cancel"|"wait"|"stats", ...}: call twistedlrp.jobs."""
    import dataclasses

    from twistedlrp import jobs

    data = json.loads(request.body)
    op = data.pop("op")
    started = time.perf_counter()
    try:
        if op == "submit":
            if data.pop("non_json", False):
                data["args"] = [object()]
            result = jobs.submit(
                data["name"],
                data.get("args", ()),
                data.get("kwargs"),
                priority=data.get("priority"),
                run_after=data.get("run_after"),
                key=data.get("key"),
                timeout=data.get("timeout"),
                id=data.get("id"),
            )
        elif op == "add":
            from testapp.jobs import add

            result = add.submit(data["a"], data["b"])
        elif op == "get":
            result = jobs.get(data["id"])
        elif op == "cancel":
            result = jobs.cancel(data["id"])
        elif op == "wait":
            result = jobs.wait(data["id"], data.get("timeout", 30))
        elif op == "stats":
            return JsonResponse({"stats": jobs.stats()})
        elif op == "list":
            found = jobs.list_jobs(
                state=data.get("state"), name=data.get("name"), limit=data["limit"]
            )
            return JsonResponse({"jobs": [[j.id, j.name, j.state] for j in found]})
        else:
            return JsonResponse({"error": "BadOp"}, status=400)
    except (jobs.JobError, TimeoutError) as e:
        return JsonResponse({"error": type(e).__name__, "message": str(e)}, status=400)
    elapsed = time.perf_counter() - started
    info = dataclasses.asdict(result)
    for key in ("created_at", "started_at", "finished_at"):
        info[key] = info[key].isoformat() if info[key] else None
    return JsonResponse({"job": info, "elapsed": elapsed, "pid": os.getpid()})


class _RolledBack(Exception):
    pass


def txn_api(request):
    """
    POST {"then": "commit"|"rollback"|"savepoint_rollback", "hold": seconds,
    "join": bool, "key": ..., "id": ..., "task": bool}: inside
    transaction.atomic(), write a note, then submit testapp.jobs.read_note
    (or enqueue the read_note_task) for it, hold the transaction open for
    "hold" seconds, then end it as "then" says.
    @return: the note, the job's id and state as submit returned it, and
    how long the submission took.
    """
    from django.db import transaction

    from testapp.jobs import read_note
    from testapp.models import Note
    from twistedlrp import jobs

    data = json.loads(request.body)
    then = data.get("then", "commit")
    answer = {}
    if data.get("cancel"):
        # Cancel a job inside a transaction that writes first, then ends as "then" says.
        try:
            with transaction.atomic():
                Note.objects.create(text="cancelling")
                started = time.perf_counter()
                job = jobs.cancel(data["cancel"])
                answer["job"] = {"id": job.id, "state": job.state}
                answer["job"]["elapsed"] = time.perf_counter() - started
                if then == "rollback":
                    raise _RolledBack()
        except _RolledBack:
            pass
        return JsonResponse(answer)
    try:
        with transaction.atomic():
            note = Note.objects.create(text=data.get("text", "a note"))
            answer["note"] = note.id

            def submit():
                started = time.perf_counter()
                if data.get("task"):
                    from testapp.tasks import read_note_task

                    result = read_note_task.enqueue(note.id)
                    info = {"id": result.id, "state": str(result.status)}
                else:
                    job = jobs.submit(
                        read_note.job_name,
                        [note.id],
                        key=data.get("key"),
                        id=data.get("id"),
                        join_transaction=data.get("join", True),
                    )
                    info = {"id": job.id, "state": job.state}
                info["elapsed"] = time.perf_counter() - started
                return info

            if then == "savepoint_rollback":
                try:
                    with transaction.atomic():
                        answer["job"] = submit()
                        raise _RolledBack()
                except _RolledBack:
                    pass
            else:
                answer["job"] = submit()
            if data.get("marker"):
                with open(data["marker"], "w") as f:
                    f.write(answer["job"]["id"])
            if data.get("hold"):
                time.sleep(data["hold"])
            if then == "rollback":
                raise _RolledBack()
    except _RolledBack:
        pass
    except jobs.JobError as e:
        return JsonResponse({"error": type(e).__name__, "message": str(e)}, status=400)
    answer["committed"] = Note.objects.filter(id=answer["note"]).exists()
    return JsonResponse(answer)


def tasks_api(request):
    """
    POST {"op": "enqueue", "task": NAME, "args": [...], "delay": seconds} or
    {"op": "get", "id": ID}: django.tasks through TASKS["default"].
    """
    import datetime

    from django.utils import timezone

    from testapp import tasks

    data = json.loads(request.body)
    if data["op"] == "enqueue":
        task = stray_task if data["task"] == "stray" else getattr(tasks, data["task"])
        if data.get("delay"):
            task = task.using(run_after=timezone.now() + datetime.timedelta(seconds=data["delay"]))
        try:
            result = task.enqueue(*data.get("args", []))
        except Exception as e:
            return JsonResponse({"error": type(e).__name__, "message": str(e)}, status=400)
    else:
        result = tasks.add.get_backend().get_result(data["id"])
        result.refresh()
    info = {
        "id": result.id,
        "status": str(result.status),
        "task": result.task.module_path,
        "priority": result.task.priority,
        "errors": [
            {"exception_class_path": e.exception_class_path, "traceback": e.traceback}
            for e in result.errors
        ],
        "worker_ids": result.worker_ids,
        "attempts": result.attempts,
        "args": result.args,
        "kwargs": result.kwargs,
        "is_finished": result.is_finished,
        "pid": os.getpid(),
    }
    for key in ("enqueued_at", "started_at", "finished_at", "last_attempted_at"):
        value = getattr(result, key)
        info[key] = value.isoformat() if value else None
    if result.status == "SUCCESSFUL":
        info["return_value"] = result.return_value
    return JsonResponse(info)


def _stray(x):
    return x


def _task_decorator():
    try:
        from django.tasks import task
    except ImportError:
        from django_tasks import task
    return task


# A task outside the modules the job workers import: LRPBackend refuses it.
stray_task = _task_decorator()(_stray)


def service(request):
    from twistedlrp.lifecycle import get_service

    try:
        get_service("no-such-service")
    except LookupError as e:
        missing = str(e)
    return JsonResponse({"running": bool(get_service("recorder").running), "missing": missing})


# -- --web-workers: hooks of each kind, noted with the pid of the process ------
# (here rather than in lrp.py so that they note only when LRP_TEST_ONCE_EVENTS is set)


def _note_pid(kind):
    path = os.environ.get("LRP_TEST_ONCE_EVENTS")
    if path:
        with open(path, "a") as f:
            f.write(f"{kind} {os.getpid()}\n")


def _register_web_worker_hooks():
    from twistedlrp.lifecycle import on_shutdown, on_startup

    on_startup(once=True)(lambda: _note_pid("once-startup"))
    on_shutdown(once=True)(lambda: _note_pid("once-shutdown"))
    on_startup(lambda: _note_pid("each-startup"))
    on_shutdown(lambda: _note_pid("each-shutdown"))


_register_web_worker_hooks()


# -- the job progress widget ----------------------------------------------------


class _TestUser:
    """An authenticated user as far as the widget's token can tell."""

    is_authenticated = True

    def __init__(self, pk):
        self.pk = pk


def progress_page(request, job_id):
    """
    A page with the job's {% lrp_job_progress %}; ?user=N renders it for
    user N; ?bare=1 without the request in its context (only "user");
    ?no_urls=1 with a URLconf that lacks twistedlrp.urls.
    """
    from django.shortcuts import render
    from django.template.loader import render_to_string

    if request.GET.get("user"):
        request.user = _TestUser(request.GET["user"])
    if request.GET.get("no_urls"):
        # A site that forgot include("twistedlrp.urls"): the tag says so.
        import types

        from django.core.exceptions import ImproperlyConfigured
        from django.urls import set_urlconf

        urlconf = types.ModuleType("without_lrp_urls")
        urlconf.urlpatterns = []
        set_urlconf(urlconf)
        try:
            return render(request, "testapp/progress.html", {"job_id": job_id})
        except ImproperlyConfigured as e:
            return HttpResponse(str(e), status=500, content_type="text/plain")
        finally:
            set_urlconf(None)
    if request.GET.get("bare"):
        user = getattr(request, "user", None)
        page = render_to_string("testapp/progress.html", {"job_id": job_id, "user": user})
        return HttpResponse(page)
    return render(request, "testapp/progress.html", {"job_id": job_id})
