"""
The web thread pool (twistedlrp.web.pool): its bound on waiting work, its
counts, its clean-up in each thread and a stop that never blocks the
reactor. Real threads; the reactor is a queue of calls this test runs.
"""

from __future__ import annotations

import queue
import threading
import time

import pytest
from twisted.logger import globalLogPublisher

from twistedlrp.web.pool import Replies, ThreadPool

DEADLINE = 10.0


class ReactorCalls:
    """What the pool needs of a reactor: C{callFromThread}, run when the test says."""

    def __init__(self):
        self.calls: queue.SimpleQueue = queue.SimpleQueue()

    def callFromThread(self, fn, *args):
        self.calls.put((fn, args))

    def run_until(self, condition, message: str) -> None:
        deadline = time.monotonic() + DEADLINE
        while not condition():
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out waiting for {message}")
            try:
                fn, args = self.calls.get(timeout=min(left, 0.05))
            except queue.Empty:
                continue
            fn(*args)


def wait_until(condition, message: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {message}")
        time.sleep(0.001)


@pytest.fixture
def reactor():
    return ReactorCalls()


def blocker(release: threading.Event, started: list):
    def task():
        started.append(threading.current_thread().name)
        assert release.wait(DEADLINE), "the test never released the task"

    return task


def test_work_beyond_idle_threads_and_the_waiting_bound_is_refused(reactor):
    pool = ThreadPool(reactor, size=2, max_waiting=1, name="t")
    pool.start()
    release, started = threading.Event(), []
    try:
        assert pool.submit(blocker(release, started))
        assert pool.submit(blocker(release, started))
        wait_until(lambda: pool.busy == 2, "both threads busy")
        assert pool.stats() == {"busy": 2, "idle": 0, "waiting": 0, "size": 2}
        # One may wait for a thread; the next is shed at once.
        assert pool.submit(blocker(release, started))
        assert pool.stats()["waiting"] == 1
        assert not pool.submit(blocker(release, started))
    finally:
        release.set()
    wait_until(lambda: pool.busy == 0 and pool.waiting == 0, "the pool idle again")
    assert len(started) == 3
    assert sorted(set(started)) == ["t-0", "t-1"]


def test_nothing_is_accepted_before_start_or_after_stop(reactor):
    pool = ThreadPool(reactor, size=1, max_waiting=5)
    assert not pool.submit(lambda: None)
    pool.start()
    stopped = pool.stop()
    assert not pool.submit(lambda: None)
    reactor.run_until(lambda: stopped.called, "the pool stopped")


def test_stop_runs_what_is_queued_and_fires_once_every_thread_ran_its_clean_up(reactor):
    exited = []
    pool = ThreadPool(
        reactor, size=2, max_waiting=10, on_thread_exit=lambda: exited.append(1), name="t"
    )
    pool.start()
    release, started = threading.Event(), []
    ran = []
    for _ in range(2):
        assert pool.submit(blocker(release, started))
    wait_until(lambda: pool.busy == 2, "both threads busy")
    for n in range(3):
        assert pool.submit(lambda n=n: ran.append(n))
    stopped = pool.stop()
    # The reactor is not blocked: stop returned while the work still runs.
    assert not stopped.called
    release.set()
    reactor.run_until(lambda: stopped.called, "the pool stopped")
    assert sorted(ran) == [0, 1, 2]
    assert exited == [1, 1]
    assert pool.stats()["idle"] == 0
    # A second stop is the same, already fired.
    assert pool.stop().called


def test_a_failing_task_is_logged_and_its_thread_goes_on(reactor):
    events = []
    globalLogPublisher.addObserver(events.append)
    pool = ThreadPool(reactor, size=1, max_waiting=5, name="t")
    pool.start()
    try:

        def fails():
            raise ValueError("boom")

        done = threading.Event()
        assert pool.submit(fails)
        assert pool.submit(done.set)
        assert done.wait(DEADLINE)
    finally:
        globalLogPublisher.removeObserver(events.append)
        stopped = pool.stop()
        reactor.run_until(lambda: stopped.called, "the pool stopped")
    failures = [e for e in events if "log_failure" in e]
    assert len(failures) == 1
    assert failures[0]["log_failure"].check(ValueError)
    assert failures[0]["pool"] == "t"


def test_a_failing_clean_up_is_logged_and_the_pool_still_stops(reactor):
    events = []
    globalLogPublisher.addObserver(events.append)

    def clean_up():
        raise RuntimeError("no connection to close")

    pool = ThreadPool(reactor, size=2, max_waiting=5, on_thread_exit=clean_up)
    pool.start()
    try:
        stopped = pool.stop()
        reactor.run_until(lambda: stopped.called, "the pool stopped")
    finally:
        globalLogPublisher.removeObserver(events.append)
    failures = [e for e in events if "log_failure" in e]
    assert [f["log_failure"].check(RuntimeError) for f in failures] == [RuntimeError] * 2


def test_replies_made_before_the_reactor_runs_them_share_one_wake_up(reactor):
    replies = Replies(reactor)
    ran = []
    threads = [
        threading.Thread(
            target=lambda n=n: [replies.callFromThread(ran.append, (n, i)) for i in range(50)]
        )
        for n in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(DEADLINE)
    # 200 calls, one wake-up of the reactor; each thread's calls in order.
    assert reactor.calls.qsize() == 1
    reactor.run_until(lambda: len(ran) == 200, "the replies")
    for n in range(4):
        assert [i for m, i in ran if m == n] == list(range(50))
    # Once run, the next call wakes the reactor again.
    replies.callFromThread(ran.append, "next")
    reactor.run_until(lambda: ran[-1] == "next", "a reply after the batch")


def test_a_failing_reply_is_logged_and_the_others_run(reactor):
    events = []
    replies = Replies(reactor)
    ran = []
    replies.callFromThread(lambda: 1 / 0)
    replies.callFromThread(ran.append, 1)
    globalLogPublisher.addObserver(events.append)
    try:
        reactor.run_until(lambda: ran == [1], "the reply after the failing one")
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert [e["log_failure"].check(ZeroDivisionError) for e in events if "log_failure" in e] == [
        ZeroDivisionError
    ]
