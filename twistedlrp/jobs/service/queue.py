"""
The job service's memory of jobs (L{JobRecord}) and the L{JobQueue} that orders
them: ready ones by priority then age, delayed ones on one timer of its clock.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

from twisted.internet.interfaces import IDelayedCall, IReactorTime

from twistedlrp.ordered_service import cancel_call


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
    #: The JSON arguments, kept in memory when small (L{dispatch.KEEP_PAYLOAD}).
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

    def requeued(self) -> JobRecord:
        """@return: this record, with what belonged to the attempt that ended cleared."""
        self.stop_timers()
        self.worker = None
        self.progress = (0, None, "")
        self.cancel_requested = False
        return self


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
        if not self._delayed or self._paused:
            return
        delay = max(self._delayed[0][0] - self._clock.seconds(), 0)
        timer = self._timer
        if timer is not None and timer.active():
            if timer.getTime() <= self._clock.seconds() + delay:
                return
            timer.cancel()
        self._timer = self._clock.callLater(delay, self._release)

    def _release(self) -> None:
        self._timer = None
        now = self._clock.seconds()
        released = bool(self._delayed) and self._delayed[0][0] <= now
        while self._delayed and self._delayed[0][0] <= now:
            heapq.heappush(self._ready, heapq.heappop(self._delayed)[1])
        self._arm()
        if released:
            self._on_due()
