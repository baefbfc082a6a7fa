"""
Periodic jobs: C{@job(schedule="*/5 * * * *")} and C{settings.LRP_SCHEDULE}.
Each schedule has a row in C{twistedlrp_schedule} with its next due time. For
each due one, a job node submits the job under an id derived from the name and
due time (L{job_id}: submitted again, by another node or after a crash, it is the
same job), then moves C{next_due} on with C{UPDATE ... WHERE next_due = old}
(L{claim}): each due time runs once; missed runs are not made up.
"""

from __future__ import annotations

import functools
import json
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, tzinfo

from twistedlrp.jobs import registry
from twistedlrp.jobs.errors import InvalidArguments, JobServiceUnavailable, NotRegistered


@functools.cache
def _log():
    # Imported at first use: worker processes import this module (for
    # @job(schedule=...)) and need no Twisted for it.
    from twisted.logger import Logger

    return Logger(namespace=__name__)


# The longest sleep without a look at the table (another node may change a schedule).
MAX_SLEEP = 60.0
RETRY_AFTER = 5.0  # after a failed look
# Ids of scheduled jobs: uuid5(NAMESPACE, "name@due time").
NAMESPACE = uuid.UUID("6f0c2f5e-3b0e-4c1a-9d55-8f1f3c7a5e21")
_KEYS = {"job", "cron", "args", "kwargs"}


@dataclass(frozen=True)
class ScheduleSpec:
    """A schedule as the code or the settings define it."""

    name: str
    job: str
    cron: str
    args: list = field(default_factory=list)
    kwargs: dict = field(default_factory=dict)


# Schedules of @job(schedule=...), by name (the job's name).
_declared: dict[str, ScheduleSpec] = {}


def check_cron(cron, what: str) -> str:
    """@return: C{cron}; @raise InvalidArguments: not a valid cron expression."""
    from cronsim import CronSim, CronSimError

    if not isinstance(cron, str):
        raise InvalidArguments(f"{what}: expected a cron expression (a string), got {cron!r}")
    try:
        next(CronSim(cron, datetime(2000, 1, 1, tzinfo=UTC)))
    except (CronSimError, StopIteration) as e:
        raise InvalidArguments(f"{what}: {cron!r} is not a valid cron expression: {e}") from None
    return cron


def declare(job_name: str, cron) -> None:
    """@raise InvalidArguments: C{cron} is not a valid cron expression."""
    _declared[job_name] = ScheduleSpec(
        job_name, job_name, check_cron(cron, f"{job_name}: schedule")
    )


def configured() -> list[ScheduleSpec]:
    """@return: the schedules of C{@job(schedule=)} and C{LRP_SCHEDULE} by name; @raise BootError."""
    from django.conf import settings

    from twistedlrp.boot import BootError

    specs = dict(_declared)
    entries = getattr(settings, "LRP_SCHEDULE", None) or {}
    if not isinstance(entries, dict):
        raise BootError(f"LRP_SCHEDULE: expected a dict of schedules, got {entries!r}")
    for name, entry in entries.items():
        what = f"LRP_SCHEDULE[{name!r}]"
        if not isinstance(name, str) or not name or len(name) > 255:
            raise BootError(f"{what}: a schedule's name is a string of 1 to 255 characters")
        if not isinstance(entry, dict) or not {"job", "cron"} <= set(entry):
            raise BootError(f'{what}: expected a dict with "job" and "cron", got {entry!r}')
        if set(entry) - _KEYS:
            unknown = ", ".join(sorted(map(str, set(entry) - _KEYS)))
            raise BootError(f"{what}: unknown keys {unknown} (known: args, cron, job, kwargs)")
        args, kwargs = entry.get("args", []), entry.get("kwargs", {})
        try:
            registry.require(entry["job"])
            if not isinstance(args, list | tuple) or not isinstance(kwargs, dict):
                raise BootError(f"{what}: args must be a list and kwargs a dict")
            json.dumps([args, kwargs], allow_nan=False)
            check_cron(entry["cron"], what)
        except NotRegistered as e:
            raise BootError(f"{what}: {e}") from None
        except InvalidArguments as e:  # a TypeError: before the JSON's errors
            raise BootError(str(e)) from None
        except (TypeError, ValueError) as e:
            raise BootError(f"{what}: the arguments are not JSON: {e}") from None
        if name in specs:
            raise BootError(f"{what}: the job {name} has a schedule of that name already")
        specs[name] = ScheduleSpec(name, entry["job"], entry["cron"], list(args), dict(kwargs))
    return [specs[name] for name in sorted(specs)]


def time_zone() -> tzinfo:
    """@return: Django's C{TIME_ZONE}, the zone cron expressions are read in."""
    from django.utils import timezone

    return timezone.get_default_timezone()


def next_due(cron: str, after: datetime, zone: tzinfo | None = None) -> datetime:
    """@return: the first time after C{after} that C{cron} names, in UTC."""
    from cronsim import CronSim

    local = after.astimezone(zone or time_zone())
    return next(CronSim(cron, local)).astimezone(UTC)


def job_id(name: str, due: datetime) -> str:
    """@return: the id of the job of the schedule C{name}'s due time C{due}."""
    return str(uuid.uuid5(NAMESPACE, f"{name}@{due.astimezone(UTC).isoformat()}"))


_COLUMNS = ("name", "job", "cron", "args", "kwargs", "next_due", "last_run_at")


# -- in the store thread -------------------------------------------------------------


def sync(specs: list[ScheduleSpec]) -> list[dict]:
    """Make the table hold C{specs} only; @return: their rows (L{_COLUMNS}), sorted by name."""
    from twistedlrp.models import Schedule

    now = datetime.now(UTC)
    zone = time_zone()
    names = [spec.name for spec in specs]
    Schedule.objects.exclude(name__in=names).delete()
    existing = {row.name: row for row in Schedule.objects.filter(name__in=names)}
    new = []
    for spec in specs:
        if (row := existing.get(spec.name)) is None:
            new.append(Schedule(**vars(spec), next_due=next_due(spec.cron, now, zone)))
            continue
        changes = {}
        if row.cron != spec.cron:
            changes.update(cron=spec.cron, next_due=next_due(spec.cron, now, zone))
        for attribute in ("job", "args", "kwargs"):
            if getattr(row, attribute) != getattr(spec, attribute):
                changes[attribute] = getattr(spec, attribute)
        if changes:
            # Only if no other node changed it meanwhile.
            Schedule.objects.filter(name=row.name, cron=row.cron).update(**changes)
    # Another node starting at the same moment may add the same rows.
    Schedule.objects.bulk_create(new, ignore_conflicts=True)
    return list(Schedule.objects.filter(name__in=names).order_by("name").values(*_COLUMNS))


def due(names: list[str]) -> dict:
    """@return: C{{"due": rows due now, "next_due": the others' earliest or None}}."""
    from django.db.models import Min

    from twistedlrp.models import Schedule

    now = datetime.now(UTC)
    rows = Schedule.objects.filter(name__in=names)
    return {
        "due": list(rows.filter(next_due__lte=now).values(*_COLUMNS)),
        "next_due": rows.filter(next_due__gt=now).aggregate(n=Min("next_due"))["n"],
    }


def claim(name: str, old_due: datetime, cron: str, submitted: str) -> datetime | None:
    """@return: the new due time after now, or C{None} when the row had moved on already."""
    from twistedlrp.models import Schedule

    now = datetime.now(UTC)
    new = next_due(cron, now)
    moved = Schedule.objects.filter(name=name, next_due=old_due).update(
        next_due=new, last_run_at=now, last_job=submitted
    )
    return new if moved else None


# -- in the reactor ------------------------------------------------------------------


class Scheduler:
    """
    Runs the due schedules of one job node (those of its C{queues}, C{None}: all).
    @param submit: C{submit(name, payload, job_id=...)} of the job service.
    """

    def __init__(self, reactor, store, submit, queues=None):
        self.reactor, self.store, self.submit, self.queues = reactor, store, submit, queues
        self.names: list[str] = []
        self.runs = 0
        self.zone: tzinfo = UTC  # Django's TIME_ZONE, read at start()
        self._timer, self._running = None, False

    async def start(self, specs: list[ScheduleSpec]) -> None:
        rows = await self.store.run(sync, specs)
        self._running = True
        self.zone = zone = time_zone()
        for row in rows:
            _log().info(
                "Schedule {name}: job {job}, cron {cron!r} ({zone}), next run {next}{skipped}",
                name=row["name"],
                job=row["job"],
                cron=row["cron"],
                zone=str(zone),
                next=row["next_due"].astimezone(zone).isoformat(sep=" "),
                skipped=self._elsewhere(row),
            )
        self.names = [row["name"] for row in rows if not self._elsewhere(row)]
        if self.names:
            self._tick()

    def stop(self) -> None:
        self._running = False
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _elsewhere(self, row: dict) -> str:
        """@return: why this node does not run the schedule C{row}, or ""."""
        if (definition := registry.lookup(row["job"])) is None:
            return " (not on this node: its job is not registered here)"
        if self.queues is not None and definition.queue not in self.queues:
            return f" (not on this node: its queue {definition.queue!r} is not in --queues)"
        return ""

    def _tick(self) -> None:
        from twisted.internet import defer

        self._timer = None
        defer.ensureDeferred(self._run_due()).addCallbacks(self._sleep, self._failed)

    async def _run_due(self) -> datetime | None:
        """@return: the earliest next due time of this node's schedules."""
        found = await self.store.run(due, self.names)
        earliest = found["next_due"]
        for row in found["due"]:
            if not self._running:
                break
            submitted = job_id(row["name"], row["next_due"])
            payload = json.dumps({"args": row["args"], "kwargs": row["kwargs"]}).encode()
            try:
                # Submitted first: a crash before the claim submits the same id again.
                await self.submit(row["job"], payload, job_id=submitted)
            except JobServiceUnavailable:
                raise
            except Exception:
                # It could not be stored next time either: this due time is skipped.
                _log().failure("Schedule {name}: its job could not be submitted", name=row["name"])
            new = await self.store.run(claim, row["name"], row["next_due"], row["cron"], submitted)
            if new is not None:
                self.runs += 1
                _log().info(
                    "Schedule {name}: job {id} submitted for {due}",
                    name=row["name"],
                    id=submitted,
                    due=row["next_due"].isoformat(),
                )
            else:
                # Another node claimed it: it is due next when the cron says so.
                now = datetime.fromtimestamp(self.reactor.seconds(), UTC)
                new = next_due(row["cron"], now, self.zone)
            earliest = new if earliest is None else min(earliest, new)
        return earliest

    def _sleep(self, earliest: datetime | None) -> None:
        if not self._running:
            return
        delay = MAX_SLEEP
        if earliest is not None:
            # A little late rather than early: the row is due by then.
            delay = min(max(earliest.timestamp() - self.reactor.seconds() + 0.005, 0.01), MAX_SLEEP)
        self._timer = self.reactor.callLater(delay, self._tick)

    def _failed(self, failure) -> None:
        if not self._running:
            return
        _log().failure("The scheduler could not run the due schedules", failure)
        self._timer = self.reactor.callLater(RETRY_AFTER, self._tick)
