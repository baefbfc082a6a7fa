"""
The dispatcher of a job node that shares its PostgreSQL database with
others: free workers claim from the table when woken, not from a queue in
memory, and claim no more until something may have changed; and a job
submitted when nothing is due is stored running on a worker reserved for it.
"""

from __future__ import annotations

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from twistedlrp.jobs.service.dispatch import Dispatcher
from twistedlrp.jobs.service.outcomes import Outcome
from twistedlrp.jobs.service.queue import JobRecord
from twistedlrp.jobs.states import SUCCEEDED
from twistedlrp.jobs.workers.pool import Worker

MIB = 1024 * 1024


@pytest.fixture(autouse=True)
def registered():
    """The job these tests claim is registered, as in a job service that imported it."""
    from twistedlrp.jobs import registry

    definition = registry.JobDefinition(name="testapp.jobs.add", function=lambda a, b: a + b)
    previous = registry.lookup(definition.name)
    registry.register(definition)
    yield
    if previous is None:
        registry._registry.pop(definition.name, None)
    else:
        registry.register(previous)


class FakeStore:
    """Records each operation; C{claim_next} answers are given by the test."""

    closed = False

    def __init__(self):
        self.calls = []
        self.claims: list[defer.Deferred] = []

    def run(self, operation, *args, within=None):
        self.calls.append((operation.__name__, args))
        if operation.__name__ == "claim_next":
            d = defer.Deferred()
            self.claims.append(d)
            return d
        if operation.__name__ == "finish":
            return defer.succeed({"lost": True} if args[0] == "lost-job" else None)
        return defer.succeed(None)

    def set_progress(self, *args):
        pass

    def named(self, name):
        return [args for op, args in self.calls if op == name]


class FakeProcess:
    # Above the kernel's largest pid: no signal can reach a real process.
    pid = 2**22 + 4321

    def __init__(self):
        self.written = b""

    def writeToChild(self, fd, data):
        self.written += data

    def closeChildFD(self, fd):
        pass

    signals: list[str] | None = None

    def signalProcess(self, name):
        if self.signals is None:
            raise AssertionError(f"no signal expected, got {name}")
        self.signals.append(name)


@pytest.fixture
def node(monkeypatch):
    monkeypatch.setenv("DJANGO_SETTINGS_MODULE", "testsite.settings")
    store = FakeStore()
    options = {
        "workers": 2,
        "pythonpath": [],
        "max-job-payload": MIB,
        "max-jobs-per-worker": 1000,
        "max-worker-memory": 0,
    }
    clock = Clock()
    dispatcher = Dispatcher(clock, store, options, {}, 5.0, "n1", True, ["a"])
    for _ in range(2):
        worker = Worker(dispatcher.pool)
        process = FakeProcess()
        process.pid += len(dispatcher.pool.workers)
        worker.makeConnection(process)
        dispatcher.pool.workers.append(worker)
        worker.became_ready()
    dispatcher.accepting = True
    return dispatcher, store, clock


def row(job_id, worker):
    return {
        "id": job_id,
        "worker": worker,
        "payload": b'{"args": [1, 2], "kwargs": {}}',
        "name": "testapp.jobs.add",
        "attempts": 1,
        "max_attempts": 1,
        "retry_delay": 0.0,
        "timeout": None,
        "priority": 0,
        "cancel_requested": False,
    }


def test_a_wake_claims_for_every_free_worker_then_nothing_until_the_next(node):
    dispatcher, store, clock = node
    dispatcher.wake()
    ((queues, name, idents, lease),) = store.named("claim_next")
    assert (queues, name, lease) == (["a"], "n1", None)
    workers = dispatcher.pool.workers
    assert idents == [w.ident for w in workers]
    assert all(w.state == "claiming" for w in workers)
    # One claim at a time: a dispatch meanwhile starts no second one.
    dispatcher.dispatch()
    assert len(store.named("claim_next")) == 1
    # One job for two workers: the table has no more.
    store.claims[0].callback({"claimed": [row("j1", idents[0])], "next_due": None})
    assert len(store.named("claim_next")) == 1
    assert workers[0].state == "busy" and "j1" in dispatcher.running
    assert workers[1].state == "idle"
    # Nothing more in the table and no wake since: a free worker claims nothing.
    dispatcher.dispatch()
    assert len(store.named("claim_next")) == 1
    dispatcher.wake()
    assert store.named("claim_next")[1][2] == [workers[1].ident]


def test_a_wake_during_a_claim_claims_again(node):
    dispatcher, store, clock = node
    dispatcher.wake()
    dispatcher.wake()  # a notification arrives while the first claim runs
    store.claims[0].callback({"claimed": [], "next_due": None})
    assert len(store.named("claim_next")) == 2


def test_the_first_delayed_job_wakes_the_node_when_due(node):
    dispatcher, store, clock = node
    dispatcher.wake()
    store.claims[0].callback({"claimed": [], "next_due": clock.seconds() + 30})
    clock.advance(29)
    assert len(store.named("claim_next")) == 1
    clock.advance(1.1)
    assert len(store.named("claim_next")) == 2


def test_a_claim_answered_while_stopping_puts_its_jobs_back(node):
    dispatcher, store, clock = node
    dispatcher.wake()
    idents = store.named("claim_next")[0][2]
    dispatcher.stop_accepting()
    store.claims[0].callback({"claimed": [row("j1", idents[0])], "next_due": None})
    assert not dispatcher.running
    ((job_id, _, count_attempt, name),) = store.named("requeue")
    assert (job_id, count_attempt, name) == ("j1", False, "n1")


def test_an_outcome_is_recorded_only_while_this_node_holds_the_job(node):
    """The store is told the node: it changes the job only if that node still holds it."""
    dispatcher, store, clock = node
    dispatcher.wake()
    idents = store.named("claim_next")[0][2]
    store.claims[0].callback(
        {"claimed": [row("ok-job", idents[0]), row("lost-job", idents[1])], "next_due": None}
    )
    for job_id in ("ok-job", "lost-job"):
        dispatcher._job_ended(dispatcher.running[job_id], Outcome(True, 3))
    finishes = store.named("finish")
    assert [(f[0], f[1], f[4]) for f in finishes] == [
        ("ok-job", SUCCEEDED, "n1"),
        ("lost-job", SUCCEEDED, "n1"),
    ]


# -- jobs stored running on a reserved worker ----------------------------------------------


def found_nothing(dispatcher, store):
    """Let a claim find the table empty: nothing is due ahead of a new job."""
    dispatcher.wake()
    store.claims[-1].callback({"claimed": [], "next_due": None})
    assert not dispatcher.claims.wanted


def record(job_id):
    return JobRecord(
        job_id,
        0,
        name="testapp.jobs.add",
        max_attempts=1,
        payload=b'{"args": [1, 2], "kwargs": {}}',
    )


def test_no_worker_is_reserved_while_the_table_may_hold_due_jobs(node):
    dispatcher, store, clock = node
    # At start (and after any wake) the table may hold work for the free workers.
    assert dispatcher.reserve("j1") is None
    found_nothing(dispatcher, store)
    dispatcher.wake()  # a notification from another node
    assert dispatcher.reserve("j1") is None


def test_a_reserved_worker_waits_for_its_job_to_be_stored_then_runs_it(node):
    dispatcher, store, clock = node
    found_nothing(dispatcher, store)
    first, second = dispatcher.reserve("j1"), dispatcher.reserve("j2")
    assert first.worker is not second.worker
    assert first.worker.state == second.worker.state == "claiming"
    assert set(dispatcher.claiming) == {"j1", "j2"}
    # Both workers are held: a third job is stored queued, as before.
    assert dispatcher.reserve("j3") is None
    # Stopping would wait for both.
    assert len(dispatcher.claiming) == 2
    job = record("j1")
    dispatcher.start_reserved(first, job)
    assert dispatcher.running["j1"] is job and job.attempts == 1
    assert first.worker.state == "busy" and b"RunJob" in first.worker.transport.written
    dispatcher.release(second)
    assert second.worker.state == "idle"
    assert not dispatcher.claiming
    assert store.named("claim") == []  # no claim of their own


def test_a_reserved_worker_that_died_meanwhile_sends_its_job_back_without_an_attempt(node):
    dispatcher, store, clock = node
    found_nothing(dispatcher, store)
    reservation = dispatcher.reserve("j1")
    reservation.worker.state = "dead"
    job = record("j1")
    dispatcher.start_reserved(reservation, job)
    assert "j1" not in dispatcher.running
    ((job_id, error, count_attempt, node_name),) = store.named("requeue")
    assert (job_id, count_attempt, node_name) == ("j1", False, "n1")
    assert "its worker ended before the job started" in error
    # Its claim, when a worker takes it, counts the first attempt.
    assert job.attempts == 0
    assert not dispatcher.claiming and reservation.done.called
    # Back in the table: the free worker claims again.
    assert len(store.named("claim_next")) == 2


# -- fencing: a node that could not renew its lease --------------------------------------


def test_fencing_kills_the_running_jobs_records_nothing_and_claims_nothing(node):
    dispatcher, store, clock = node
    dispatcher.wake()
    idents = store.named("claim_next")[0][2]
    store.claims[0].callback({"claimed": [row("j1", idents[0])], "next_due": None})
    worker = dispatcher.running["j1"].worker
    worker.transport.signals = []
    calls = len(store.calls)
    assert dispatcher.fence() == ["j1"]
    assert worker.kill_reason == "fence" and worker.transport.signals == ["KILL"]
    assert not dispatcher.running
    # Its outcome, or its worker's death, is not recorded (the store is not told anything).
    dispatcher._job_ended(record("j1"), Outcome(True, 3))
    dispatcher._worker_died(worker, "j1", "killed by signal 9")
    assert len(store.calls) == calls
    # No claim and no reservation while fenced, whatever wakes it.
    dispatcher.wake()
    dispatcher.claims.wanted = False
    assert dispatcher.reserve("j2") is None
    assert len(store.named("claim_next")) == 1
    dispatcher.unfence()
    assert len(store.named("claim_next")) == 2


def test_a_claim_answered_after_the_fence_starts_nothing_and_gives_the_job_back(node):
    dispatcher, store, clock = node
    dispatcher.wake()
    idents = store.named("claim_next")[0][2]
    dispatcher.fence()
    store.claims[0].callback({"claimed": [row("j1", idents[0])], "next_due": None})
    assert not dispatcher.running
    assert all(w.state == "idle" for w in dispatcher.pool.workers)
    ((job_id, _, count_attempt, name),) = store.named("requeue")
    assert (job_id, count_attempt, name) == ("j1", False, "n1")


def test_a_claim_refused_for_a_stale_lease_frees_the_workers_and_tries_again(node):
    dispatcher, store, clock = node
    dispatcher.claims.lease_check = 27.0
    dispatcher.wake()
    assert store.named("claim_next")[0][3] == 27.0
    store.claims[0].callback({"claimed": [], "next_due": None, "no_lease": True})
    assert all(w.state == "idle" for w in dispatcher.pool.workers)
    assert dispatcher.claims.wanted
    clock.advance(1.0)
    assert len(store.named("claim_next")) == 2


def test_a_forked_worker_ready_before_its_pid_arrives_is_claimed_for_under_its_own_pid(node):
    # A worker forked from the template says "ready" on its pipe; the template
    # says its pid on another channel, which can come second. A job claimed
    # for it meanwhile was recorded as held by "host:None" and never started.
    dispatcher, store, clock = node
    pool = dispatcher.pool
    pool.workers.clear()
    forked = Worker(pool)
    pool.workers.append(forked)
    forked.became_ready(FakeProcess.pid + 7)  # and claims at once
    ((_, _, idents, _),) = store.named("claim_next")
    assert idents == [forked.ident] and not forked.ident.endswith(":None")
    forked.forked(FakeProcess.pid + 7)  # the template's word, late: the same pid
    store.claims[0].callback({"claimed": [row("j1", idents[0])], "next_due": None})
    assert forked.state == "busy" and "j1" in dispatcher.running
