"""
A process with Django set up (not the server) using LRPBackend:
enqueue, refresh() until finished, aenqueue/aget_result, an unknown id.
Prints one JSON line. Argument: the seconds it may wait in all.
"""

import asyncio
import json
import sys
import time

import django

django.setup()

from testapp import tasks  # noqa: E402

try:
    from django.tasks import TaskResultStatus, default_task_backend
    from django.tasks.exceptions import TaskResultDoesNotExist
except ImportError:
    from django_tasks import TaskResultStatus, default_task_backend
    from django_tasks.exceptions import TaskResultDoesNotExist


def finish(result, deadline):
    while not result.is_finished:
        if time.monotonic() > deadline:
            raise SystemExit(f"task {result.id} still {result.status}")
        time.sleep(0.02)
        result.refresh()
    return result


async def use_async(deadline):
    result = await tasks.async_double.aenqueue(21)
    while not result.is_finished and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
        result = await default_task_backend.aget_result(result.id)
    return result


def main():
    deadline = time.monotonic() + float(sys.argv[1])
    out = {"backend": type(tasks.add.get_backend()).__module__}
    result = tasks.add.enqueue(2, 3)
    out["enqueued_status"] = str(result.status)
    finish(result, deadline)
    out["add"] = {
        "status": str(result.status),
        "return_value": result.return_value,
        "worker_ids": result.worker_ids,
    }
    got = tasks.add.get_result(result.id)
    out["get_result_same"] = got.id == result.id and got.return_value == result.return_value
    result = finish(tasks.attempt.enqueue("t"), deadline)
    out["attempt"] = {
        "status": str(result.status),
        "return_value": result.return_value,
        "id": result.id,
    }
    result = asyncio.run(use_async(deadline))
    out["async"] = {
        "status": str(result.status),
        "return_value": result.return_value if result.is_finished else None,
    }
    try:
        default_task_backend.get_result("00000000-0000-0000-0000-000000000000")
    except TaskResultDoesNotExist:
        out["unknown"] = "TaskResultDoesNotExist"
    # Registered here only: the job service, which never imported its
    # module, refuses it (no worker could run it).
    import client_only_tasks

    from twistedlrp.jobs import JobError

    try:
        client_only_tasks.client_only.enqueue(1)
    except JobError as e:
        out["client_only"] = [type(e).__name__, str(e)]
    # Inside a transaction it is stored without the job service (which
    # cannot refuse it then): it fails when the service would run it.
    from django.db import transaction

    with transaction.atomic():
        result = client_only_tasks.client_only.enqueue(2)
    result = finish(result, deadline)
    out["client_only_in_transaction"] = [str(result.status), result.errors[0].traceback]
    out["successful"] = str(TaskResultStatus.SUCCESSFUL)
    out["failed"] = str(TaskResultStatus.FAILED)
    sys.stdout.write(json.dumps(out) + "\n")


main()
