"""
django.tasks through twistedlrp.tasks.LRPBackend (Django 6's django.tasks,
or the django-tasks backport on Django 5.2), against a real server: tasks
enqueued from a view and from another process run in worker processes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime

import pytest
from jobsupport import api, make_template_db, start_server

from support import HERE, TESTSITE, request, wait_for


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tasks")
    server = start_server(make_template_db(tmp), tmp / "server")
    yield server
    server.kill()


def tasks_api(server, **data) -> dict:
    response = request(server.port, "/tasks/api", method="POST", body=json.dumps(data).encode())
    assert response.status == 200, response.text
    return response.json()


def finished(server, result_id: str, timeout: float = 30) -> dict:
    """Poll get_result() + refresh() in the server until the task is finished."""

    def check():
        info = tasks_api(server, op="get", id=result_id)
        return info if info["is_finished"] else None

    return wait_for(check, timeout, interval=0.05, message=f"task {result_id} finished")


def test_a_task_reaches_successful_with_its_return_value(server):
    enqueued = tasks_api(server, op="enqueue", task="add", args=[2, 3])
    assert enqueued["status"] in ("READY", "RUNNING", "SUCCESSFUL"), enqueued
    assert enqueued["task"] == "testapp.tasks.add"
    info = finished(server, enqueued["id"])
    assert info["status"] == "SUCCESSFUL", info
    assert info["return_value"]["sum"] == 5
    # It ran in a worker process, not in the server.
    assert info["return_value"]["pid"] != server.proc.pid
    assert info["worker_ids"] and all(info["worker_ids"]) and info["attempts"] == 1
    assert info["errors"] == []
    # get_result() in a fresh call knows the arguments from the job store.
    assert info["args"] == [2, 3] and info["kwargs"] == {}
    enqueued_at, started_at, finished_at = (
        datetime.fromisoformat(info[k]) for k in ("enqueued_at", "started_at", "finished_at")
    )
    assert enqueued_at <= started_at <= finished_at
    assert info["last_attempted_at"] == info["started_at"]
    # The same job, seen through the job service's own API.
    job = api(server, "get", id=enqueued["id"])["job"]
    assert job["name"] == "testapp.tasks.add" and job["state"] == "succeeded"


def test_a_failing_task_is_failed_with_its_exception_class_path(server):
    info = finished(server, tasks_api(server, op="enqueue", task="refuse", args=["no"])["id"])
    assert info["status"] == "FAILED", info
    [error] = info["errors"]
    assert error["exception_class_path"] == "testapp.tasks.TaskRefused"
    assert "raise TaskRefused(reason)" in error["traceback"]
    info = finished(server, tasks_api(server, op="enqueue", task="divide", args=[1, 0])["id"])
    assert info["status"] == "FAILED"
    assert info["errors"][0]["exception_class_path"] == "builtins.ZeroDivisionError"
    assert "return_value" not in info


def test_a_task_defined_in_a_views_module_runs_in_a_worker(server):
    # Not a "tasks" or "jobs" module: the server registered it when the
    # URLconf imported the views, and its workers import what it registered.
    enqueued = tasks_api(server, op="enqueue", task="stray", args=[41])
    assert enqueued["task"] == "testapp.views._stray"
    info = finished(server, enqueued["id"])
    assert info["status"] == "SUCCESSFUL", info
    assert info["return_value"] == 41
    assert info["worker_ids"] and all(info["worker_ids"])


def test_priority_and_run_after(server):
    enqueued = tasks_api(server, op="enqueue", task="pair", args=[1, "b"], delay=1.0)
    assert enqueued["priority"] == 7
    assert enqueued["status"] == "READY"
    job = api(server, "get", id=enqueued["id"])["job"]
    assert job["state"] == "queued"
    info = finished(server, enqueued["id"])
    assert info["status"] == "SUCCESSFUL" and info["return_value"] == [1, "b"]
    assert info["priority"] == 7
    run_after = datetime.fromisoformat(enqueued["enqueued_at"]).timestamp() + 1.0
    assert datetime.fromisoformat(info["started_at"]).timestamp() >= run_after - 0.05


def test_a_cancelled_task_is_failed(server):
    enqueued = tasks_api(server, op="enqueue", task="add", args=[1, 1], delay=60)
    api(server, "cancel", id=enqueued["id"])
    info = tasks_api(server, op="get", id=enqueued["id"])
    assert info["status"] == "FAILED" and info["is_finished"]
    assert info["errors"][0]["exception_class_path"] == "twistedlrp.jobs.errors.JobCancelled"


def test_another_process_enqueues_refreshes_and_uses_the_async_api(server):
    env = dict(
        os.environ,
        DJANGO_SETTINGS_MODULE="testsite.settings",
        LRP_TEST_DB=server.env["LRP_TEST_DB"],
        LRP_STATE_DIR=str(server.tmp / "state"),
        PYTHONPATH=str(TESTSITE),
    )
    done = subprocess.run(
        [sys.executable, str(HERE / "programs" / "tasks_client.py"), "40"],
        env=env,
        cwd=TESTSITE,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr + done.stdout
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["backend"] == "twistedlrp.tasks"
    assert out["enqueued_status"] in ("READY", "RUNNING", "SUCCESSFUL")
    assert out["add"]["status"] == out["successful"] == "SUCCESSFUL"
    assert out["add"]["return_value"]["sum"] == 5 and out["add"]["worker_ids"]
    assert out["get_result_same"] is True
    assert out["attempt"]["status"] == "SUCCESSFUL"
    assert out["attempt"]["return_value"] == {"attempt": 1, "id": out["attempt"]["id"], "tag": "t"}
    assert out["async"] == {"status": "SUCCESSFUL", "return_value": 42}
    assert out["unknown"] == "TaskResultDoesNotExist"
    # A task registered in the client only is refused by the job service,
    # which names what it can run: what its start-up log listed.
    kind, message = out["client_only"]
    assert kind == "NotRegistered", message
    assert "'client_only_tasks.client_only'" in message
    [ready] = [line for line in server.output().splitlines() if "Job service ready" in line]
    listed = set(ready.split("jobs: ", 1)[1].split(", "))
    assert "testapp.views._stray" in listed and "testapp.tasks.add" in listed
    registered = message.split("registered: ", 1)[1].split(" (jobs are", 1)[0].split(", ")
    assert registered and set(registered) <= listed, (registered, listed)
    status, error = out["client_only_in_transaction"]
    assert status == out["failed"], error
    assert "in this job service, no job is registered under the name 'client_only_tasks" in error
