"""
Long-running jobs (docs/jobs.md): define them with L{job}, start them with
C{fn.submit(...)} or L{submit}, follow them with L{get} and L{wait}; inside
a job, L{progress} and L{cancelled}. Every call is thread-safe and blocks
the calling thread (never the reactor) for at most its timeout, in the
server's views and in any other process with Django set up.
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
        times = {f: _parse_time(get(f)) for f in ("created_at", "started_at", "finished_at")}
        return cls(
            data["id"], data["name"], data["state"], get("attempts", 0),
            Progress(*get("progress", (0, None, ""))), get("result"), get("error") or "", **times,
            max_attempts=get("max_attempts", 1), worker=get("worker") or "",
            output=get("output") or "", args=list(get("args") or []),
            kwargs=dict(get("kwargs") or {}),
        )  # fmt: skip


def _parse_time(value):
    return _dt.datetime.fromisoformat(value) if value else None


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
    Register a module-level function as a job. Use bare (C{@job}) or with
    options (C{@job(timeout=60, retries=2)}).

    @param schedule: a cron expression (5 fields, or 6 with seconds first)
        in C{settings.TIME_ZONE}: the job also runs by itself, without
        arguments, at each time it names (docs/jobs.md, "Periodic jobs").
    @param name: the registered name [default: C{module.qualname}].
    @param timeout: seconds an attempt may run before its process is killed.
    @param retries: extra attempts after a failure (a crash or timeout too).
    @param retry_delay: seconds before the first retry; doubles each time, with jitter.
    @param priority: higher runs first.
    @param keep: how long its finished jobs are kept: seconds, a
        C{timedelta}, a string such as C{"2d"}, or C{"forever"}
        [default: C{settings.LRP_JOBS_KEEP}].
    @return: the function, unchanged, with C{submit(*args, **kwargs)} added
        (it returns a L{JobInfo}) and C{job_name}.
    """

    arguments.check_seconds("timeout", timeout)
    arguments.check_priority(priority)
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise InvalidArguments(f"retries: expected a whole number of at least 0, got {retries!r}")
    if retry_delay != 0:
        arguments.check_seconds("retry_delay", retry_delay)
    keep = _checked_keep(keep)

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


def _checked_keep(keep):
    """@return: C{keep} as seconds, C{"forever"} or C{None}; @raise InvalidArguments: not a keep."""
    from twistedlrp.jobs.service import retention

    if keep is None:
        return None
    try:
        seconds = retention.parse_keep(keep, "keep")
    except ValueError as e:
        raise InvalidArguments(str(e)) from None
    return retention.FOREVER if seconds is None else seconds


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
    Store a job and queue it; inside C{transaction.atomic()}, as part of
    that transaction (docs/jobs.md, "Jobs and transactions"). After
    L{JobServiceUnavailable}, submit again with the same C{id} (or C{key}):
    the job stored the first time, if any, is returned instead of a second one.

    @param run_after: an aware datetime or a Unix time before which it does not start.
    @param key: if an unfinished job has this key, return that job instead.
    @param timeout: seconds per attempt, overriding the registered one.
    @param id: a UUID chosen by the caller (C{uuid.uuid4()}); if a job has
        it already, that job is returned.
    @param join_transaction: C{False}: store it through the job service at
        once, whatever becomes of the caller's transaction (a job that must
        run even if the request fails); see L{outside_transaction}.
    @return: the new (or existing, see C{key} and C{id}) job's L{JobInfo}.
    @raise NotRegistered: no job is registered under C{name}.
    @raise InvalidArguments: the arguments are not JSON, or another value
        is of the wrong type or out of range (the message names it).
    @raise PayloadTooLarge: the encoded arguments exceed C{--max-job-payload}.
    @raise JobServiceUnavailable: the job service cannot be reached in time.
    """
    if isinstance(run_after, _dt.datetime):
        if run_after.tzinfo is None:
            raise InvalidArguments("run_after: must be an aware datetime (or a Unix time)")
        run_after = run_after.timestamp()
    if isinstance(args, str | bytes | dict) or not isinstance(args, list | tuple):
        raise InvalidArguments(f"args: expected a list or a tuple, got {type(args).__name__}")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise InvalidArguments(f"kwargs: expected a dict, got {type(kwargs).__name__}")
    # Its values are checked once, where it is stored (or before it is sent).
    with contextlib.nullcontext() if join_transaction else outside_transaction():
        return _call(
            "submit", name=name, args=list(args), kwargs=dict(kwargs or {}),
            priority=priority, run_after=run_after, key=key, timeout=timeout, id=id,
        )  # fmt: skip


def _call(op: str, **kw) -> JobInfo:
    """@return: the L{JobInfo} the job service answers to C{op}."""
    # Imported here: a worker imports this module, and no Twisted.
    from twistedlrp.jobs.client import calls

    return JobInfo.from_dict(calls.call(op, **kw))


def get(job_id) -> JobInfo:
    """
    @return: the job's L{JobInfo}, with live progress while it runs.
    @raise UnknownJob: no job has this id.
    @raise JobServiceUnavailable: the job service cannot be reached in time.
    """
    return _call("status", job_id=str(job_id))


def cancel(job_id) -> JobInfo:
    """
    Cancel a job: a queued one never runs; a running one sees L{cancelled}
    return true, and is killed after a grace period. Inside
    C{transaction.atomic()} it takes effect when the transaction commits.

    @return: the job's L{JobInfo} after the request.
    @raise UnknownJob: no job has this id.
    """
    return _call("cancel", job_id=str(job_id))


def wait(job_id, timeout: float = 60.0) -> JobInfo:
    """
    Wait until the job finishes (succeeded, failed or cancelled).

    @param timeout: seconds (0 or more); longer than the job service's
        longest C{Wait} (L{arguments.MAX_WAIT_TIMEOUT}), it is waited in
        several calls.
    @return: its final L{JobInfo}.
    @raise TimeoutError: it did not finish within C{timeout} seconds.
    @raise UnknownJob: no job has this id.
    @raise InvalidArguments: C{timeout} is not a finite number of 0 or more.
    """
    job_id = arguments.canonical_job_id(job_id)
    seconds = arguments.check_duration("timeout", timeout)
    deadline = time.monotonic() + seconds
    while True:
        step = min(max(deadline - time.monotonic(), 0.0), arguments.MAX_WAIT_TIMEOUT)
        info = _call("wait", job_id=job_id, timeout=step, call_timeout=step + 10)
        if info.finished or time.monotonic() >= deadline:
            break
    if not info.finished:
        raise TimeoutError(f"job {job_id} did not finish within {timeout} s (it is {info.state})")
    return info


def list_jobs(state: str | None = None, name: str | None = None, limit: int = 100) -> list[JobInfo]:
    """@return: the newest jobs (without results or output), optionally filtered."""
    from twistedlrp.jobs.client import calls

    jobs = calls.call("list_jobs", state=state, name=name, limit=limit)["jobs"]
    return [JobInfo.from_dict(d) for d in jobs]


def stats() -> dict:
    """@return: the job service's counters: jobs by state, workers, throughput."""
    from twistedlrp.jobs.client import calls

    return calls.call("stats")


def progress(current: int, total: int | None = None, message: str = "") -> None:
    """
    Report the running job's progress (cheap: call it as often as you like;
    the store coalesces updates). Outside a job it does nothing.
    """
    # A message that UTF-8 cannot carry (a lone surrogate from a file name)
    # is mended, not dropped; a long one is cut.
    text = str(message)[:2000].encode("utf-8", "replace").decode("utf-8")
    _context.report_progress(int(current), None if total is None else int(total), text)


def cancelled() -> bool:
    """@return: whether cancellation of the running job was requested (C{False} outside a job)."""
    return _context.is_cancelled()
