"""The running job, as seen from inside a worker child (one job at a time)."""

from __future__ import annotations

import threading

_cancel = threading.Event()
_reporter = None  # callable(current, total, message) set by the worker child
_job_id: str | None = None
# A cancel can arrive before its job's thread begins (only the next job can be meant).
_cancel_early: str | None = None
# The eager test mode (twistedlrp.jobs.eager) runs jobs in the threads that
# submit them, several at once and nested: each thread has its own job,
# (job_id, reporter, cancel event), which wins over the worker's above.
_local = threading.local()


def begin_local(job_id: str, reporter, cancel: threading.Event):
    """Make C{job_id} this thread's job; @return: the previous one, for L{end_local}."""
    previous = getattr(_local, "job", None)
    _local.job = (job_id, reporter, cancel)
    return previous


def end_local(previous) -> None:
    _local.job = previous


def begin(job_id: str, reporter) -> None:
    global _reporter, _job_id, _cancel_early
    _cancel.clear()
    _job_id, _reporter = job_id, reporter
    if job_id == _cancel_early:
        _cancel_early = None
        _cancel.set()


def end() -> None:
    global _reporter, _job_id
    _reporter = _job_id = None


def request_cancel(job_id: str) -> None:
    global _cancel_early
    if job_id == _job_id:
        _cancel.set()
    else:
        _cancel_early = job_id


def report_progress(current, total, message) -> None:
    local = getattr(_local, "job", None)
    reporter = local[1] if local else _reporter
    if reporter is not None:
        reporter(current, total, message)


def is_cancelled() -> bool:
    local = getattr(_local, "job", None)
    return local[2].is_set() if local else _reporter is not None and _cancel.is_set()


def current_job_id() -> str | None:
    local = getattr(_local, "job", None)
    return local[0] if local else _job_id
