"""The running job, as seen from inside a worker child (one job at a time)."""

from __future__ import annotations

import threading

_cancel = threading.Event()
# The worker's job: (job_id, reporter, cancel event); the reporter is
# callable(current, total, message), set by the worker child.
_NO_JOB = (None, None, _cancel)
_worker_job = _NO_JOB
# A cancel can arrive before its job's thread begins (only the next job can be meant).
_cancel_early: str | None = None
# The eager test mode (twistedlrp.jobs.eager) runs jobs in the threads that
# submit them, several at once and nested: each thread has its own job,
# which wins over the worker's.
_local = threading.local()


def _job() -> tuple:
    return getattr(_local, "job", None) or _worker_job


def begin_local(job_id: str, reporter, cancel: threading.Event):
    """Make C{job_id} this thread's job; @return: the previous one, for L{end_local}."""
    previous = getattr(_local, "job", None)
    _local.job = (job_id, reporter, cancel)
    return previous


def end_local(previous) -> None:
    _local.job = previous


def begin(job_id: str, reporter) -> None:
    global _worker_job, _cancel_early
    _cancel.clear()
    _worker_job = (job_id, reporter, _cancel)
    if job_id == _cancel_early:
        _cancel_early = None
        _cancel.set()


def end() -> None:
    global _worker_job
    _worker_job = _NO_JOB


def request_cancel(job_id: str) -> None:
    global _cancel_early
    if job_id == _worker_job[0]:
        _cancel.set()
    else:
        _cancel_early = job_id


def report_progress(current, total, message) -> None:
    reporter = _job()[1]
    if reporter is not None:
        reporter(current, total, message)


def is_cancelled() -> bool:
    _, reporter, cancel = _job()
    return reporter is not None and cancel.is_set()


def current_job_id() -> str | None:
    return _job()[0]
