"""
call_in_reactor (twistedlrp.reactor_bridge), the bridge from a view's or a job's
thread to the reactor: answers, errors, deadlines and shut-down. The
reactor is a thread of this test that runs what it is handed, in order,
and counts as the reactor thread; tests/test_threads.py runs the real one.
"""

from __future__ import annotations

import queue
import threading
import time

import pytest
from twisted.internet import defer

from twistedlrp import reactor_bridge


class ReactorThread:
    """A thread that runs the calls handed to it, as the reactor would."""

    running = True

    def __init__(self):
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def callFromThread(self, fn, *args):
        self._calls.put((fn, args))

    def _run(self):
        while (item := self._calls.get()) is not None:
            fn, args = item
            fn(*args)

    def stop(self):
        self._calls.put(None)
        self.thread.join(5)


@pytest.fixture
def loop(monkeypatch):
    fake = ReactorThread()
    monkeypatch.setattr(reactor_bridge, "_reactor", lambda: fake)
    monkeypatch.setattr(reactor_bridge, "_shutting_down", False)
    # Which thread is Twisted's I/O thread is global (pytest-twisted's own
    # reactor may claim the main thread); this loop's thread stands for it.
    monkeypatch.setattr(
        reactor_bridge, "in_reactor_thread", lambda: threading.get_ident() == fake.thread.ident
    )
    yield fake
    fake.stop()


def test_plain_values_deferreds_and_coroutines_are_answered(loop):
    assert reactor_bridge.call_in_reactor(lambda a, b=0: a + b, 2, b=3) == 5

    def later():
        d = defer.Deferred()
        loop.callFromThread(d.callback, "later")
        return d

    assert reactor_bridge.call_in_reactor(later) == "later"

    async def coroutine():
        return await later()

    assert reactor_bridge.call_in_reactor(coroutine) == "later"


def test_errors_are_raised_in_the_calling_thread(loop):
    with pytest.raises(KeyError):
        reactor_bridge.call_in_reactor(lambda: {}["missing"])
    with pytest.raises(ZeroDivisionError):
        reactor_bridge.call_in_reactor(lambda: defer.fail(ZeroDivisionError()))


def test_a_call_past_its_timeout_raises_and_cancels_its_deferred(loop):
    pending = defer.Deferred()
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="did not finish within 0.2 s"):
        reactor_bridge.call_in_reactor(lambda: pending, timeout=0.2)
    assert time.monotonic() - started < 5
    cancelled = threading.Event()
    loop.callFromThread(lambda: pending.called and cancelled.set())
    assert cancelled.wait(5), "the Deferred was not cancelled"
    pending.addErrback(lambda f: f.trap(defer.CancelledError))


def test_shutdown_wakes_waiting_callers_and_refuses_later_calls(loop):
    errors = []
    never = defer.Deferred()

    def caller():
        try:
            reactor_bridge.call_in_reactor(lambda: never, timeout=30)
        except Exception as e:
            errors.append(e)

    waiting = threading.Thread(target=caller)
    waiting.start()
    deadline = time.monotonic() + 5
    while not reactor_bridge._pending and time.monotonic() < deadline:
        time.sleep(0.001)
    assert reactor_bridge._pending, "the call never started waiting"
    reactor_bridge.begin_shutdown()
    waiting.join(5)
    assert not waiting.is_alive()
    assert [type(e) for e in errors] == [reactor_bridge.ShutdownInProgress]
    with pytest.raises(reactor_bridge.ShutdownInProgress):
        reactor_bridge.call_in_reactor(lambda: 1)
    # It is a RuntimeError, as code catching the reactor's errors expects.
    assert issubclass(reactor_bridge.ShutdownInProgress, RuntimeError)


def test_a_call_from_the_reactor_thread_is_refused_rather_than_deadlocking(loop):
    answer = queue.SimpleQueue()

    def from_reactor():
        try:
            reactor_bridge.call_in_reactor(lambda: 1, timeout=1)
        except Exception as e:
            answer.put(e)

    loop.callFromThread(from_reactor)
    error = answer.get(timeout=5)
    assert isinstance(error, RuntimeError)
    assert "from the reactor thread" in str(error)
