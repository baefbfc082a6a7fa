# A Django site in one file, with a job: python hello.py (docs/one-file.md).
from django.http import JsonResponse

from twistedlrp import Router, serve
from twistedlrp.jobs import get, job, progress


@job
def count(to):  # runs in a worker process
    for i in range(1, to + 1):
        progress(i, to, f"counted to {i}")
    return to


def start(request, to):
    return JsonResponse({"job": count.submit(to).id})


def status(request, id):
    return JsonResponse(get(str(id)).progress._asdict())


serve(Router(("count/<int:to>", start), ("jobs/<uuid:id>", status)))
