"""
Long-running jobs (docs/jobs.md): define them with L{job}, start them with
C{fn.submit(...)} or L{submit}, follow them with L{get} and L{wait}; inside a
job, L{progress} and L{cancelled}. Every call is thread-safe and blocks the
calling thread (never the reactor) for at most its timeout.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import time
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from twistedlrp.jobs import registry
from twistedlrp.jobs.client.transactions import outside_transaction
from twistedlrp.jobs.errors import (
    AuthenticationFailed,
    InvalidArguments,
    JobCancelled,
    JobError,
    JobServiceUnavailable,
    NotRegistered,
    PayloadTooLarge,
    UnknownJob,
)
from twistedlrp.jobs.protocol import arguments
from twistedlrp.jobs.states import CANCELLED, FAILED, FINISHED, QUEUED, RUNNING, SUCCEEDED
from twistedlrp.jobs.workers import context as _context

__all__ = [
    "job", "submit", "get", "cancel", "wait", "list_jobs", "stats", "outside_transaction",
    "progress", "cancelled", "JobInfo", "Progress", "JobError", "JobServiceUnavailable",
    "UnknownJob", "NotRegistered", "InvalidArguments", "PayloadTooLarge", "AuthenticationFailed",
    "JobCancelled", "QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED",
]  # fmt: skip


class Progress(NamedTuple):
    current: int
    total: int | None
    message: str


_TIMES = ("created_at", "started_at", "finished_at")


@dataclass(frozen=True)
class JobInfo:
    """What is known of a job at one moment."""

    id: str
    name: str
    state: str
    attempts: int
    progress: Progress
    result: Any
    error: str
    created_at: _dt.datetime | None
    started_at: _dt.datetime | None
    finished_at: _dt.datetime | None
    max_attempts: int = 1
    worker: str = ""
    output: str = ""
    args: list = field(default_factory=list)
    kwargs: dict = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        """@return: whether the job reached a final state."""
        return self.state in FINISHED

    @classmethod
    def from_dict(cls, data: dict) -> JobInfo:
        """@return: the L{JobInfo} of a job as the wire protocol describes it."""
        get = data.get
        times = {f: _dt.datetime.fromisoformat(get(f)) if get(f) else None for f in _TIMES}
        return cls(
            data["id"], data["name"], data["state"], get("attempts", 0),
            Progress(*get("progress", (0, None, ""))), get("result"), get("error") or "", **times,
            max_attempts=get("max_attempts", 1), worker=get("worker") or "",
            output=get("output") or "", args=list(get("args") or []),
            kwargs=dict(get("kwargs") or {}),
        )  # fmt: skip


def job(
    fn=None,
    *,
    schedule: str | None = None,
    name: str | None = None,
    timeout: float | None = None,
    retries: int = 0,
    retry_delay: float = 1.0,
    priority: int = 0,
    queue: str = "default",
    keep=None,
):
    """
    Register a module-level function as a job, bare (C{@job}) or with the options
    docs/jobs.md describes (C{@job(timeout=60, retries=2)}).
    @return: the function, with C{submit(*args, **kwargs)} and C{job_name} added.
    @raise InvalidArguments: an option of the wrong type or out of range.
    """
    arguments.check_seconds("timeout", timeout)
    arguments.check_priority(priority)
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise InvalidArguments(f"retries: expected a whole number of at least 0, got {retries!r}")
    if retry_delay != 0:
        arguments.check_seconds("retry_delay", retry_delay)
    if keep is not None:
        from twistedlrp.jobs.service import retention

        try:
            seconds = retention.parse_keep(keep, "keep")
        except ValueError as e:
            raise InvalidArguments(str(e)) from None
        keep = retention.FOREVER if seconds is None else seconds

    def register(function):
        definition = registry.JobDefinition(
            name=name or f"{function.__module__}.{function.__qualname__}",
            function=function,
            timeout=timeout,
            retries=retries,
            retry_delay=retry_delay,
            priority=priority,
            queue=queue,
            keep=keep,
        )
        registry.register(definition)

        @functools.wraps(submit)
        def submit_this(*args, **kwargs):
            return submit(definition.name, args, kwargs)

        submit_this.__doc__ = f"Submit {definition.name} as a job; return its L{{JobInfo}}."
        function.submit = submit_this
        function.job_name = definition.name
        if schedule is not None:
            from twistedlrp.jobs.service import schedules

            # A bad expression fails the import of the job's module, at start-up.
            schedules.declare(definition.name, schedule)
        return function

    return register(fn) if fn is not None else register


def submit(
    name: str,
    args=(),
    kwargs=None,
    *,
    priority: int | None = None,
    run_after: _dt.datetime | float | None = None,
    key: str | None = None,
    timeout: float | None = None,
    id: str | None = None,
    join_transaction: bool = True,
) -> JobInfo:
    """
    Store a job and queue it; inside C{transaction.atomic()}, as part of that
    transaction unless C{join_transaction=False} (docs/jobs.md).
    @return: the new job's L{JobInfo}, or that of the job C{id} (or C{key}) names.
    @raise JobError: L{NotRegistered}, L{InvalidArguments}, L{PayloadTooLarge} (nothing
        stored), or L{JobServiceUnavailable}.
    """
    if isinstance(run_after, _dt.datetime):
        if run_after.tzinfo is None:
            raise InvalidArguments("run_after: must be an aware datetime (or a Unix time)")
        run_after = run_after.timestamp()
    if not isinstance(args, list | tuple):
        raise InvalidArguments(f"args: expected a list or a tuple, got {type(args).__name__}")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise InvalidArguments(f"kwargs: expected a dict, got {type(kwargs).__name__}")
    # Its values are checked once, where it is stored (or before it is sent).
    with contextlib.nullcontext() if join_transaction else outside_transaction():
        answer = _call(
            "submit", name=name, args=list(args), kwargs=dict(kwargs or {}),
            priority=priority, run_after=run_after, key=key, timeout=timeout, id=id,
        )  # fmt: skip
    return JobInfo.from_dict(answer)


def _call(op: str, **kw):
    # Imported here: a worker imports this module, and no Twisted.
    from twistedlrp.jobs.client import calls

    return calls.call(op, **kw)


def get(job_id) -> JobInfo:
    """@return: the job's L{JobInfo}, live progress included. @raise UnknownJob: no such job."""
    return JobInfo.from_dict(_call("status", job_id=str(job_id)))


def cancel(job_id) -> JobInfo:
    """
    Cancel a job: a queued one never runs; a running one sees L{cancelled} return
    true, and is killed after a grace period (inside C{atomic()}, at the commit).
    @return: the job's L{JobInfo} after the request. @raise UnknownJob: no such job.
    """
    return JobInfo.from_dict(_call("cancel", job_id=str(job_id)))


def wait(job_id, timeout: float = 60.0) -> JobInfo:
    """
    @return: the job's final L{JobInfo}, once it finished (in several C{Wait}s if need be).
    @raise TimeoutError: not within C{timeout} seconds. @raise UnknownJob: no such job.
    """
    job_id = arguments.canonical_job_id(job_id)
    seconds = arguments.check_duration("timeout", timeout)
    deadline = time.monotonic() + seconds
    while True:
        step = min(max(deadline - time.monotonic(), 0.0), arguments.MAX_WAIT_TIMEOUT)
        info = JobInfo.from_dict(_call("wait", job_id=job_id, timeout=step, call_timeout=step + 10))
        if info.finished or time.monotonic() >= deadline:
            break
    if not info.finished:
        raise TimeoutError(f"job {job_id} did not finish within {timeout} s (it is {info.state})")
    return info


def list_jobs(state: str | None = None, name: str | None = None, limit: int = 100) -> list[JobInfo]:
    """@return: the newest jobs (without results or output), optionally filtered."""
    jobs = _call("list_jobs", state=state, name=name, limit=limit)["jobs"]
    return [JobInfo.from_dict(d) for d in jobs]


def stats() -> dict:
    """@return: the job service's counters: jobs by state, workers, throughput."""
    return _call("stats")


def progress(current: int, total: int | None = None, message: str = "") -> None:
    """Report the running job's progress (coalesced: call it often); outside a job, nothing."""
    # A message that UTF-8 cannot carry (a lone surrogate from a file name)
    # is mended, not dropped; a long one is cut.
    text = str(message)[:2000].encode("utf-8", "replace").decode("utf-8")
    _context.report_progress(int(current), None if total is None else int(total), text)


def cancelled() -> bool:
    """@return: whether cancellation of the running job was requested (C{False} outside a job)."""
    return _context.is_cancelled()
