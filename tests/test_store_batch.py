"""
The group-commit thread (jobs/store/batch.py) when its PostgreSQL
connection breaks: an operation whose transaction broke before its commit
runs again (once); one whose commit was sent when the connection broke is
looked up (txid_status) and, committed, delivered without running again,
else run again; an operation with a deadline that cannot run in time is
withdrawn and never runs. Django is set up in a child process of its own,
driven by a minimal reactor; the database is a fresh one on the
LRP_TEST_POSTGRES server.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from support import PG_DJANGO_CHILD, pg_ensure, pg_name, postgres

pytestmark = pytest.mark.skipif(not postgres(), reason="needs PostgreSQL (LRP_TEST_POSTGRES)")

SCRIPT = PG_DJANGO_CHILD + textwrap.dedent(
    """
    import queue, time
    from django.db import connection, utils
    from django.db.backends.postgresql.base import DatabaseWrapper

    from twistedlrp.jobs.store.batch import Availability
    from twistedlrp.jobs.store.batch import StoreUnavailable
    from twistedlrp.jobs.store.batch import GroupCommitThread


    class Reactor:
        def __init__(self):
            self.calls = queue.SimpleQueue()
            self.now = 0.0
            self.timers = []

        def seconds(self):
            return self.now

        def callFromThread(self, f, *args):
            self.calls.put((f, args))

        def callLater(self, delay, f, *args):
            self.timers.append(Timer(self, self.now + delay, f, args))
            return self.timers[-1]

        def until(self, d, timeout=30):
            deadline = time.monotonic() + timeout
            while not d.called:
                f, args = self.calls.get(timeout=max(deadline - time.monotonic(), 0.01))
                f(*args)
            out = []
            d.addBoth(out.append)
            return out[0]


    class Timer:
        def __init__(self, reactor, when, f, args):
            self.when, self.f, self.args, self.live = when, f, args, True

        def active(self):
            return self.live

        def cancel(self):
            self.live = False

        def fire(self):
            self.live = False
            self.f(*self.args)


    with connection.cursor() as cursor:
        cursor.execute("CREATE TABLE t (name text)")
    connection.close()

    reactor = Reactor()
    thread = GroupCommitThread(reactor, "test-store", write_coalesced=lambda values: None)
    thread.availability = Availability(reactor)
    thread.start()
    runs = []
    # How the commit of the next transaction breaks: None, "after" or "before" the commit.
    breaking = {"commit": None}
    real_commit = DatabaseWrapper._commit

    def commit(self):
        how, breaking["commit"] = breaking["commit"], None
        if how == "before":
            self.connection.close()
            raise utils.OperationalError("the connection broke before the commit")
        real_commit(self)
        if how == "after":
            self.connection.close()
            raise utils.OperationalError("the connection broke after the commit")

    DatabaseWrapper._commit = commit

    def insert(name, kill=False):
        runs.append(name)
        with connection.cursor() as cursor:
            cursor.execute("INSERT INTO t VALUES (%s)", [name])
            if kill and runs.count(name) == 1:
                cursor.execute("SELECT pg_terminate_backend(pg_backend_pid())")
        return name

    def rows(name):
        with connection.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM t WHERE name = %s", [name])
            return cursor.fetchone()[0]

    # The server ends the session in the middle of the transaction: run again, once.
    assert reactor.until(thread.run(insert, "killed", True)) == "killed"
    assert runs.count("killed") == 2 and rows("killed") == 1
    # The commit happened but its answer was lost: delivered, not run again.
    breaking["commit"] = "after"
    assert reactor.until(thread.run(insert, "committed")) == "committed"
    assert runs.count("committed") == 1 and rows("committed") == 1
    # The connection broke before the commit: run again.
    breaking["commit"] = "before"
    assert reactor.until(thread.run(insert, "rolled back")) == "rolled back"
    assert runs.count("rolled back") == 2 and rows("rolled back") == 1
    # Each outage was logged once each way (no operation failed).
    assert thread.availability.outages == 3 and thread.availability.reason is None

    # An operation withdrawn at its deadline before the thread took it never
    # runs; one running at its deadline gets a tenth more: if it ends
    # meanwhile its result is delivered, else it fails as "may have run",
    # and its result, when it comes, is dropped.
    import threading

    started = threading.Event()

    def hold(seconds):
        started.set()
        time.sleep(seconds)
        return seconds

    held = thread.run(hold, 0.5, within=5)
    assert started.wait(10)
    started.clear()
    late = thread.run(insert, "withdrawn", within=0.2)
    reactor.timers[-1].fire()
    failure = reactor.until(late)
    assert failure.check(StoreUnavailable) and not failure.value.started, failure
    assert str(failure.value) == "the job store did not answer within 0.2 s", failure
    reactor.timers[-2].fire()  # held's deadline: it is running, a grace begins
    assert not held.called
    assert reactor.until(held) == 0.5
    slow = thread.run(hold, 1.0, within=5)
    assert started.wait(10)
    reactor.timers[-1].fire()
    reactor.timers[-1].fire()  # the grace ends too
    failure = reactor.until(slow)
    assert failure.check(StoreUnavailable) and failure.value.started, failure
    assert reactor.until(thread.run(insert, "after")) == "after"
    assert "withdrawn" not in runs and rows("withdrawn") == 0
    assert reactor.until(thread.stop()) is None
    print("OK", flush=True)
    """
)


def test_a_broken_connection_runs_nothing_twice_and_loses_nothing(tmp_path):
    db = tmp_path / "batch.sqlite3"
    pg_ensure(db)
    env = dict(os.environ, DB=pg_name(db))
    env.pop("DJANGO_SETTINGS_MODULE", None)
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and "OK" in done.stdout, done.stdout + done.stderr
