"""
Recording the end of an attempt: a final state, or a retry after its delay
(L{Outcomes}, part of L{twistedlrp.jobs.service.dispatch.Dispatcher}), each
committed before waiters hear of it, including what the death of a worker
means for its job (shut-down, timeout, cancel or crash); and the job's log
lines.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from twisted.logger import Logger, LogLevel

from twistedlrp import logs
from twistedlrp.jobs import registry
from twistedlrp.jobs.errors import InvalidArguments, NotRegistered
from twistedlrp.jobs.protocol.arguments import check_priority, check_seconds
from twistedlrp.jobs.service.queue import JobRecord
from twistedlrp.jobs.states import CANCELLED, FAILED, QUEUED, SUCCEEDED
from twistedlrp.jobs.store import operations as ops
from twistedlrp.jobs.store import recovery

log = Logger()
# The jobs' own lines (L{JobLines}), for a log shipper to pick out.
_job_log = Logger(namespace="twistedlrp.jobs")


@dataclass(frozen=True)
class Outcome:
    """
    How one attempt of a job ended, as its worker (or the eager mode) says:
    it returned C{result}, or it failed with C{error}, C{cancelled} when it
    stopped because its cancellation was asked. A worker sends it as the
    JSON object of L{twistedlrp.jobs.protocol.wire.RunJob}'s answer (L{read}).
    """

    ok: bool
    result: Any = None
    error: str = ""
    cancelled: bool = False

    @classmethod
    def read(cls, data: dict) -> Outcome:
        """@return: the outcome a worker sent as C{{"ok", "result", "error", "cancelled"}}."""
        return cls(
            bool(data.get("ok")),
            data.get("result"),
            data.get("error") or "",
            bool(data.get("cancelled")),
        )

    def final_state(self, cancel_requested: bool = False) -> tuple[str | None, str]:
        """
        @return: the job's final state and error after this attempt:
            C{SUCCEEDED}, C{CANCELLED}, or C{None} when it failed (retried
            or failed by the job's policy).
        """
        if self.ok and not cancel_requested:
            return SUCCEEDED, ""
        if cancel_requested or self.cancelled:
            detail = "" if self.ok or self.error == "cancelled" else f": {self.error}"
            return CANCELLED, "cancelled while running" + detail
        return None, self.error or "failed"


class Outcomes:
    """
    The dispatcher's recording of outcomes, and what a worker's death
    means for its job (L{_worker_died}). It uses the dispatcher's
    C{reactor}, C{store}, C{count}, C{accepting}, C{node}, C{running},
    C{cancel_grace}, C{enqueue}, C{_forget}, C{_waiting} and C{_notify}.
    """

    def _worker_died(self, worker, job_id: str, how: str) -> None:
        record = self.running.get(job_id)
        if record is None:
            return
        self._forget(record)
        fields = {"output": worker.take_output(), "worker": worker.ident}
        reason = worker.kill_reason
        if reason == "shutdown":
            log.info("Job {job_id} interrupted by the shut-down: back in the queue", job_id=job_id)
            self.store.run(
                recovery.requeue,
                job_id,
                "interrupted by a server shut-down before it finished; it runs again",
                False,
                *self._node_args(),
            )
        elif reason == "timeout":
            error = (
                f"timed out after {record.timeout:g} s: its worker process {worker.pid} was "
                f"killed ({how})"
            )
            log.warn(
                "Job {job_id}: worker {pid} killed: timeout after {timeout:g} s ({how})",
                job_id=job_id,
                pid=worker.pid,
                timeout=record.timeout,
                how=how,
            )
            self._retry_or_fail(record, error, fields)
        elif reason == "cancel" or record.cancel_requested:
            error = f"cancelled while running: its worker process {worker.pid} was stopped ({how})"
            if reason == "cancel":
                log.warn(
                    "Job {job_id}: worker {pid} killed: cancelled, did not stop within the "
                    "grace period of {grace:g} s ({how})",
                    job_id=job_id,
                    pid=worker.pid,
                    grace=self.cancel_grace,
                    how=how,
                )
            else:
                log.warn(
                    "Job {job_id}: worker {pid} {how} after its cancellation was requested",
                    job_id=job_id,
                    pid=worker.pid,
                    how=how,
                )
            job_lines.cancelled(record, self.reactor.seconds())
            self._finish(record, CANCELLED, error=error, **fields)
        else:
            error = f"the worker died: process {worker.pid} {how} while running the job"
            log.warn("Job {job_id}: {error}", job_id=job_id, error=error)
            self._retry_or_fail(record, error, fields)

    def _retry_or_fail(self, record: JobRecord, error: str, fields: dict) -> None:
        if record.attempts >= record.max_attempts or self.store.closed:
            log_failed(record, error, self.reactor.seconds())
            self._finish(record, FAILED, error=error, **fields)
            return
        delay = registry.retry_delay(record.retry_delay, record.attempts)
        # The reactor's clock is Unix time, as run_after is.
        run_after = self.reactor.seconds() + delay
        self.count("retried", record.name)
        job_lines.failed(record, error, self.reactor.seconds(), retry_in=delay)
        d = self.store.run(
            ops.finish,
            record.id,
            QUEUED,
            dict(fields, error=error, run_after=datetime.fromtimestamp(run_after, UTC)),
            False,
            *self._node_args(),
        )

        def queued(info):
            if info and info.get("lost"):
                log_lost(record)
            elif self.accepting:
                self.enqueue(record.requeued(), run_after)

        d.addCallback(queued)
        d.addErrback(self._unrecorded, record)

    def _finish(self, record: JobRecord, state: str, **fields) -> None:
        self.count(state, record.name)
        # Read the job back only when someone waits for it; a waiter that
        # comes after the commit reads it finished.
        d = self.store.run(
            ops.finish, record.id, state, fields, self._waiting(record.id), *self._node_args()
        )
        d.addCallback(self._finished, record)
        d.addErrback(self._unrecorded, record)

    def _finished(self, info: dict | None, record: JobRecord) -> None:
        if info and info.get("lost"):
            log_lost(record)
        elif info:
            self._notify(info)
        elif self._waiting(record.id):
            # A waiter came while the end was being committed: its own read
            # (which does not wait for the store's writes) may have seen the
            # job still running. Tell it now.
            d = self.store.read(ops.get, record.id)
            d.addCallback(self._notify)
            d.addErrback(lambda f: log.failure("Reading job {job_id}", f, job_id=record.id))

    def _unrecorded(self, failure, record: JobRecord) -> None:
        """
        The end of an attempt could not be stored (a value the database
        refuses): record the failure alone rather than leave the job C{running}.
        """
        log.failure("Could not record job {job_id}", failure, job_id=record.id)
        if self.store.closed:
            return
        error = f"the outcome of attempt {record.attempts} could not be stored: "
        error += failure.getErrorMessage()
        d = self.store.run(
            ops.finish,
            record.id,
            FAILED,
            {"error": error},
            self._waiting(record.id),
            *self._node_args(),
        )
        d.addCallback(self._finished, record)
        d.addErrback(lambda f: log.failure("Could not fail job {job_id}", f, job_id=record.id))


def check_record(record: JobRecord) -> None:
    """
    @raise InvalidArguments: the job holds a value it cannot run with (an
        old or foreign row), or no job of its name is registered in this
        job service (one stored through a site's transaction where it was
        registered, which this service never imported).
    """
    if registry.lookup(record.name) is None:
        try:
            registry.require(record.name)
        except NotRegistered as e:
            raise InvalidArguments(f"in this job service, {e}") from None
    check_seconds("timeout", record.timeout)
    if record.retry_delay:
        check_seconds("retry_delay", record.retry_delay)
    check_priority(record.priority)


def log_lost(record: JobRecord) -> None:
    log.warn(
        "Job {job_id}: this job node no longer holds it (its lease expired and another "
        "node retried or failed the job): the outcome of attempt {attempt} is not recorded",
        job_id=record.id,
        attempt=record.attempts,
    )


def log_failed(record: JobRecord, error: str, now: float | None = None) -> None:
    """Log that C{record} failed for good (at WARNING; see L{JobLines})."""
    job_lines.failed(record, error, now)


class JobLines:
    """
    One line per job start (INFO) and end: succeeded or cancelled at INFO,
    failed or retrying at WARNING, each with the job's name, id, attempt
    and duration as fields (C{job_id}, C{name}, C{attempt}, C{attempts},
    C{duration}; C{worker}, C{error}, C{retry_in}), under the namespace
    C{twistedlrp.jobs}. INFO lines are not even built when the log's level
    is above INFO (they come with every job).
    """

    def started(self, record: JobRecord, worker_pid) -> None:
        if logs.enabled(LogLevel.info):
            name = record.name or "?"
            _job_log.info(
                "{log_text}",
                log_text=f"job {name} {record.id} started (attempt {record.attempts} of "
                f"{record.max_attempts}) on worker {worker_pid}",
                name=name,
                job_id=record.id,
                attempt=record.attempts,
                attempts=record.max_attempts,
                worker=worker_pid,
            )

    def succeeded(self, record: JobRecord, now: float) -> None:
        self._ended(record, now, "succeeded in")

    def cancelled(self, record: JobRecord, now: float) -> None:
        self._ended(record, now, "cancelled after")

    def _ended(self, record: JobRecord, now: float, how: str) -> None:
        if logs.enabled(LogLevel.info):
            name, duration = record.name or "?", _duration(record, now)
            _job_log.info(
                "{log_text}",
                log_text=f"job {name} {record.id} {how} {duration or 0:.3f} s",
                name=name,
                job_id=record.id,
                attempt=record.attempts,
                duration=duration,
            )

    def failed(
        self, record: JobRecord, error: str, now: float | None, retry_in: float | None = None
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


job_lines = JobLines()


def error_line(error: str) -> str:
    """
    @return: the line of C{error} that says what went wrong (a traceback's
        last line: the exception), at most 300 characters.
    """
    lines = [line for line in error.strip().splitlines() if line.strip()]
    return (lines[-1].strip() if lines else "failed")[:300]


def _duration(record: JobRecord, now: float | None) -> float | None:
    if now is None or record.started is None:
        return None
    return round(max(now - record.started, 0.0), 6)
