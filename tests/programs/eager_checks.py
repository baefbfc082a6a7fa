"""
A site's own tests with LRP_JOBS_EAGER = True, as pytest runs them in a
project with Django set up (what pytest-django does; here override_settings
stands in for its `settings` fixture). tests/test_jobs_eager.py runs this
file in a pytest process of its own, with DJANGO_SETTINGS_MODULE set and no
job service anywhere: every job call is answered in the process.
"""

from __future__ import annotations

import threading
import time
import uuid

import django
import pytest

django.setup()

from django.test import override_settings  # noqa: E402

from twistedlrp import jobs  # noqa: E402
from twistedlrp.jobs import eager  # noqa: E402

RUNS: dict[str, int] = {}


@pytest.fixture(autouse=True)
def eager_jobs():
    with override_settings(LRP_JOBS_EAGER=True):
        yield
    eager.reset()


@jobs.job
def pair(a, b):
    RUNS["pair"] = RUNS.get("pair", 0) + 1
    return (a, b)


@jobs.job
def counted(n):
    for i in range(1, n + 1):
        jobs.progress(i, n, f"{i} of {n}")
    return {"cancelled": jobs.cancelled(), "thread": threading.current_thread().name}


@jobs.job(retries=2, retry_delay=60)
def flaky(key, failures):
    RUNS[key] = RUNS.get(key, 0) + 1
    if RUNS[key] <= failures:
        raise ConnectionError(f"attempt {RUNS[key]} fails")
    return RUNS[key]


@jobs.job
def broken():
    raise ValueError("this job fails on purpose")


@jobs.job
def gives_up():
    raise jobs.JobCancelled("not today")


@jobs.job
def not_json():
    return {1, 2}


@jobs.job
def parent(n):
    jobs.progress(1, 2, "before the child")
    child = counted.submit(n)
    return {
        "child": child.id,
        "child_state": child.state,
        "progress": list(jobs.get(child.id).progress),
    }


@jobs.job
def until_cancelled(seconds):
    deadline = time.monotonic() + seconds
    jobs.progress(0, None, "waiting")
    while not jobs.cancelled():
        if time.monotonic() > deadline:
            return "never cancelled"
        time.sleep(0.01)
    raise jobs.JobCancelled("cancelled by the test")


def test_submit_returns_the_finished_job_with_its_json_result():
    info = pair.submit(1, "b")
    assert info.finished and info.state == jobs.SUCCEEDED
    assert info.result == [1, "b"]  # a tuple comes back as a list, as from a worker
    assert info.attempts == 1 and info.max_attempts == 1
    assert info.created_at <= info.started_at <= info.finished_at
    again = jobs.get(info.id)
    assert again.result == [1, "b"] and again.args == [1, "b"] and again.kwargs == {}
    assert jobs.wait(info.id, timeout=1) == again
    assert [j.id for j in jobs.list_jobs(state=jobs.SUCCEEDED)] == [info.id]
    assert jobs.stats()["jobs"] == {"succeeded": 1}


def test_progress_is_recorded_and_cancelled_is_false():
    info = jobs.submit(counted.job_name, args=[3])
    assert info.progress == (3, 3, "3 of 3")
    assert info.result == {"cancelled": False, "thread": threading.current_thread().name}


def test_a_failing_job_is_failed_with_the_worker_error_text():
    info = broken.submit()
    assert info.state == jobs.FAILED and info.result is None
    assert info.error.startswith("ValueError: this job fails on purpose\n\n")
    assert 'raise ValueError("this job fails on purpose")' in info.error


def test_retries_run_at_once():
    key = str(uuid.uuid4())
    info = flaky.submit(key, 2)
    assert (info.state, info.attempts, info.max_attempts, info.result) == ("succeeded", 3, 3, 3)
    info = flaky.submit(key + "-always", 5)
    assert (info.state, info.attempts) == ("failed", 3)
    assert info.error.startswith("ConnectionError: attempt 3 fails")


def test_results_and_arguments_that_are_not_json():
    info = not_json.submit()
    assert info.state == jobs.FAILED
    assert info.error.startswith("the job's result is not JSON")
    with pytest.raises(jobs.InvalidArguments, match="job arguments must be JSON"):
        pair.submit(object(), 2)
    with pytest.raises(jobs.PayloadTooLarge, match="more than the job service's limit"):
        pair.submit("x" * (1024 * 1024), 2)
    with pytest.raises(jobs.NotRegistered, match="no job is registered under the name 'nope'"):
        jobs.submit("nope")
    with pytest.raises(jobs.InvalidArguments, match="priority"):
        jobs.submit(pair.job_name, args=[1, 2], priority="high")
    with pytest.raises(jobs.UnknownJob):
        jobs.get(str(uuid.uuid4()))


def test_a_job_that_raises_job_cancelled_is_cancelled():
    assert gives_up.submit().state == jobs.CANCELLED


def test_the_same_id_returns_the_same_job_and_runs_once():
    before = RUNS.get("pair", 0)
    job_id = str(uuid.uuid4())
    first = jobs.submit(pair.job_name, args=[1, 2], id=job_id)
    second = jobs.submit(pair.job_name, args=[1, 2], id=job_id)
    assert first.id == second.id == job_id and RUNS["pair"] == before + 1


def test_a_job_submitting_a_job_runs_both_in_this_thread():
    info = parent.submit(2)
    assert info.state == jobs.SUCCEEDED
    assert info.result["child_state"] == "succeeded"
    assert info.result["progress"] == [2, 2, "2 of 2"]
    # The child's reports went to the child, not to its parent.
    assert info.progress == (1, 2, "before the child")


def test_cancel_from_another_thread():
    answers = []
    thread = threading.Thread(target=lambda: answers.append(until_cancelled.submit(30)))
    thread.start()

    def running():
        found = jobs.list_jobs(state=jobs.RUNNING)
        return found[0] if found else None

    deadline = time.monotonic() + 10
    while (job := running()) is None:
        assert time.monotonic() < deadline, "the job never ran"
        time.sleep(0.01)
    assert jobs.get(job.id).progress.message == "waiting"
    jobs.cancel(job.id)
    assert jobs.wait(job.id, timeout=10).state == jobs.CANCELLED
    thread.join(10)
    assert answers[0].state == jobs.CANCELLED


def test_the_django_tasks_backend_runs_tasks_at_once_too():
    from testapp import tasks

    try:
        from django.tasks import TaskResultStatus, default_task_backend
    except ImportError:
        from django_tasks import TaskResultStatus, default_task_backend

    result = tasks.add.enqueue(2, 3)
    assert result.status == TaskResultStatus.SUCCESSFUL
    assert result.return_value["sum"] == 5
    assert default_task_backend.get_result(result.id).return_value["sum"] == 5
    failed = tasks.refuse.enqueue("no")
    assert failed.status == TaskResultStatus.FAILED
    assert failed.errors[0].exception_class_path == "testapp.tasks.TaskRefused"


def test_without_eager_mode_the_calls_go_to_a_job_service():
    with override_settings(LRP_JOBS_EAGER=False):
        # LRP_STATE_DIR names an empty directory: no service, a fast refusal.
        with pytest.raises(jobs.JobServiceUnavailable):
            pair.submit(1, 2)
