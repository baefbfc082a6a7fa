"""
Retention: finished jobs are deleted once older than C{settings.LRP_JOBS_KEEP}
(7 days by default) or their job's own C{@job(keep=...)}. The L{Pruner} deletes
in small batches through the store thread and pauses between batches at least as
long as the last one took, so that submits and claims get half of its time.
"""

from __future__ import annotations

import datetime as _dt
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from twistedlrp.jobs.errors import JobServiceUnavailable
from twistedlrp.jobs.states import FINISHED

if TYPE_CHECKING:
    from twisted.internet import defer


def _log():
    # Imported on first use: every worker imports this module (@job(keep=)
    # parses its keep here) but not Twisted, which would cost it ~7 MiB.
    from twisted.logger import Logger

    return Logger(namespace=__name__)


DEFAULT_KEEP = 7 * 86400.0
BATCH_SIZE = 500
MAX_INTERVAL = 60.0  # between two passes
FIRST_PASS = 10.0  # seconds from the start, at most
#: A batch that takes longer (queued, run and committed) halves the next one,
#: down to L{MIN_BATCH_SIZE}; one under half of it doubles the next.
TARGET_BATCH_SECONDS = 0.025
MIN_BATCH_SIZE = 20
MIN_PAUSE = 0.05  # between two batches of one pass
FOREVER = "forever"

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$", re.IGNORECASE)
# More than 30 years is a mistake, not a retention period.
_MAX_SECONDS = 1e9


def parse_duration(value, field: str) -> float:
    """
    @param value: seconds, a C{timedelta}, or a string such as C{"90"}, C{"15m"}, C{"2d"}.
    @return: the seconds, more than 0.
    @raise ValueError: anything else; the message starts with C{field}.
    """
    if isinstance(value, _dt.timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, bool):
        raise ValueError(f"{field}: expected a duration, got {value!r}")
    elif isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        if not (match := _DURATION.match(value)):
            raise ValueError(
                f"{field}: expected a number with an optional unit s, m, h, d or w "
                f"(as in 30m or 2d), got {value!r}"
            )
        seconds = float(match.group(1)) * _UNITS[match.group(2).lower() or "s"]
    else:
        raise ValueError(
            f"{field}: expected seconds, a datetime.timedelta or a string such as '2d', "
            f"got {value!r}"
        )
    if not 0 < seconds <= _MAX_SECONDS:  # (false for NaN and infinities too)
        raise ValueError(
            f"{field}: must be more than 0 s and at most {_MAX_SECONDS:g} s, got {value!r}"
        )
    return seconds


def parse_keep(value, field: str) -> float | None:
    """@return: L{parse_duration}, or C{None} (for ever) for C{None} or C{"forever"}."""
    if value is None or (isinstance(value, str) and value.strip().lower() == FOREVER):
        return None
    return parse_duration(value, field)


def default_keep() -> float | None:
    """@return: C{settings.LRP_JOBS_KEEP} in seconds (C{None}: for ever); @raise BootError."""
    from django.conf import settings

    from twistedlrp.boot import BootError

    try:
        return parse_keep(getattr(settings, "LRP_JOBS_KEEP", DEFAULT_KEEP), "LRP_JOBS_KEEP")
    except ValueError as e:
        raise BootError(f"{e} (None or 'forever' keeps finished jobs for ever)") from None


@dataclass(frozen=True)
class Rule:
    """Finished jobs older than C{keep} seconds, of C{names} (all if C{None}) but not C{exclude}."""

    keep: float
    names: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()


def rules(default: float | None, definitions) -> list[Rule]:
    """@return: one rule per distinct C{@job(keep=)}, then the default's for every other name."""
    own = [d for d in definitions if getattr(d, "keep", None) is not None]
    by_keep: dict[float, list[str]] = {}
    for definition in own:
        if definition.keep != FOREVER:
            by_keep.setdefault(float(definition.keep), []).append(definition.name)
    found = [Rule(keep, tuple(sorted(names))) for keep, names in sorted(by_keep.items())]
    if default is not None:
        found.append(Rule(default, None, tuple(sorted(d.name for d in own))))
    return found


def prune_batch(rule: Rule, limit: int = BATCH_SIZE, now: _dt.datetime | None = None) -> int:
    """Delete up to C{limit} finished jobs C{rule} matches, oldest first; @return: how many."""
    from django.db import connection

    from twistedlrp.jobs.store.sql import statements

    sql = statements()
    c = sql.column
    cutoff = (now or _dt.datetime.now(_dt.UTC)) - _dt.timedelta(seconds=rule.keep)
    # The created_at condition (finished_at >= created_at) lets the database walk
    # that index, oldest first, and stop after `limit` rows. "state || ''" keeps
    # SQLite off the state indexes (0.4 s a batch with 200,000 jobs, not ms).
    state = f"({c['state']} || '')" if connection.vendor == "sqlite" else c["state"]
    where = f"{c['created_at']} < %s AND {c['finished_at']} < %s AND {state} IN {_in(FINISHED)}"
    params = [sql.prep("created_at", cutoff), sql.prep("finished_at", cutoff), *FINISHED]
    if rule.names is not None:
        where += f" AND {c['name']} IN {_in(rule.names)}"
        params += rule.names
    if rule.exclude:
        where += f" AND {c['name']} NOT IN {_in(rule.exclude)}"
        params += rule.exclude
    select = f"SELECT {c['id']} FROM {sql.table} WHERE {where} ORDER BY {c['created_at']} LIMIT %s"
    if connection.features.has_select_for_update_skip_locked:
        # Nodes pruning at once take different rows instead of waiting for each other.
        select += " FOR UPDATE SKIP LOCKED"
    with connection.cursor() as cursor:
        cursor.execute(select, [*params, limit])
        ids = [row[0] for row in cursor.fetchall()]
        if not ids:
            return 0
        # By primary key (a state index is 5 times slower), and only in a final
        # state: nodes pruning at once delete each row once.
        cursor.execute(
            f"DELETE FROM {sql.table} WHERE {c['id']} IN {_in(ids)} AND {state} IN {_in(FINISHED)}",
            [*ids, *FINISHED],
        )
        return cursor.rowcount


def _in(values) -> str:
    return f"({', '.join(['%s'] * len(values))})"


def prune(rule: Rule, limit: int = BATCH_SIZE, now: _dt.datetime | None = None) -> int:
    """Delete every finished job C{rule} matches, a transaction a batch; @return: how many."""
    from django.db import connection, transaction

    # SQLite: take the write lock at BEGIN, or a read then a write fails at once
    # if the store thread committed in between. (Connect first: a new
    # connection resets the mode from OPTIONS.)
    connection.ensure_connection()
    mode = getattr(connection, "transaction_mode", None)
    if connection.vendor == "sqlite":
        connection.transaction_mode = "IMMEDIATE"
    total = 0
    try:
        while True:
            with transaction.atomic():
                deleted = prune_batch(rule, limit, now)
            total += deleted
            if deleted < limit:
                return total
    finally:
        if connection.vendor == "sqlite":
            connection.transaction_mode = mode


def count(rule: Rule, now: _dt.datetime | None = None) -> int:
    """@return: how many finished jobs C{rule} would delete now (for C{--dry-run})."""
    from twistedlrp.models import Job

    cutoff = (now or _dt.datetime.now(_dt.UTC)) - _dt.timedelta(seconds=rule.keep)
    query = Job.objects.filter(state__in=FINISHED, finished_at__lt=cutoff)
    if rule.names is not None:
        query = query.filter(name__in=rule.names)
    if rule.exclude:
        query = query.exclude(name__in=rule.exclude)
    return query.count()


def interval_for(found: list[Rule]) -> float:
    """@return: the seconds between passes: a tenth of the shortest keep, 1 to L{MAX_INTERVAL}."""
    if not found:
        return MAX_INTERVAL
    return min(MAX_INTERVAL, max(1.0, min(rule.keep for rule in found) / 10))


class Pruner:
    """
    @param default: C{LRP_JOBS_KEEP} in seconds (L{default_keep}); C{None}: for ever.
    @param definitions: a callable returning the registered job definitions.
    """

    def __init__(self, reactor, store, default: float | None, definitions, batch_size=BATCH_SIZE):
        self.reactor, self.store, self.default = reactor, store, default
        self.definitions, self.batch_size = definitions, batch_size
        self.size = batch_size  # of the next batch (L{TARGET_BATCH_SECONDS})
        self.deleted = self.passes = 0
        self._call, self._running = None, False

    def start(self) -> None:
        self._running = True
        # Soon, but off the start-up path: a server often restarted still prunes.
        self._schedule(FIRST_PASS)

    def stop(self) -> None:
        self._running = False
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def describe(self) -> dict:
        return {"keep": self.default, "passes": self.passes, "deleted": self.deleted}

    def _schedule(self, at_most: float = MAX_INTERVAL) -> None:
        if self._running:
            delay = min(at_most, interval_for(rules(self.default, self.definitions())))
            self._call = self.reactor.callLater(delay, self._pass)

    def _pass(self) -> defer.Deferred:
        """@return: a Deferred firing when the pass is over (it never fails)."""
        from twisted.internet import defer

        self._call = None
        d = defer.ensureDeferred(self._prune_all()).addErrback(self._failed)
        return d.addBoth(lambda _: self._schedule())

    async def _prune_all(self) -> None:
        self.passes += 1
        for rule in rules(self.default, self.definitions()):
            deleted = 0
            while self._running:
                started = self.reactor.seconds()
                size = self.size
                n = await self.store.run(prune_batch, rule, size)
                deleted += n
                took = self.reactor.seconds() - started
                # A submit waits for the batch's commit: smaller ones on a slow database.
                if took > TARGET_BATCH_SECONDS:
                    self.size = max(MIN_BATCH_SIZE, size // 2)
                elif took < TARGET_BATCH_SECONDS / 2:
                    self.size = min(self.batch_size, size * 2)
                if n < size:
                    break
                from twisted.internet import task

                await task.deferLater(self.reactor, max(MIN_PAUSE, took))
            if deleted:
                self.deleted += deleted
                _log().info(
                    "Retention: deleted {n} finished job(s) older than {keep}{which}",
                    n=deleted,
                    keep=describe(rule.keep),
                    which=f" ({', '.join(rule.names)})" if rule.names else "",
                )

    def _failed(self, failure) -> None:
        if failure.check(JobServiceUnavailable) or not self._running:
            return  # the store is closing: the service is stopping
        _log().failure("Retention: a pass failed; the next one tries again", failure)


def describe(seconds: float) -> str:
    """@return: C{seconds} in the largest unit that divides it (C{"7d"}, C{"90m"}, C{"45s"})."""
    for unit in ("w", "d", "h", "m"):
        if seconds >= _UNITS[unit] and seconds % _UNITS[unit] == 0:
            return f"{int(seconds // _UNITS[unit])}{unit}"
    return f"{seconds:g}s"
