"""
:func:`call_in_reactor`, the one way from a Django thread into the reactor:
``blockingCallFromThread`` with a timeout, failing at once at shut-down
instead of hanging (Twisted issue 10124). With no running reactor
(``manage.py shell``) the first call starts one in a daemon thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.python import threadable
from twisted.python.failure import Failure

DEFAULT_TIMEOUT = 30.0


class ShutdownInProgress(RuntimeError):
    """The server is shutting down and no longer runs calls in the reactor."""


_serving = False  # twistd lrp runs the reactor: this module never starts one
_shutting_down = False
_lock = threading.Lock()
_pending: set[_Call] = set()
_reactor_thread: threading.Thread | None = None


class _Call:
    def __init__(self):
        self.event = threading.Event()
        self.deferred: defer.Deferred | None = None
        self.outcome: Any = None  # the result, or a Failure

    def finish(self, outcome) -> None:
        if not self.event.is_set():
            self.outcome = outcome
            self.event.set()

    def cancel(self) -> None:
        if self.deferred is not None and not self.deferred.called:
            self.deferred.cancel()


def _reactor():
    from twisted.internet import reactor

    return reactor


def serving_reactor() -> None:
    """Note that twistd owns the reactor: never start one in a thread."""
    global _serving
    _serving = True


def twistd_runs_reactor() -> bool:
    """@return: whether twistd lrp runs this process's reactor (never one started here)."""
    return _serving


def in_reactor_thread() -> bool:
    return threadable.isInIOThread()


def begin_shutdown() -> None:
    """Fail every later and waiting L{call_in_reactor} with L{ShutdownInProgress}."""
    global _shutting_down
    with _lock:
        _shutting_down = True
        waiting = list(_pending)
    for call in waiting:
        call.finish(Failure(ShutdownInProgress("the server is shutting down")))


def _ensure_running(timeout: float) -> None:
    global _reactor_thread
    reactor = _reactor()
    if reactor.running:
        return
    if _serving:
        if threading.current_thread() is threading.main_thread():
            raise RuntimeError(
                "call_in_reactor() needs a running reactor; the server has not started it "
                "yet (call it from a view, a job or a hook, not at import time)"
            )
        return
    with _lock:
        if _reactor_thread is None:
            started = threading.Event()
            reactor.callWhenRunning(started.set)
            run = lambda: reactor.run(installSignalHandlers=False)  # noqa: E731
            _reactor_thread = threading.Thread(target=run, name="twistedlrp-reactor", daemon=True)
            _reactor_thread.start()
            if not started.wait(timeout):
                raise TimeoutError(f"the reactor did not start within {timeout} s")


def call_in_reactor(
    fn: Callable[..., Any], *args: Any, timeout: float = DEFAULT_TIMEOUT, **kwargs: Any
) -> Any:
    """
    Run C{fn(*args, **kwargs)} in the reactor thread and wait for its result.

    @return: the result of C{fn}, or of the Deferred or coroutine it returned.
    @raise TimeoutError: no result within C{timeout} seconds (its Deferred is cancelled).
    @raise ShutdownInProgress: the server is shutting down.
    @raise RuntimeError: called from the reactor thread itself (a deadlock).
    @raise Exception: whatever C{fn} raised or its Deferred failed with.
    """
    if in_reactor_thread():
        raise RuntimeError(
            "call_in_reactor() was called from the reactor thread; call the function directly"
        )
    if _shutting_down:
        raise ShutdownInProgress("the server is shutting down")
    _ensure_running(timeout)
    call = _Call()
    with _lock:
        _pending.add(call)

    def run_in_reactor():
        if _shutting_down:
            call.finish(Failure(ShutdownInProgress("the server is shutting down")))
            return
        call.deferred = defer.maybeDeferred(fn, *args, **kwargs)
        call.deferred.addBoth(call.finish)

    try:
        _reactor().callFromThread(run_in_reactor)
        if not call.event.wait(timeout):
            _reactor().callFromThread(call.cancel)
            name = getattr(fn, "__qualname__", None) or repr(fn)
            raise TimeoutError(f"{name} did not finish within {timeout} s")
    finally:
        with _lock:
            _pending.discard(call)
    if isinstance(call.outcome, Failure):
        call.outcome.raiseException()
    return call.outcome
