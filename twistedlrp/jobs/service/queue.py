"""
Where jobs wait: the service's memory of them (L{JobRecord}), the L{JobQueue}
that orders them (ready ones by priority then age, delayed ones on one timer of
its clock) and, when several job nodes share one PostgreSQL database, the table
(L{TableClaims}): one claim at a time takes a due job for each free worker
(C{FOR UPDATE SKIP LOCKED}, committed before the job is sent).
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from twistedlrp.jobs import registry
from twistedlrp.jobs.errors import InvalidArguments, NotRegistered
from twistedlrp.jobs.protocol.arguments import check_priority, check_seconds
from twistedlrp.jobs.store import operations as ops
from twistedlrp.jobs.store import recovery
from twistedlrp.ordered_service import cancel_call

log = Logger()

# Payloads up to this size stay in memory while queued, so a claim needs no read.
KEEP_PAYLOAD = 64 * 1024


def kept(payload: bytes) -> bytes | None:
    """@return: C{payload} if it stays in memory while queued (L{KEEP_PAYLOAD}), else C{None}."""
    return payload if len(payload) <= KEEP_PAYLOAD else None


@dataclass(eq=False)
class JobRecord:
    """One job the service holds, queued or running (without C{payload}: read at its claim)."""

    id: str
    priority: int = 0
    #: When it was submitted (orders jobs of equal priority).
    created: float = 0.0
    name: str = ""
    #: Attempts made so far, the running one included.
    attempts: int = 0
    max_attempts: int = 1
    retry_delay: float = 0.0
    timeout: float | None = None
    #: The JSON arguments, kept in memory when small (L{KEEP_PAYLOAD}).
    payload: bytes | None = None
    worker: object = None
    #: When the running attempt was sent to its worker (the clock's seconds).
    started: float | None = None
    progress: tuple = (0, None, "")
    cancel_requested: bool = False
    timers: list[IDelayedCall] = field(default_factory=list)

    @classmethod
    def from_row(cls, row, **values) -> JobRecord:
        """@return: the record of a job as the store reads it (C{values} win)."""
        names = ("name", "attempts", "max_attempts", "retry_delay", "timeout")
        fields = {n: row[n] for n in names if n in row}
        if row.get("created_at"):
            fields["created"] = row["created_at"].timestamp()
        return cls(row["id"], row["priority"], **(fields | values))

    def stop_timers(self) -> None:
        for timer in self.timers:
            cancel_call(timer)
        self.timers = []

    def check(self) -> None:
        """
        @raise InvalidArguments: the job holds a value it cannot run with (an old or
            foreign row), or its name is not registered in this job service.
        """
        if registry.lookup(self.name) is None:
            try:
                registry.require(self.name)
            except NotRegistered as e:
                raise InvalidArguments(f"in this job service, {e}") from None
        check_seconds("timeout", self.timeout)
        if self.retry_delay:
            check_seconds("retry_delay", self.retry_delay)
        check_priority(self.priority)

    def requeued(self) -> JobRecord:
        """@return: this record, with what belonged to the attempt that ended cleared."""
        self.stop_timers()
        self.worker = None
        self.progress = (0, None, "")
        self.cancel_requested = False
        return self


def call_by(clock: IReactorTime, timer: IDelayedCall | None, when: float, fn) -> IDelayedCall:
    """@return: C{timer} if it calls C{fn} by C{when} already, else a new call at C{when}."""
    if timer is not None and timer.active():
        if timer.getTime() <= when:
            return timer
        timer.cancel()
    return clock.callLater(when - clock.seconds(), fn)


class JobQueue:
    """@param on_due: called (from the clock) when delayed jobs became ready."""

    def __init__(self, clock: IReactorTime, on_due: Callable[[], None]):
        self._clock = clock
        self._on_due = on_due
        self._records: dict[str, JobRecord] = {}
        # Heap entries are not removed in place: one whose record is no longer
        # queued under its id is skipped when it surfaces.
        self._ready: list[tuple] = []
        self._delayed: list[tuple] = []
        self._seq = itertools.count()
        self._timer: IDelayedCall | None = None
        self._paused = False

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, job_id: str) -> bool:
        return job_id in self._records

    def push(self, record: JobRecord, not_before: float | None = None) -> None:
        """Queue C{record}, ready at once or from the clock time C{not_before}."""
        self._records[record.id] = record
        entry = (-record.priority, record.created, next(self._seq), record)
        if not_before is not None and not_before > self._clock.seconds():
            heapq.heappush(self._delayed, (not_before, entry))
            self._arm()
        else:
            heapq.heappush(self._ready, entry)

    def pop(self) -> JobRecord | None:
        """@return: the next ready job, now out of the queue, or C{None}."""
        return self._records.pop(heapq.heappop(self._ready)[3].id) if self.has_ready() else None

    def has_ready(self) -> bool:
        while self._ready and self._records.get(self._ready[0][3].id) is not self._ready[0][3]:
            heapq.heappop(self._ready)
        return bool(self._ready)

    def remove(self, job_id: str) -> JobRecord | None:
        """@return: the queued record of C{job_id}, now out of the queue, or C{None}."""
        return self._records.pop(job_id, None)

    def release_all(self) -> None:
        """Make every delayed job ready now (the eager mode does not wait)."""
        while self._delayed:
            heapq.heappush(self._ready, heapq.heappop(self._delayed)[1])
        cancel_call(self._timer)
        self._timer = None

    def pause(self) -> None:
        """Stop the timer: delayed jobs stay where they are (the service is stopping)."""
        self._paused = True
        cancel_call(self._timer)
        self._timer = None

    def next_due(self) -> float | None:
        """@return: the clock time the first delayed job becomes ready, if any."""
        return self._delayed[0][0] if self._delayed else None

    def _arm(self) -> None:
        if self._delayed and not self._paused:
            due = max(self._delayed[0][0], self._clock.seconds())
            self._timer = call_by(self._clock, self._timer, due, self._release)

    def _release(self) -> None:
        self._timer = None
        now = self._clock.seconds()
        released = bool(self._delayed) and self._delayed[0][0] <= now
        while self._delayed and self._delayed[0][0] <= now:
            heapq.heappush(self._ready, heapq.heappop(self._delayed)[1])
        self._arm()
        if released:
            self._on_due()


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
                record.check()
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
        if when is not None and self.dispatcher.accepting:
            due = max(when, self.reactor.seconds()) + 0.01
            self._due_timer = call_by(self.reactor, self._due_timer, due, self.dispatcher.wake)

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
