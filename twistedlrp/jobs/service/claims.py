"""
Claims: a free worker reserved for a job about to be stored running on it
(L{Reservation}); and claiming from the table, when several job nodes share
one PostgreSQL database (L{SharedClaims}, part of
L{twistedlrp.jobs.service.dispatch.Dispatcher}):
one claim at a time takes a due job of this node's queues for each free
worker (C{SELECT ... FOR UPDATE SKIP LOCKED}, committed before the job is
sent); a timer wakes it when the first delayed job it knows of is due.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from twistedlrp.jobs.errors import InvalidArguments
from twistedlrp.jobs.service.outcomes import check_record, log_failed
from twistedlrp.jobs.service.queue import JobRecord
from twistedlrp.jobs.states import FAILED
from twistedlrp.jobs.store import operations as ops
from twistedlrp.jobs.store import recovery

log = Logger()


class SharedClaims:
    """
    The dispatcher's claims from the table. It uses the dispatcher's
    C{reactor}, C{store}, C{pool}, C{queues}, C{node}, C{accepting},
    C{_wanted}, C{_wakes}, C{_claim_running}, C{_claiming},
    C{_due_timer}, C{wake}, C{dispatch}, C{request_cancel}, C{_run_on} and
    C{_finish}.
    """

    def _claim_next(self) -> None:
        """Shared: claim one due job per free worker from the table (one claim at a time)."""
        if self._claim_running or not self._wanted:
            return
        idle = self.pool.idle()
        if not idle:
            return
        for worker in idle:
            worker.state = "claiming"
        self._claim_running = True
        wakes = self._wakes
        # The answer names workers by the idents sent, whatever happens meanwhile.
        sent = {w.ident: w for w in idle}
        d = self.store.run(ops.claim_next, self.queues, self.node, list(sent), self.lease_check)
        self._claiming.add(d)
        d.addCallbacks(
            self._claimed_next, self._claim_failed, callbackArgs=(sent, wakes), errbackArgs=(idle,)
        )
        d.addErrback(lambda f: log.failure("While starting claimed jobs", f))
        d.addBoth(lambda _: self._claiming.discard(d))

    def _claimed_next(self, answer: dict, sent: dict, wakes: int) -> None:
        self._claim_running = False
        workers = list(sent.values())
        if answer.get("no_lease"):
            # This node's lease is not fresh (it is being renewed, or cannot
            # be): no claim until it is.
            for worker in workers:
                if worker.state == "claiming":
                    worker.state = "idle"
            if self.accepting:
                self.reactor.callLater(1.0, self.wake)
            return
        by_ident = dict(sent)
        claimed = answer["claimed"]
        for row in claimed:
            worker = by_ident.pop(row["worker"])
            record = JobRecord(
                row["id"],
                row["priority"],
                name=row["name"],
                attempts=row["attempts"],
                max_attempts=row["max_attempts"],
                retry_delay=row["retry_delay"],
                timeout=row["timeout"],
            )
            if worker.state != "claiming" or not self.accepting:
                # The worker died, or the service began stopping, during the claim.
                if worker.state == "claiming":
                    worker.state = "idle"
                self.store.run(
                    recovery.requeue,
                    record.id,
                    "its worker ended before the job started",
                    False,
                    self.node,
                )
                continue
            try:
                check_record(record)
            except InvalidArguments as e:
                worker.state = "idle"
                error = f"the job could not start: {e}"
                log_failed(record, error)
                self._finish(record, FAILED, error=error)
                continue
            self._run_on(worker, record, row["payload"])
            if row["cancel_requested"]:
                self.request_cancel(record.id)
        for worker in by_ident.values():
            if worker.state == "claiming":
                worker.state = "idle"
        if len(claimed) < len(workers):
            if wakes == self._wakes:
                self._wanted = False
            self._arm_due(answer["next_due"])
        self.dispatch()

    def _claim_failed(self, failure, workers: list) -> None:
        self._claim_running = False
        for worker in workers:
            if worker.state == "claiming":
                worker.state = "idle"
        log.warn(
            "Could not claim jobs: {error}; trying again in 1 s",
            error=failure.getErrorMessage() or failure.type.__name__,
        )
        if self.accepting:
            self.reactor.callLater(1.0, self.wake)

    def _arm_due(self, when: float | None) -> None:
        """Shared: wake when the first delayed job we know of becomes due."""
        if when is None or not self.accepting:
            return
        timer = self._due_timer
        if timer is not None and timer.active():
            if timer.getTime() <= when:
                return
            timer.cancel()
        delay = max(when - self.reactor.seconds(), 0) + 0.01
        self._due_timer = self.reactor.callLater(delay, self.wake)


class Reservation:
    """
    A free worker held (C{claiming}) for one job while its submission
    commits; the submission then calls L{start} with the stored job, or
    L{release} when nothing was stored.
    """

    def __init__(self, dispatcher, worker, job_id: str):
        self.dispatcher, self.worker, self.job_id = dispatcher, worker, job_id
        worker.state = "claiming"
        dispatcher.claiming.add(job_id)
        # Stopping waits for it, as for a claim.
        self._done = defer.Deferred()
        dispatcher._claiming.add(self._done)

    def _end(self) -> None:
        self.dispatcher._claimed(self._done, self.job_id)
        self._done.callback(None)

    def release(self) -> None:
        self._end()
        if self.worker.state == "claiming":
            self.worker.state = "idle"
        self.dispatcher.dispatch()

    def start(self, record: JobRecord) -> None:
        """C{record} is stored running (attempt 1) on the reserved worker: send it."""
        dispatcher, worker = self.dispatcher, self.worker
        self._end()
        if worker.state != "claiming":
            # The worker died (or is being replaced) while the job was stored:
            # back to the queue, without the attempt (its claim will count one).
            d = dispatcher._put_back(record)
            d.addErrback(lambda f: log.failure("Requeuing job {job_id}", f, job_id=record.id))
            return
        record.attempts = 1
        try:
            check_record(record)
            dispatcher._run_on(worker, record, record.payload)
        except Exception:
            dispatcher._start_failed(Failure(), worker, record)
