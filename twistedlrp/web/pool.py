"""
The thread pool that runs the WSGI application. Unlike Twisted's, it bounds the
requests waiting for a thread (beyond, 503 at once), runs a clean-up in each
thread as it exits, and stops without blocking the reactor.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger

from twistedlrp.ordered_service import Waiters

log = Logger()

_STOP = object()


class ThreadPool(service.Service):
    """C{size} daemon threads taking work from one queue; a service of the server."""

    stop_description = "stopping the thread pool"

    def __init__(
        self,
        reactor,
        size: int,
        max_waiting: int,
        name: str = "lrp-web",
        on_thread_exit: Callable[[], None] | None = None,
    ):
        self._reactor = reactor
        self.size = size
        self.max_waiting = max_waiting
        self.name = name
        self._on_thread_exit = on_thread_exit
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self.busy = 0
        self.waiting = 0
        self._alive = 0
        self._stopping = False
        self._stopped = Waiters()
        self.started = False

    @property
    def idle(self) -> int:
        return max(0, self._alive - self.busy)

    def start(self) -> None:
        """Start the threads (once, after daemonising, never before)."""
        self.started = True
        for number in range(self.size):
            thread = threading.Thread(target=self._work, name=f"{self.name}-{number}", daemon=True)
            self._alive += 1
            thread.start()

    def startService(self) -> None:
        super().startService()
        self.start()

    def stopService(self) -> defer.Deferred:
        super().stopService()
        return self.stop()

    def submit(self, task: Callable[[], None]) -> bool:
        """Queue C{task}: @return: C{False} if the pool is saturated or stopped."""
        with self._lock:
            if self._stopping or not self.started:
                return False
            if self.waiting >= self.idle + self.max_waiting:
                return False
            self.waiting += 1
        self._queue.put(task)
        return True

    def _work(self) -> None:
        try:
            while True:
                task = self._queue.get()
                if task is _STOP:
                    return
                with self._lock:
                    self.waiting -= 1
                    self.busy += 1
                try:
                    task()
                except BaseException:
                    log.failure("Unhandled error in a {pool} thread", pool=self.name)
                finally:
                    with self._lock:
                        self.busy -= 1
        finally:
            if self._on_thread_exit is not None:
                try:
                    self._on_thread_exit()
                except BaseException:
                    log.failure("Error while a {pool} thread was exiting", pool=self.name)
            self._reactor.callFromThread(self._thread_exited)

    def _thread_exited(self) -> None:
        self._alive -= 1
        if self._alive == 0 and self._stopping:
            self._stopped.fire()

    def stop(self) -> defer.Deferred:
        """Let the threads finish what is queued: @return: a Deferred fired once all have exited."""
        if not self._stopping:
            self._stopping = True
            for _ in range(self._alive):
                self._queue.put(_STOP)
        if self._alive == 0:
            return defer.succeed(None)
        return self._stopped.wait()

    def stats(self) -> dict:
        return {"busy": self.busy, "idle": self.idle, "waiting": self.waiting, "size": self.size}


class Replies:
    """
    The pool threads' calls into the reactor, in order, one wake-up per batch
    (each C{callFromThread} writes to the waker, and hands the GIL over).
    """

    def __init__(self, reactor):
        self._reactor = reactor
        self._lock = threading.Lock()
        self._calls: list = []

    @property
    def running(self) -> bool:
        return getattr(self._reactor, "running", True)

    def callFromThread(self, fn: Callable, *args) -> None:
        """Call C{fn(*args)} in the reactor thread, after the calls made before it."""
        with self._lock:
            self._calls.append((fn, args))
            if len(self._calls) > 1:
                return  # the reactor is woken already and takes this one too
        self._reactor.callFromThread(self._run)

    def _run(self) -> None:
        with self._lock:
            calls, self._calls = self._calls, []
        for fn, args in calls:
            try:
                fn(*args)
            except BaseException:
                log.failure("Error in a call from a web thread")
