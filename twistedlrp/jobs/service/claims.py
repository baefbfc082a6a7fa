"""
Claims from the table when several job nodes share one PostgreSQL database
(L{TableClaims}): one claim at a time takes a due job for each free worker
(C{FOR UPDATE SKIP LOCKED}, committed before the job is sent).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from twisted.internet import defer
from twisted.logger import Logger

from twistedlrp.jobs.errors import InvalidArguments
from twistedlrp.jobs.service.outcomes import check_record
from twistedlrp.jobs.service.queue import JobRecord
from twistedlrp.jobs.store import operations as ops
from twistedlrp.jobs.store import recovery
from twistedlrp.ordered_service import cancel_call

log = Logger()


class TableClaims:
    """
    @ivar in_flight: the Deferreds of the claims under way (stopping waits for them).
    @ivar wanted: may the table hold due jobs for us? (Cleared by a claim
        that found fewer than it asked for, unless a wake came meanwhile.)
    @ivar lease_check: claims succeed only if this node renewed its lease
        within this many seconds (the database checks; see C{ops.claim_next}).
    """

    def __init__(self, dispatcher, queues: list[str] | None):
        self.dispatcher, self.queues = dispatcher, queues
        self.reactor, self.store = dispatcher.reactor, dispatcher.store
        self.in_flight: set[defer.Deferred] = set()
        self.wanted = True
        self.wakes = 0
        self.running = False
        self.lease_check: float | None = None
        self._due_timer = None

    def want(self) -> None:
        self.wakes += 1
        self.wanted = True

    def claim_next(self) -> None:
        idle = not self.running and self.wanted and self.dispatcher.pool.idle()
        if not idle:
            return
        for worker in idle:
            worker.state = "claiming"
        self.running = True
        # The answer names workers by the idents sent, whatever happens meanwhile.
        sent = {w.ident: w for w in idle}
        node = self.dispatcher.node
        d = self.store.run(ops.claim_next, self.queues, node, list(sent), self.lease_check)
        self.in_flight.add(d)
        d.addCallbacks(
            self._claimed, self._failed, callbackArgs=(sent, self.wakes), errbackArgs=(idle,)
        )
        d.addErrback(lambda f: log.failure("While starting claimed jobs", f))
        d.addBoth(lambda _: self.in_flight.discard(d))

    def _claimed(self, answer: dict, sent: dict, wakes: int) -> None:
        self.running = False
        if answer.get("no_lease"):  # this node's lease is not fresh: no claim until it is
            self._failed(None, list(sent.values()))
            return
        dispatcher, unclaimed = self.dispatcher, dict(sent)
        claimed = answer["claimed"]
        for row in claimed:
            worker = unclaimed.pop(row["worker"])
            record = JobRecord.from_row(row)
            if worker.state != "claiming" or not dispatcher.accepting:  # died, or stopping
                free(worker)
                error = "its worker ended before the job started"
                self.store.run(recovery.requeue, record.id, error, False, dispatcher.node)
                continue
            try:
                check_record(record)
            except InvalidArguments as e:
                worker.state = "idle"
                dispatcher.outcomes.fail(record, f"the job could not start: {e}")
                continue
            dispatcher.run_on(worker, record, row["payload"])
            if row["cancel_requested"]:
                dispatcher.request_cancel(record.id)
        free(*unclaimed.values())
        if len(claimed) < len(sent):
            if wakes == self.wakes:
                self.wanted = False
            self.arm_due(answer["next_due"])
        dispatcher.dispatch()

    def _failed(self, failure, workers: list) -> None:
        """The claim failed (C{None}: this node's lease is not fresh): again in 1 s."""
        self.running = False
        free(*workers)
        if failure is not None:
            log.warn(
                "Could not claim jobs: {error}; trying again in 1 s",
                error=failure.getErrorMessage() or failure.type.__name__,
            )
        if self.dispatcher.accepting:
            self.reactor.callLater(1.0, self.dispatcher.wake)

    def arm_due(self, when: float | None) -> None:
        """Wake when the first delayed job we know of becomes due (at C{when})."""
        if when is None or not self.dispatcher.accepting:
            return
        timer = self._due_timer
        if timer is not None and timer.active():
            if timer.getTime() <= when:
                return
            timer.cancel()
        delay = max(when - self.reactor.seconds(), 0) + 0.01
        self._due_timer = self.reactor.callLater(delay, self.dispatcher.wake)

    def stop(self) -> None:
        cancel_call(self._due_timer)


def free(*workers) -> None:
    """Workers held for a claim that gave them no job are idle again."""
    for worker in workers:
        if worker.state == "claiming":
            worker.state = "idle"


@dataclass(eq=False)
class Reservation:
    """A free worker held (C{claiming}) for one job while its submission commits."""

    worker: object
    job_id: str
    #: Fires once it ended either way: stopping waits for it, as for a claim.
    done: defer.Deferred = field(default_factory=defer.Deferred)
