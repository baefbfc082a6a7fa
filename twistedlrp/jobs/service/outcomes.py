"""How an attempt ended (L{Outcome}), recording it (L{Outcomes}), and the jobs' own log lines."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger, LogLevel

from twistedlrp import logs
from twistedlrp.jobs import registry
from twistedlrp.jobs.service.queue import JobRecord
from twistedlrp.jobs.states import CANCELLED, FAILED, QUEUED, SUCCEEDED
from twistedlrp.jobs.store import operations as ops
from twistedlrp.jobs.store import recovery

log = Logger()
# The jobs' own lines, for a log shipper to pick out.
_job_log = Logger(namespace="twistedlrp.jobs")


@dataclass(frozen=True)
class Outcome:
    """How one attempt ended, as its worker (or the eager mode) says."""

    ok: bool
    result: Any = None
    error: str = ""
    cancelled: bool = False

    @classmethod
    def read(cls, data: dict) -> Outcome:
        """@return: the outcome a worker sent as C{{"ok", "result", "error", "cancelled"}}."""
        get = data.get
        return cls(bool(get("ok")), get("result"), get("error") or "", bool(get("cancelled")))


class Outcomes:
    """
    Records how attempts end (a final state, or a retry after its delay), each
    committed before the job's waiters hear of it.
    @param requeue: C{(record, run_after)}: a retry is stored: queue it again.
    @param node: this node's name when several share the database (the
        store then changes only the jobs this node holds), or C{None}.
    """

    def __init__(self, reactor, store, count, requeue, cancel_grace: float, node=None):
        self.reactor, self.store, self.count, self.requeue = reactor, store, count, requeue
        self.cancel_grace = cancel_grace
        self.node_args = () if node is None else (node,)
        self.waiters: dict[str, list[defer.Deferred]] = {}

    def notify(self, info: dict) -> None:
        """Fire the waiters of the job C{info} describes, each with its own copy."""
        for i, d in enumerate(self.waiters.pop(info["id"], [])):
            fire(d, copy.deepcopy(info) if i else info)

    def fail_waiters(self, error: Exception) -> None:
        for d in [d for ds in self.waiters.values() for d in ds if not d.called]:
            d.errback(error)
        self.waiters.clear()

    def ended(self, record: JobRecord, outcome: Outcome, fields: dict) -> None:
        """C{record}'s attempt ended with C{outcome} (its worker's C{fields}): record it."""
        if outcome.ok:
            fields["result"] = outcome.result
        if outcome.ok and not record.cancel_requested:
            self.finish(record, SUCCEEDED, error="", **fields)
        elif record.cancel_requested or outcome.cancelled:
            detail = "" if outcome.ok or outcome.error == "cancelled" else f": {outcome.error}"
            self.finish(record, CANCELLED, error="cancelled while running" + detail, **fields)
        else:
            self.retry_or_fail(record, outcome.error or "failed", fields)

    def worker_died(self, record: JobRecord, worker, how: str) -> None:
        """The worker running C{record} ended (C{how}): requeue, retry, fail or cancel it."""
        job_id = record.id
        fields = {"output": worker.take_output(), "worker": worker.ident}
        reason = worker.kill_reason
        if reason == "shutdown":
            log.info("Job {job_id} interrupted by the shut-down: back in the queue", job_id=job_id)
            error = "interrupted by a server shut-down before it finished; it runs again"
            self.store.run(recovery.requeue, job_id, error, False, *self.node_args)
        elif reason == "timeout":
            error = f"timed out after {record.timeout:g} s: its worker process {worker.pid} was "
            error += f"killed ({how})"
            message = "Job {job_id}: worker {pid} killed: timeout after {timeout:g} s ({how})"
            log.warn(message, job_id=job_id, pid=worker.pid, timeout=record.timeout, how=how)
            self.retry_or_fail(record, error, fields)
        elif reason == "cancel" or record.cancel_requested:
            error = f"cancelled while running: its worker process {worker.pid} was stopped ({how})"
            message = "Job {job_id}: worker {pid} {how} after its cancellation was requested"
            if reason == "cancel":
                message = "Job {job_id}: worker {pid} killed: cancelled, did not stop within the "
                message += "grace period of {grace:g} s ({how})"
            log.warn(message, job_id=job_id, pid=worker.pid, grace=self.cancel_grace, how=how)
            self.finish(record, CANCELLED, error=error, **fields)
        else:
            error = f"the worker died: process {worker.pid} {how} while running the job"
            log.warn("Job {job_id}: {error}", job_id=job_id, error=error)
            self.retry_or_fail(record, error, fields)

    def retry_or_fail(self, record: JobRecord, error: str, fields: dict) -> None:
        """The attempt failed with C{error}: retry the job after its delay, or fail it."""
        if record.attempts >= record.max_attempts or self.store.closed:
            self.fail(record, error, self.reactor.seconds(), **fields)
            return
        delay = registry.retry_delay(record.retry_delay, record.attempts)
        now = self.reactor.seconds()  # Unix time, as run_after is
        run_after = now + delay
        self.count("retried", record.name)
        log_failed(record, error, now, retry_in=delay)
        fields = dict(fields, error=error, run_after=datetime.fromtimestamp(run_after, UTC))
        d = self.store.run(ops.finish, record.id, QUEUED, fields, False, *self.node_args)

        def stored(info):
            if info and info.get("lost"):
                log_lost(record)
            else:
                self.requeue(record.requeued(), run_after)

        d.addCallback(stored).addErrback(self._unrecorded, record)

    def fail(self, record: JobRecord, error: str, now: float | None = None, **fields) -> None:
        """C{record} failed for good with C{error}: log it (at WARNING), store it."""
        log_failed(record, error, now)
        self.finish(record, FAILED, error=error, **fields)

    def finish(self, record: JobRecord, state: str, **fields) -> None:
        """Log (L{fail} logs failures) and store C{record}'s final C{state}; tell its waiters."""
        self.count(state, record.name)
        if state != FAILED and logs.enabled(LogLevel.info):
            # As the jobs' own lines: not even built above INFO.
            duration = _duration(record, self.reactor.seconds())
            how = "succeeded in" if state == SUCCEEDED else "cancelled after"
            _log_info(record, f"{how} {duration or 0:.3f} s", duration=duration)
        self._store(record, state, fields).addErrback(self._unrecorded, record)

    def _store(self, record: JobRecord, state: str, fields: dict) -> defer.Deferred:
        # Read back only for a waiter; one that comes after the commit reads it finished.
        describe = record.id in self.waiters
        d = self.store.run(ops.finish, record.id, state, fields, describe, *self.node_args)
        return d.addCallback(self._finished, record)

    def _finished(self, info: dict | None, record: JobRecord) -> None:
        if info and info.get("lost"):
            log_lost(record)
        elif info:
            self.notify(info)
        elif record.id in self.waiters:
            # A waiter came during the commit: its read may have seen the job running.
            d = self.store.read(ops.get, record.id)
            d.addCallback(self.notify)
            d.addErrback(lambda f: log.failure("Reading job {job_id}", f, job_id=record.id))

    def _unrecorded(self, failure, record: JobRecord) -> None:
        # A value the database refuses: record the failure alone, not leave it running.
        log.failure("Could not record job {job_id}", failure, job_id=record.id)
        if self.store.closed:
            return
        error = f"the outcome of attempt {record.attempts} could not be stored: "
        error += failure.getErrorMessage()
        self._store(record, FAILED, {"error": error}).addErrback(
            lambda f: log.failure("Could not fail job {job_id}", f, job_id=record.id)
        )


def fire(d: defer.Deferred, value) -> None:
    """Fire C{d} with C{value} unless it fired already (a timeout, another answer)."""
    if not d.called:
        d.callback(value)


def log_lost(record: JobRecord) -> None:
    log.warn(
        "Job {job_id}: this job node no longer holds it (its lease expired and another "
        "node retried or failed the job): the outcome of attempt {attempt} is not recorded",
        job_id=record.id,
        attempt=record.attempts,
    )


# The jobs' own lines, one per start and end, with the job's name, id, attempt and
# duration as fields. INFO lines are not even built above INFO (they come per job).


def log_started(record: JobRecord, worker_pid) -> None:
    if logs.enabled(LogLevel.info):
        text = (
            f"started (attempt {record.attempts} of {record.max_attempts}) on worker {worker_pid}"
        )
        _log_info(record, text, attempts=record.max_attempts, worker=worker_pid)


def _log_info(record: JobRecord, text: str, **fields) -> None:
    name = record.name or "?"
    fields.update(name=name, job_id=record.id, attempt=record.attempts)
    _job_log.info("{log_text}", log_text=f"job {name} {record.id} {text}", **fields)


def log_failed(
    record: JobRecord, error: str, now: float | None, retry_in: float | None = None
) -> None:
    """The attempt failed: for good, or to be retried after C{retry_in} seconds."""
    duration = _duration(record, now)
    retrying = {} if retry_in is None else {"retry_in": retry_in}
    _job_log.warn(
        "job {name} {job_id} failed{took} (attempt {attempt} of {attempts})"
        + (", retrying in {retry_in:.1f} s" if retrying else "")
        + ": {error}",
        name=record.name or "?",
        job_id=record.id,
        attempt=record.attempts,
        attempts=record.max_attempts,
        duration=duration,
        took=f" in {duration:.3f} s" if duration is not None else "",
        error=error_line(error),
        **retrying,
    )


def error_line(error: str) -> str:
    """@return: C{error}'s last line (a traceback's exception), at most 300 characters."""
    lines = [line for line in error.strip().splitlines() if line.strip()]
    return (lines[-1].strip() if lines else "failed")[:300]


def _duration(record: JobRecord, now: float | None) -> float | None:
    if now is None or record.started is None:
        return None
    return round(max(now - record.started, 0.0), 6)
