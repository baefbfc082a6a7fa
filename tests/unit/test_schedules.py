"""
Periodic jobs without a server: cron expressions in a time zone, the ids
of due times, and the scheduler's order (submit, then claim) with a fake
store on a fake clock.
"""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from twistedlrp.jobs import job, registry
from twistedlrp.jobs.errors import InvalidArguments, JobServiceUnavailable
from twistedlrp.jobs.service import schedules

PARIS = ZoneInfo("Europe/Paris")


def test_cron_is_read_in_the_time_zone_across_daylight_saving_time():
    # 02:30 every day, Paris time: 01:30 UTC in winter, 00:30 UTC in summer.
    winter = schedules.next_due("30 2 * * *", datetime(2026, 1, 10, 12, tzinfo=UTC), PARIS)
    summer = schedules.next_due("30 2 * * *", datetime(2026, 7, 10, 12, tzinfo=UTC), PARIS)
    assert winter == datetime(2026, 1, 11, 1, 30, tzinfo=UTC)
    assert summer == datetime(2026, 7, 11, 0, 30, tzinfo=UTC)
    assert winter.tzinfo is UTC


def test_six_fields_have_seconds_first_and_the_next_time_is_strictly_later():
    at = datetime(2026, 1, 1, 10, 0, 0, tzinfo=UTC)
    assert schedules.next_due("*/10 * * * * *", at, UTC) == datetime(
        2026, 1, 1, 10, 0, 10, tzinfo=UTC
    )
    assert schedules.next_due("* * * * *", at, UTC) == datetime(2026, 1, 1, 10, 1, tzinfo=UTC)


@pytest.mark.parametrize("cron", ["every minute", "61 * * * *", "", None, 5])
def test_a_bad_cron_expression_is_refused_with_its_name(cron):
    with pytest.raises(InvalidArguments, match="nightly"):
        schedules.check_cron(cron, "nightly")


def test_job_with_a_bad_schedule_fails_at_decoration():
    with pytest.raises(InvalidArguments, match="is not a valid cron expression"):

        @job(schedule="every day", name="tests.unit.bad_schedule")
        def bad_schedule():
            pass

    assert "tests.unit.bad_schedule" not in schedules._declared


def test_job_with_a_schedule_declares_it():
    @job(schedule="0 3 * * *", name="tests.unit.nightly")
    def nightly():
        pass

    try:
        spec = schedules._declared["tests.unit.nightly"]
        assert (spec.job, spec.cron, spec.args, spec.kwargs) == (
            "tests.unit.nightly",
            "0 3 * * *",
            [],
            {},
        )
    finally:
        schedules._declared.pop("tests.unit.nightly", None)
        registry._registry.pop("tests.unit.nightly", None)


def test_the_id_of_a_due_time_depends_on_the_schedule_and_the_time_only():
    t = datetime(2026, 1, 1, 10, tzinfo=UTC)
    assert schedules.job_id("a", t) == schedules.job_id("a", t.astimezone(PARIS))
    assert schedules.job_id("a", t) != schedules.job_id("b", t)
    assert schedules.job_id("a", t) != schedules.job_id("a", t.replace(second=1))


class FakeStore:
    """Answers C{due} with the rows given; C{claim} moves a row on once."""

    def __init__(self, clock, rows):
        self.clock = clock
        self.rows = rows
        self.calls = []
        # Another node claims each due time first.
        self.other_node = False

    def run(self, operation, *args):
        self.calls.append(operation.__name__)
        now = datetime.fromtimestamp(self.clock.seconds(), UTC)
        if operation is schedules.due:
            due = [dict(r) for r in self.rows if r["next_due"] <= now]
            later = [r["next_due"] for r in self.rows if r["next_due"] > now]
            return defer.succeed({"due": due, "next_due": min(later, default=None)})
        if operation is schedules.claim:
            name, old, cron, _ = args
            [row] = [r for r in self.rows if r["name"] == name]
            if self.other_node:
                row["next_due"] = schedules.next_due(cron, now, UTC)
            if row["next_due"] != old:
                return defer.succeed(None)
            row["next_due"] = schedules.next_due(cron, now, UTC)
            return defer.succeed(row["next_due"])
        raise AssertionError(operation)


@pytest.fixture(autouse=True)
def tick_job():
    """The job the fake schedules name, registered for each test only."""
    registry.register(registry.JobDefinition("tests.unit.tick", lambda: None))
    yield
    registry._registry.pop("tests.unit.tick", None)


def scheduler_with(rows, submit):
    clock = Clock()
    clock.advance(datetime(2026, 1, 1, 10, tzinfo=UTC).timestamp())
    store = FakeStore(clock, rows)
    scheduler = schedules.Scheduler(clock, store, submit)
    scheduler.names = [r["name"] for r in rows]
    scheduler._running = True
    return clock, store, scheduler


def row(name, cron, due):
    return {
        "name": name,
        "job": "tests.unit.tick",
        "cron": cron,
        "args": [],
        "kwargs": {},
        "next_due": due,
    }


def test_each_due_time_is_submitted_once_then_claimed_and_the_timer_follows():
    submitted = []

    def submit(name, payload, job_id):
        submitted.append(job_id)
        return defer.succeed({"id": job_id})

    start = datetime(2026, 1, 1, 10, tzinfo=UTC)
    clock, store, scheduler = scheduler_with([row("s", "*/2 * * * * *", start)], submit)
    scheduler._tick()
    assert submitted == [schedules.job_id("s", start)]
    assert store.calls == ["due", "claim"]
    # Asleep until the next due time (10:00:02), not polling meanwhile.
    clock.advance(1.9)
    assert store.calls == ["due", "claim"]
    clock.advance(0.2)
    assert submitted[-1] == schedules.job_id("s", start.replace(second=2))
    assert len(submitted) == 2 and scheduler.runs == 2
    scheduler.stop()
    clock.advance(10)
    assert len(submitted) == 2 and not clock.getDelayedCalls()


def test_a_job_that_cannot_be_submitted_skips_its_due_time_but_an_unavailable_service_retries():
    calls = []

    def submit(name, payload, job_id):
        calls.append(job_id)
        if len(calls) == 1:
            return defer.fail(InvalidArguments("too big"))
        return defer.fail(JobServiceUnavailable("stopping"))

    start = datetime(2026, 1, 1, 10, tzinfo=UTC)
    clock, store, scheduler = scheduler_with([row("s", "* * * * * *", start)], submit)
    scheduler._tick()
    # Skipped: claimed all the same, so it is not retried at once.
    assert store.calls == ["due", "claim"]
    clock.advance(1.01)
    # The service is unavailable: not claimed, tried again after RETRY_AFTER.
    assert store.calls == ["due", "claim", "due"]
    [retry] = clock.getDelayedCalls()
    assert retry.getTime() - clock.seconds() == pytest.approx(schedules.RETRY_AFTER)
    scheduler.stop()


def test_a_node_that_lost_a_claim_looks_again_at_the_next_due_time():
    def submit(name, payload, job_id):
        return defer.succeed({"id": job_id})

    start = datetime(2026, 1, 1, 10, tzinfo=UTC)
    clock, store, scheduler = scheduler_with([row("s", "*/2 * * * * *", start)], submit)
    store.other_node = True
    scheduler._tick()
    assert store.calls == ["due", "claim"] and scheduler.runs == 0
    # Not MAX_SLEEP: the other node may stop, this one takes over at the next due time.
    [timer] = clock.getDelayedCalls()
    assert timer.getTime() - clock.seconds() == pytest.approx(2.005)
    store.other_node = False
    clock.advance(2.005)
    assert scheduler.runs == 1
    scheduler.stop()
