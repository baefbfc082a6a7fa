"""
A view that submits jobs one after another from inside the server process,
as a site's views do: through twistedlrp's job client (the service in the
same process) or through Celery's C{delay()} (to Redis), timing each.
"""

import time

from django.http import JsonResponse


def submit_many(request):
    first = int(request.GET.get("first", "0"))
    n = int(request.GET.get("n", "100"))
    if request.GET.get("system") == "celery":
        from jobsite.celery_app import noop as task

        def submit(i):
            return task.delay(i).id
    else:
        from jobsite.jobs import noop

        def submit(i):
            return noop.submit(i).id

    latencies, ids = [], []
    for i in range(first, first + n):
        started = time.perf_counter()
        ids.append(submit(i))
        latencies.append(time.perf_counter() - started)
    return JsonResponse({"latencies": latencies, "ids": ids})
