"""
Claims: from the table, when several job nodes share one PostgreSQL
database (L{TableClaims}): one claim at a time takes a due job of this
node's queues for each free worker (C{SELECT ... FOR UPDATE SKIP LOCKED},
committed before the job is sent), and a timer wakes it when the first
delayed job it knows of is due; and a free worker reserved for a job about
to be stored running on it (L{Reservation}).
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from twistedlrp.jobs.errors import InvalidArguments
from twistedlrp.jobs.service.outcomes import check_record
from twistedlrp.jobs.service.queue import JobRecord
from twistedlrp.jobs.store import operations as ops
from twistedlrp.jobs.store import recovery

log = Logger()


class TableClaims:
    """
    The dispatcher's claims from the table.

    @param pool: the workers; its idle ones claim.
    @param outcomes: the L{Outcomes} that fails a claimed job that cannot run.
    @param in_flight: the Deferreds of the claims under way (stopping waits for them).
    @param accepting: C{()}: does the dispatcher take work?
    @param dispatch: C{()}: hand work to free workers (claims again).
    @param run: C{(worker, record, payload)}: send a claimed job to its worker.
    @param cancel: C{(job_id)}: a claimed job's cancellation was asked.
    @ivar wanted: may the table hold due jobs for us? (Cleared by a claim
        that found fewer than it asked for, unless a wake came meanwhile.)
    @ivar lease_check: claims succeed only if this node renewed its lease
        within this many seconds (the database checks; see C{ops.claim_next}).
    """

    def __init__(
        self,
        reactor,
        store,
        pool,
        outcomes,
        node,
        queues,
        in_flight,
        accepting,
        dispatch,
        run,
        cancel,
    ):
        self.reactor, self.store, self.pool, self.outcomes = reactor, store, pool, outcomes
        self.node, self.queues, self.in_flight = node, queues, in_flight
        self.accepting, self.dispatch, self.run, self.cancel = accepting, dispatch, run, cancel
        self.wanted = True
        self.wakes = 0
        self.running = False
        self.lease_check: float | None = None
        self._due_timer = None

    def want(self) -> None:
        """There may be due jobs in the table (a notification, a submission, a timer)."""
        self.wakes += 1
        self.wanted = True

    def _wake(self) -> None:
        self.want()
        self.dispatch()

    def claim_next(self) -> None:
        """Claim one due job per free worker from the table (one claim at a time)."""
        if self.running or not self.wanted:
            return
        idle = self.pool.idle()
        if not idle:
            return
        for worker in idle:
            worker.state = "claiming"
        self.running = True
        wakes = self.wakes
        # The answer names workers by the idents sent, whatever happens meanwhile.
        sent = {w.ident: w for w in idle}
        d = self.store.run(ops.claim_next, self.queues, self.node, list(sent), self.lease_check)
        self.in_flight.add(d)
        d.addCallbacks(self._claimed, self._failed, callbackArgs=(sent, wakes), errbackArgs=(idle,))
        d.addErrback(lambda f: log.failure("While starting claimed jobs", f))
        d.addBoth(lambda _: self.in_flight.discard(d))

    def _claimed(self, answer: dict, sent: dict, wakes: int) -> None:
        self.running = False
        workers = list(sent.values())
        if answer.get("no_lease"):
            # This node's lease is not fresh (it is being renewed, or cannot
            # be): no claim until it is.
            _free(workers)
            if self.accepting():
                self.reactor.callLater(1.0, self._wake)
            return
        by_ident = dict(sent)
        claimed = answer["claimed"]
        for row in claimed:
            worker = by_ident.pop(row["worker"])
            record = JobRecord.from_row(row)
            if worker.state != "claiming" or not self.accepting():
                # The worker died, or the service began stopping, during the claim.
                _free([worker])
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
                self.outcomes.fail(record, f"the job could not start: {e}")
                continue
            self.run(worker, record, row["payload"])
            if row["cancel_requested"]:
                self.cancel(record.id)
        _free(by_ident.values())
        if len(claimed) < len(workers):
            if wakes == self.wakes:
                self.wanted = False
            self.arm_due(answer["next_due"])
        self.dispatch()

    def _failed(self, failure, workers: list) -> None:
        self.running = False
        _free(workers)
        log.warn(
            "Could not claim jobs: {error}; trying again in 1 s",
            error=failure.getErrorMessage() or failure.type.__name__,
        )
        if self.accepting():
            self.reactor.callLater(1.0, self._wake)

    def arm_due(self, when: float | None) -> None:
        """Wake when the first delayed job we know of becomes due (at C{when})."""
        if when is None or not self.accepting():
            return
        timer = self._due_timer
        if timer is not None and timer.active():
            if timer.getTime() <= when:
                return
            timer.cancel()
        delay = max(when - self.reactor.seconds(), 0) + 0.01
        self._due_timer = self.reactor.callLater(delay, self._wake)

    def stop(self) -> None:
        """Wake no more for delayed jobs."""
        if self._due_timer is not None and self._due_timer.active():
            self._due_timer.cancel()


def _free(workers) -> None:
    """The workers held for a claim that did not give them a job are idle again."""
    for worker in workers:
        if worker.state == "claiming":
            worker.state = "idle"


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
