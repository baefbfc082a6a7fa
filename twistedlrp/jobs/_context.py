"""The running job, as seen from inside a worker child (one job at a time)."""

from __future__ import annotations

import threading

_cancel = threading.Event()
_reporter = None  # callable(current, total, message) set by the worker child
_job_id: str | None = None
# A cancel can arrive before its job's thread begins: remember it.
_cancel_early: set[str] = set()


def begin(job_id: str, reporter) -> None:
    global _reporter, _job_id
    _cancel.clear()
    _job_id = job_id
    _reporter = reporter
    if job_id in _cancel_early:
        _cancel_early.discard(job_id)
        _cancel.set()


def end() -> None:
    global _reporter, _job_id
    _reporter = None
    _job_id = None


def request_cancel(job_id: str) -> None:
    if job_id == _job_id:
        _cancel.set()
    else:
        _cancel_early.clear()  # only the next job can be meant
        _cancel_early.add(job_id)


def report_progress(current, total, message) -> None:
    reporter = _reporter
    if reporter is not None:
        reporter(current, total, message)


def is_cancelled() -> bool:
    return _reporter is not None and _cancel.is_set()


def current_job_id() -> str | None:
    return _job_id
