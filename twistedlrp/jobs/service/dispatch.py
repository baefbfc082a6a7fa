"""
Which queued job runs on which worker. A job is sent to its worker only once
its claim (C{running}, one more attempt) is committed, so that after a crash it
either had not started or counts as started. With several job nodes on one
PostgreSQL database the table is the queue (L{TableClaims}).
"""

from __future__ import annotations

import os

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from twistedlrp.jobs.errors import InvalidArguments
from twistedlrp.jobs.service import metrics as job_metrics
from twistedlrp.jobs.service.outcomes import Outcome, Outcomes, fire, log_started
from twistedlrp.jobs.service.queue import JobQueue, JobRecord, Reservation, TableClaims, free, kept
from twistedlrp.jobs.store import operations as ops
from twistedlrp.jobs.store import recovery
from twistedlrp.jobs.workers.pool import WorkerPool
from twistedlrp.ordered_service import Waiters

log = Logger()


class Dispatcher:
    """
    @param store: the L{twistedlrp.jobs.store.Store} (or the eager mode's in memory).
    @param pool: the workers [default: a L{WorkerPool} of processes].
    @ivar claiming: the jobs being claimed (or reserved) by id, with a
        Deferred that fires once that is over: the watchdog leaves them be.
    """

    def __init__(
        self,
        reactor,
        store,
        options,
        worker_env: dict,
        cancel_grace: float,
        node: str = "",
        shared: bool = False,
        queues: list[str] | None = None,
        pool=None,
    ):
        self.reactor, self.store, self.options = reactor, store, options
        self.cancel_grace = cancel_grace
        self.queue = JobQueue(reactor, self.dispatch)
        self.pool = pool or WorkerPool(
            reactor,
            options,
            os.environ["DJANGO_SETTINGS_MODULE"],
            worker_env,
            lambda worker: self.dispatch(),
            self._worker_died,
            self.progress,
        )
        self.accepting = False
        self.running: dict[str, JobRecord] = {}
        # wait(..., seen=...) by job id: told when the job starts or reports progress.
        self.watchers: dict[str, list[defer.Deferred]] = {}
        self.counters = dict.fromkeys(job_metrics.EVENTS, 0)
        self._idle = Waiters()
        self.claiming: dict[str, defer.Deferred] = {}
        self.node, self.shared, self.queues = node, shared, queues
        self.fenced = False
        self.outcomes = Outcomes(
            reactor, store, self.count, self._requeue, cancel_grace, node if shared else None
        )
        self.claims = TableClaims(self, queues)

    def enqueue(self, record: JobRecord, not_before: float | None = None) -> None:
        if not self.shared:
            self.queue.push(record, not_before)
            self.dispatch()
        elif not_before is not None and not_before > self.reactor.seconds():
            self.claims.arm_due(not_before)
        else:
            self.wake()

    def wake(self) -> None:
        """Shared: there may be due jobs in the table; free workers claim them."""
        self.claims.want()
        self.dispatch()

    def count(self, event: str, name: str) -> None:
        self.counters[event] += 1
        job_metrics.count(event, name)

    def request_cancel(self, job_id: str) -> None:
        """Dequeue a queued job, or ask a running one to stop (then SIGTERM, then SIGKILL)."""
        if (removed := self.queue.remove(job_id)) is not None:
            self.count("cancelled", removed.name)
            return
        record = self.running.get(job_id)
        if record is not None and not record.cancel_requested:
            record.cancel_requested = True
            worker = record.worker
            worker.cancel(job_id)
            log.info("Job {job_id}: cancellation requested", job_id=job_id)
            for signal, after in (("TERM", self.cancel_grace), ("KILL", 2 * self.cancel_grace)):
                record.timers.append(self.reactor.callLater(after, worker.signal, signal, "cancel"))

    def fence(self) -> list[str]:
        """
        This node could not renew its lease in time: kill every running job's
        worker, record nothing (the lease's renewal deals with them), start no
        job until L{unfence}. @return: the ids of the jobs stopped.
        """
        self.fenced = True
        stopped = list(self.running.values())
        for record in stopped:
            self._forget(record)
            log.warn(
                "Job {job_id}: stopped (attempt {attempt}, worker {pid}): this job node could "
                "not renew its lease",
                job_id=record.id,
                attempt=record.attempts,
                pid=record.worker.pid,
            )
            record.worker.signal("KILL", "fence")
        return [record.id for record in stopped]

    def unfence(self) -> None:
        self.fenced = False
        if self.accepting:
            self.wake()

    def stop_accepting(self) -> None:
        self.accepting = False
        self.queue.pause()
        self.claims.stop()
        self.pool.stop_idle()

    def when_idle(self) -> defer.Deferred:
        return self._idle.wait() if self.running else defer.succeed(None)

    def claims_in_flight(self) -> defer.Deferred:
        return defer.DeferredList([*self.claiming.values(), *self.claims.in_flight])

    def orphaned(self, record: JobRecord, reason: str) -> None:
        """The watchdog saw C{record} running on no live worker: retry or fail it."""
        if self.running.get(record.id) is not record:
            return
        self._forget(record)
        error = f"the job was running without a live worker ({reason})"
        log.warn("Job {job_id}: {error}", job_id=record.id, error=error)
        self.outcomes.retry_or_fail(record, error, {"worker": getattr(record.worker, "ident", "")})

    def dispatch(self) -> None:
        if not self.accepting or self.fenced:
            return
        if self.shared:
            self.claims.claim_next()
            return
        while self.queue.has_ready():
            if not (idle := self.pool.idle()):
                return
            record, worker = self.queue.pop(), idle[0]
            worker.state = "claiming"
            load = record.payload is None  # (plain callbacks, no coroutine: once per job)
            d = self.store.run(ops.claim, record.id, worker.ident, load, self.node)
            d.addCallback(self._claimed_one, worker, record, load)
            self._hold(record.id, d.addErrback(self._start_failed, worker, record))

    def _hold(self, job_id: str, d: defer.Deferred) -> None:
        self.claiming[job_id] = d

        def over(_):
            if self.claiming.get(job_id) is d:
                del self.claiming[job_id]

        d.addBoth(over)

    def reserve(self, job_id: str) -> Reservation | None:
        """
        Reserve a free worker for a job about to be stored, when nothing due is
        ahead of it (in the queue, or in the table as the last claim found it):
        it is stored running in its submission's transaction (L{start_reserved}).
        @return: the L{Reservation}, or C{None} (the job is queued as usual).
        """
        if not self.accepting or self.fenced:
            return None
        ahead = (
            (self.claims.wanted or self.claims.running) if self.shared else self.queue.has_ready()
        )
        idle = not ahead and self.pool.idle()
        if not idle:
            return None
        reserved = Reservation(idle[0], job_id)
        reserved.worker.state = "claiming"
        self._hold(job_id, reserved.done)
        return reserved

    def release(self, reserved: Reservation) -> None:
        reserved.done.callback(None)
        free(reserved.worker)
        self.dispatch()

    def start_reserved(self, reserved: Reservation, record: JobRecord) -> None:
        """C{record} is stored running (attempt 1) on C{reserved}'s worker: send it."""
        worker = reserved.worker
        reserved.done.callback(None)
        if worker.state != "claiming":  # it died while the job was stored
            self._put_back(record, log_failure=True)
            return
        record.attempts = 1
        try:
            record.check()
            self.run_on(worker, record, record.payload)
        except Exception:
            self._start_failed(Failure(), worker, record)

    def _claimed_one(self, claimed, worker, record: JobRecord, load: bool):
        if claimed is None:
            free(worker)  # cancelled (or taken) meanwhile
            self.dispatch()
            return None
        if worker.state != "claiming":  # it died, or the service began stopping
            return self._put_back(record)
        if load:
            for name in ("name", "attempts", "max_attempts", "retry_delay", "timeout", "priority"):
                setattr(record, name, claimed[name])
            payload = claimed["payload"]
            record.payload = kept(payload)
        else:
            record.attempts += 1
            payload = record.payload
        record.check()
        self.run_on(worker, record, payload)

    def _put_back(self, record: JobRecord, log_failure: bool = False) -> defer.Deferred:
        """The worker ended before the job reached it: requeue it, without the attempt."""
        error = "its worker ended before the job started"
        d = self.store.run(recovery.requeue, record.id, error, False, *self.outcomes.node_args)
        d.addCallback(lambda _: self._requeue(record))
        if log_failure:
            d.addErrback(lambda f: log.failure("Requeuing job {job_id}", f, job_id=record.id))
        return d

    def _requeue(self, record: JobRecord, not_before: float | None = None) -> None:
        if self.accepting:
            self.enqueue(record, not_before)

    def _start_failed(self, failure, worker, record: JobRecord) -> None:
        """A row with a value that cannot run fails the job; a store error requeues it (1 s)."""
        self._forget(record)
        if worker.state == "busy" and worker.job_id == record.id:
            worker.signal("KILL", "orphan")  # it may have begun: a fresh process is cleaner
        free(worker)
        if failure.check(InvalidArguments):
            self.outcomes.fail(record, f"the job could not start: {failure.getErrorMessage()}")
        else:
            log.failure("Could not start job {job_id}; it waits 1 s", failure, job_id=record.id)
            self._requeue(record.requeued(), self.reactor.seconds() + 1.0)
        self.dispatch()

    def run_on(self, worker, record: JobRecord, payload: bytes) -> None:
        if self.fenced:
            # Claimed before this node lost its lease: another node may take it over.
            free(worker)
            self._put_back(record, log_failure=True)
            return
        record.worker = worker
        self.running[record.id] = record
        record.started = self.reactor.seconds()
        log_started(record, worker.pid)
        self._changed(record.id)
        if record.timeout:
            record.timers.append(
                self.reactor.callLater(record.timeout, worker.signal, "KILL", "timeout")
            )
        d = worker.run(record.id, record.name, payload, record.attempts)

        def answer_failed(failure):
            if worker.gone(failure):
                return  # _worker_died decides, once its process exits
            # Its answer could not be read: the job fails, the worker is replaced.
            log.warn(
                "Job {job_id}: the answer of worker {pid} could not be read: {reason}",
                job_id=record.id,
                pid=worker.pid,
                reason=worker.broken,
            )
            error = f"the worker's answer could not be read: {worker.broken}"
            self._job_ended(record, Outcome(False, error=error))

        d.addCallbacks(
            lambda outcome: self._job_ended(record, Outcome.read(outcome)), answer_failed
        )
        d.addErrback(lambda f: log.failure("While finishing job {job_id}", f, job_id=record.id))

    def progress(self, job_id, current, total, message) -> None:
        if (record := self.running.get(job_id)) is not None:
            record.progress = (current, total, message)
            self.store.set_progress(job_id, current, total, message)
            self._changed(job_id)

    def _job_ended(self, record: JobRecord, outcome: Outcome) -> None:
        if self.running.get(record.id) is not record:
            return
        self._forget(record)
        worker = record.worker
        output = worker.take_output()
        options = self.options
        if self.pool.job_done(worker, options["max-jobs-per-worker"], options["max-worker-memory"]):
            self.dispatch()
        current, total, message = record.progress
        fields = {"output": output, "worker": worker.ident, "progress_current": current}
        fields.update(progress_total=total, progress_message=message)
        self.outcomes.ended(record, outcome, fields)

    def _worker_died(self, worker, job_id: str, how: str) -> None:
        if (record := self.running.get(job_id)) is not None:
            self._forget(record)
            self.outcomes.worker_died(record, worker, how)

    def _changed(self, job_id: str) -> None:
        # Not for the end of running: that is told once committed (outcomes.py).
        for d in self.watchers.pop(job_id, ()):
            fire(d, None)

    def _forget(self, record: JobRecord) -> None:
        self.running.pop(record.id, None)
        if record.started is not None:
            job_metrics.ran(record.name, self.reactor.seconds() - record.started)
        record.stop_timers()
        if not self.running:
            self._idle.fire()
