"""
The job service's watchdog (twistedlrp.jobs.service.lease) on a fake clock: a
running job whose worker is gone or holds another job is handed back to
the dispatcher; the store's running jobs that nobody holds are ended by
their retry policy and queued again; a store that cannot be reached is
reported once; a fenced node leaves the store alone.
"""

from __future__ import annotations

from datetime import UTC, datetime
from types import SimpleNamespace

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher

from twistedlrp.jobs.service.lease import CHECK_INTERVAL, CLAIM_GRACE, STORE_INTERVAL, Watchdog
from twistedlrp.jobs.service.queue import JobRecord
from twistedlrp.jobs.states import QUEUED

# Above the kernel's largest pid: no process has it.
NO_SUCH_PID = 2**22 + 4321


class Dispatcher:
    """What the watchdog reads of the dispatcher, and what it tells it."""

    def __init__(self):
        self.running: dict[str, JobRecord] = {}
        self.claiming: set[str] = set()
        self.pool = SimpleNamespace(workers=[])
        self.accepting = True
        self.fenced = False
        self.orphans: list[tuple[str, str]] = []
        self.enqueued: list[JobRecord] = []

    def orphaned(self, record, reason):
        self.orphans.append((record.id, reason))

    def enqueue(self, record):
        self.enqueued.append(record)


class Store:
    """Answers C{running_on} with C{rows} (or C{error}); C{end_orphan} with C{after}."""

    def __init__(self):
        self.rows: list[dict] = []
        self.error: Exception | None = None
        self.after: dict | None = None
        self.calls: list[tuple[str, tuple]] = []

    def run(self, operation, *args, within=None):
        self.calls.append((operation.__name__, args))
        if operation.__name__ == "running_on":
            return defer.fail(self.error) if self.error else defer.succeed(self.rows)
        return defer.succeed(self.after)

    def named(self, name):
        return [args for op, args in self.calls if op == name]


def worker(pid, job_id=None, state="busy"):
    return SimpleNamespace(pid=pid, job_id=job_id, state=state)


@pytest.fixture
def watched():
    clock, dispatcher, store = Clock(), Dispatcher(), Store()
    clock.advance(1_000_000)
    dog = Watchdog(clock, dispatcher, store, "host:", node="n1")
    dog.start()
    yield clock, dispatcher, store, dog
    dog.stop()


@pytest.fixture
def logged():
    events = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def running(dispatcher, job_id, holder):
    record = JobRecord(job_id)
    record.worker = holder
    dispatcher.running[job_id] = record
    return record


def test_a_job_whose_worker_ended_or_moved_on_is_handed_back_at_the_next_check(watched):
    clock, dispatcher, _, _ = watched
    alive = worker(NO_SUCH_PID - 1, "held")
    dispatcher.pool.workers = [alive]
    # A worker the pool still lists, but whose process is gone.
    running(dispatcher, "held", alive)
    gone = worker(NO_SUCH_PID + 1, "dead-job", state="dead")
    running(dispatcher, "dead-job", gone)
    elsewhere = worker(NO_SUCH_PID + 2, "other-job")
    dispatcher.pool.workers.append(elsewhere)
    running(dispatcher, "moved-on", elsewhere)
    running(dispatcher, "nobody", None)
    clock.advance(CHECK_INTERVAL - 0.01)
    assert dispatcher.orphans == []
    clock.advance(0.01)
    assert sorted(dispatcher.orphans) == [
        ("dead-job", f"worker process {NO_SUCH_PID + 1} has ended"),
        ("held", f"worker process {NO_SUCH_PID - 1} does not exist"),
        ("moved-on", f"worker process {NO_SUCH_PID + 2} runs another job"),
        ("nobody", "no worker was recorded"),
    ]


def test_a_job_held_by_a_live_worker_is_left_alone(watched):
    import os

    clock, dispatcher, _, _ = watched
    me = worker(os.getpid(), "mine")
    dispatcher.pool.workers = [me]
    running(dispatcher, "mine", me)
    clock.advance(CHECK_INTERVAL * 3)
    assert dispatcher.orphans == []


def test_the_stores_running_jobs_that_nobody_holds_are_ended_and_queued_again(watched):
    clock, dispatcher, store, _ = watched
    running(dispatcher, "here", None).worker = worker(1)
    dispatcher.claiming.add("being-claimed")
    store.rows = [
        {"id": "here", "worker": "host:1", "attempts": 1},
        {"id": "being-claimed", "worker": None, "attempts": 1},
        {"id": "lost", "worker": "host:7", "attempts": 2},
    ]
    created = datetime(2026, 12, 7, tzinfo=UTC)
    store.after = {"state": QUEUED, "priority": 5, "created_at": created}
    # The first store check comes with the first watchdog check after STORE_INTERVAL.
    clock.advance(CHECK_INTERVAL)
    assert len(store.named("running_on")) == 1
    prefix, started_before, node = store.named("running_on")[0]
    assert (prefix, node) == ("host:", "n1")
    assert started_before == datetime.fromtimestamp(clock.seconds() - CLAIM_GRACE, UTC)
    assert store.named("end_orphan") == [
        (
            "lost",
            "the job was recorded as running on host:7 (attempt 2), which does not hold it",
            "n1",
        )
    ]
    assert [(r.id, r.priority, r.created) for r in dispatcher.enqueued] == [
        ("lost", 5, created.timestamp())
    ]
    # Not again before STORE_INTERVAL has passed.
    clock.advance(CHECK_INTERVAL)
    assert len(store.named("running_on")) == 1
    clock.advance(STORE_INTERVAL)
    assert len(store.named("running_on")) == 2


def test_an_orphan_that_failed_for_good_or_arrives_while_stopping_is_not_queued(watched):
    clock, dispatcher, store, _ = watched
    store.rows = [{"id": "lost", "worker": "host:7", "attempts": 1}]
    store.after = {"state": "failed", "priority": 0, "created_at": datetime.now(UTC)}
    clock.advance(CHECK_INTERVAL)
    assert len(store.named("end_orphan")) == 1
    store.after = {"state": QUEUED, "priority": 0, "created_at": datetime.now(UTC)}
    dispatcher.accepting = False
    clock.advance(STORE_INTERVAL + CHECK_INTERVAL)
    assert len(store.named("end_orphan")) == 2
    assert dispatcher.enqueued == []


def test_a_store_that_cannot_be_reached_is_reported_once_then_its_return(watched, logged):
    clock, _, store, dog = watched
    store.error = ConnectionError("connection refused")
    for _ in range(3):
        clock.advance(STORE_INTERVAL + CHECK_INTERVAL)
    assert dog.store_error == "connection refused"
    errors = [e for e in logged if "cannot be reached" in e.get("log_format", "")]
    assert len(errors) == 1
    store.error = None
    clock.advance(STORE_INTERVAL + CHECK_INTERVAL)
    assert dog.store_error is None
    assert [e for e in logged if "can be reached again" in e.get("log_format", "")]


def test_a_fenced_node_checks_its_workers_but_not_the_store(watched):
    clock, dispatcher, store, _ = watched
    dispatcher.fenced = True
    running(dispatcher, "nobody", None)
    clock.advance(STORE_INTERVAL * 3)
    assert store.named("running_on") == []
    assert dispatcher.orphans and dispatcher.orphans[0] == ("nobody", "no worker was recorded")
