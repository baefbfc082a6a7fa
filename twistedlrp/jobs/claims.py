"""
Claiming from the table, when several job nodes share one PostgreSQL
database (L{SharedClaims}, part of L{twistedlrp.jobs.dispatch.Dispatcher}):
one claim at a time takes a due job of this node's queues for each free
worker (C{SELECT ... FOR UPDATE SKIP LOCKED}, committed before the job is
sent); a timer wakes it when the first delayed job it knows of is due.
"""

from __future__ import annotations

from twisted.logger import Logger

from twistedlrp.jobs.errors import InvalidArguments
from twistedlrp.jobs.outcomes import check_record, log_failed
from twistedlrp.jobs.queue import JobRecord
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
