"""
The job service's watchdog: no job stays C{running} without a live worker that
holds it, in the service or in the store (jobs recorded as running on this
machine's workers or node that the service neither runs nor claims); that query
also tells the health endpoint whether the store can be reached.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime

from twisted.internet import task
from twisted.logger import Logger

from twistedlrp.jobs.service.queue import JobRecord
from twistedlrp.jobs.states import QUEUED
from twistedlrp.jobs.store import recovery

log = Logger()

CHECK_INTERVAL = 2.0
STORE_INTERVAL = 5.0
# A job claimed less than this long ago may still be on its way to its worker.
CLAIM_GRACE = 10.0


class Watchdog:
    """@param worker_prefix: the start of this machine's worker ids (C{"host:"})."""

    def __init__(self, reactor, dispatcher, store, worker_prefix: str, node: str | None = None):
        self.reactor, self.dispatcher, self.store = reactor, dispatcher, store
        self.worker_prefix = worker_prefix
        self.node = node  # several nodes: this node's jobs only
        self.store_error: str | None = None
        self._loop = task.LoopingCall(self.check)
        self._loop.clock = reactor
        self._last_store_check = 0.0
        self._store_check_running = False

    def start(self) -> None:
        self._loop.start(CHECK_INTERVAL, now=False)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()

    def check(self) -> None:
        for record in list(self.dispatcher.running.values()):
            if reason := _why_orphaned(record, self.dispatcher.pool.workers):
                self.dispatcher.orphaned(record, reason)
        now = self.reactor.seconds()
        # Fenced: the jobs it stopped are the lease's to deal with once it is renewed.
        if self.dispatcher.fenced or self._store_check_running:
            return
        if now - self._last_store_check >= STORE_INTERVAL:
            self._last_store_check, self._store_check_running = now, True
            grace = datetime.fromtimestamp(now - CLAIM_GRACE, UTC)
            d = self.store.run(recovery.running_on, self.worker_prefix, grace, self.node)
            d.addCallback(self._orphans_in_store).addBoth(self._store_checked)

    def _store_checked(self, outcome) -> None:
        self._store_check_running = False
        if hasattr(outcome, "getErrorMessage"):
            error = outcome.getErrorMessage() or outcome.type.__name__
            if self.store_error is None:
                log.error("The job store cannot be reached: {error}", error=error)
            self.store_error = error
        elif self.store_error is not None:
            log.info("The job store can be reached again")
            self.store_error = None

    def _orphans_in_store(self, rows: list[dict]) -> None:
        dispatcher = self.dispatcher
        for row in rows:
            job_id = row["id"]
            if job_id in dispatcher.running or job_id in dispatcher.claiming:
                continue
            reason = (
                f"the job was recorded as running on {row['worker'] or 'no worker'} "
                f"(attempt {row['attempts']}), which does not hold it"
            )
            log.warn("Job {job_id}: {reason}", job_id=job_id, reason=reason)
            d = self.store.run(recovery.end_orphan, job_id, reason, self.node)
            d.addCallback(self._requeue, job_id)
            d.addErrback(lambda f, job_id=job_id: log.failure("Ending job {id}", f, id=job_id))

    def _requeue(self, after: dict | None, job_id: str) -> None:
        if after is None or after["state"] != QUEUED or not self.dispatcher.accepting:
            return
        record = JobRecord(job_id, after["priority"], after["created_at"].timestamp())
        self.dispatcher.enqueue(record)


def _why_orphaned(record: JobRecord, workers: list) -> str | None:
    """@return: why C{record}'s worker does not hold it any more, or C{None} if it does."""
    worker = record.worker
    if worker is None:
        return "no worker was recorded"
    if worker not in workers or worker.state == "dead":
        return f"worker process {worker.pid} has ended"
    if worker.job_id != record.id:
        return f"worker process {worker.pid} runs another job"
    try:
        os.kill(worker.pid, 0)
    except ProcessLookupError:
        return f"worker process {worker.pid} does not exist"
    except OSError:
        pass
    return None
