"""Whether the store can be reached: a WARNING when it is lost, one when it is back, not more."""

from __future__ import annotations

from twisted.logger import Logger

from twistedlrp.jobs.errors import JobServiceUnavailable

log = Logger()


class StoreUnavailable(JobServiceUnavailable):
    """An operation could not run in time; C{started}: it may have run (else it did not)."""

    def __init__(self, message: str, started: bool):
        super().__init__(message)
        self.started = started


class Availability:
    """Kept in the reactor thread; C{wait}: how long a submission waits, for the log line."""

    def __init__(self, reactor):
        self.reactor = reactor
        self.wait: float | None = None
        # source -> why it cannot reach the database now
        self._lost: dict[str, str] = {}
        self.since = 0.0  # when the current outage began
        self.outages = 0

    @property
    def reason(self) -> str | None:
        """@return: why the store cannot be reached now, or C{None} when it can."""
        return next(iter(self._lost.values()), None)

    def lost(self, source: str, reason: str) -> None:
        """C{source} (a connection) cannot reach the database: C{reason}."""
        first = not self._lost
        self._lost.setdefault(source, reason)
        if not first:
            return
        self.since = self.reactor.seconds()
        self.outages += 1
        waits = f"submissions wait for it up to {self.wait:g} s, " if self.wait is not None else ""
        log.warn(
            "The job store cannot be reached: {reason}; {waits}outcomes of jobs are kept and "
            "written once it is back",
            reason=reason,
            waits=waits,
        )

    def back(self, source: str) -> None:
        """C{source} reaches the database (again)."""
        if self._lost.pop(source, None) is None or self._lost:
            return
        took = self.reactor.seconds() - self.since
        log.warn("The job store can be reached again, after {took:.1f} s", took=took)


def first_line(error: BaseException) -> str:
    """@return: the first line of C{error}'s text (its type's name when it has none)."""
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__


def broken(connection, raw) -> bool:
    """@return: whether Django's C{connection} is no longer the usable DB-API connection C{raw}."""
    current = connection.connection
    if current is None or (raw is not None and current is not raw):
        return True
    if getattr(current, "broken", False) or getattr(current, "closed", False):
        return True
    try:
        return not connection.is_usable()
    except Exception:
        return True


def transaction_id(connection) -> int | None:
    """@return: the current transaction's id on PostgreSQL (to look it up after a lost commit)."""
    if connection.vendor != "postgresql":
        return None
    with connection.cursor() as cursor:
        cursor.execute("SELECT txid_current()")
        return cursor.fetchone()[0]
