"""
Recording the end of an attempt: a final state, or a retry after its delay
(L{Outcomes}, part of L{twistedlrp.jobs.dispatch.Dispatcher}), each
committed before waiters hear of it; and the log line of each failed job.
"""

from __future__ import annotations

from datetime import UTC, datetime

from twisted.logger import Logger

from twistedlrp.jobs import metrics as job_metrics
from twistedlrp.jobs import registry
from twistedlrp.jobs.arguments import check_priority, check_seconds
from twistedlrp.jobs.queue import JobRecord
from twistedlrp.jobs.states import FAILED, QUEUED
from twistedlrp.jobs.store import operations as ops

log = Logger()


class Outcomes:
    """
    The dispatcher's recording of outcomes. It uses the dispatcher's
    C{reactor}, C{store}, C{counters}, C{accepting}, C{node}, C{enqueue},
    C{_waiting} and C{_notify}.
    """

    def _retry_or_fail(self, record: JobRecord, error: str, fields: dict) -> None:
        if record.attempts >= record.max_attempts or self.store.closed:
            self.counters["failed"] += 1
            log_failed(record, error)
            self._finish(record, FAILED, error=error, **fields)
            return
        delay = registry.retry_delay(record.retry_delay, record.attempts)
        # The reactor's clock is Unix time, as run_after is.
        run_after = self.reactor.seconds() + delay
        self.counters["retried"] += 1
        job_metrics.count("retried", record.name)
        log.info(
            "Job {job_id} attempt {n} of {max} failed; retrying in {delay:.1f} s",
            job_id=record.id,
            n=record.attempts,
            max=record.max_attempts,
            delay=delay,
        )
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
        job_metrics.count(state, record.name)
        # Read the job back only when someone waits for it; a waiter that
        # comes later reads it after this commit anyway.
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
    """@raise InvalidArguments: the job holds a value it cannot run with (an old or foreign row)."""
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


def log_failed(record: JobRecord, error: str) -> None:
    lines = [line for line in error.strip().splitlines() if line.strip()]
    log.warn(
        "Job {job_id} ({name}) failed, attempt {attempt} of {attempts}: {error}",
        job_id=record.id,
        name=record.name or "?",
        attempt=record.attempts,
        attempts=record.max_attempts,
        error=(lines[-1] if lines else "failed")[:300],
    )
