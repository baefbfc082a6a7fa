# A Django site in one file, with a job: python hello.py (docs/one-file.md).
from django.http import JsonResponse
from django.urls import reverse

from twistedlrp import Router, serve
from twistedlrp.jobs import get, job, progress


@job
def count(to):  # runs in a worker process
    for i in range(1, to + 1):
        progress(i, to, f"counted to {i}")
    return to


def start(request, to):
    job_id = count.submit(to).id
    return JsonResponse({"job": job_id, "status": reverse("status", args=[job_id])})


def status(request, id):
    info = get(str(id))
    return JsonResponse({"state": info.state, "progress": info.progress._asdict()})


serve(Router(("count/<int:to>", start), ("jobs/<uuid:id>", status)))
