"""
A group-commit thread: database work from the reactor, one transaction for
everything queued at once.

The reactor never touches the database. It calls L{GroupCommitThread.run}
with a function; the thread takes every operation queued so far, runs them
all in one transaction (and, should one fail, each in a transaction of its
own, so one failure does not undo the others), commits once, and hands each
result back to the reactor as the firing of its Deferred. Under load, many
operations share one commit; an idle thread costs nothing (it blocks on its
queue, it does not poll). A Deferred fires only after the commit that made
its change durable.

Nothing here knows about jobs; values that only the latest counts for
(progress reports) are I{coalesced}: L{GroupCommitThread.coalesce} keeps the
newest value per key, written with the next batch.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from twistedlrp.jobs.errors import JobServiceUnavailable

log = Logger()

_STOP = object()
_WAKE = object()


class GroupCommitThread:
    """
    @param write_coalesced: called in the thread, inside a batch's
        transaction, with the dict of coalesced values gathered since the
        last batch.
    @param begin_batch: called in the thread before each batch (to prepare
        the connection).
    """

    # Called in the thread with each batch's size (the job metrics), if set.
    observe_batch: Callable[[int], None] | None = None

    def __init__(
        self,
        reactor,
        name: str,
        write_coalesced: Callable[[dict], None],
        begin_batch: Callable[[], None] = lambda: None,
    ):
        self.reactor = reactor
        self.name = name
        self._write_coalesced = write_coalesced
        self._begin_batch = begin_batch
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._coalesced: dict = {}
        self._coalesced_lock = threading.Lock()
        self._stopped = defer.Deferred()
        self.batches = 0
        self.operations = 0
        self.closed = False

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
        self._thread.start()

    def run(self, fn: Callable[..., Any], *args: Any) -> defer.Deferred:
        """
        Run C{fn(*args)} in the thread, inside a transaction.

        @return: a Deferred that fires, in the reactor, with C{fn}'s result
            once the transaction is committed, or fails with its exception
            (L{JobServiceUnavailable} once the thread is stopping).
        """
        return self._put(fn, args, False)

    def run_alone(self, fn: Callable[..., Any], *args: Any) -> defer.Deferred:
        """Like L{run}, but outside any transaction (for PRAGMAs and checks)."""
        return self._put(fn, args, True)

    def _put(self, fn, args, alone: bool) -> defer.Deferred:
        if self.closed:
            return defer.fail(JobServiceUnavailable("the job store is closed"))
        d = defer.Deferred()
        self._queue.put((fn, args, d, alone))
        return d

    def coalesce(self, key, value) -> None:
        """Keep C{value} as the newest for C{key}; it is written with the next batch."""
        with self._coalesced_lock:
            first = not self._coalesced
            self._coalesced[key] = value
        if first:
            self._queue.put(_WAKE)

    def stop(self) -> defer.Deferred:
        """
        Finish the queued operations, then end the thread.

        @return: a Deferred that fires when the thread has ended.
        """
        if not self.closed:
            self.closed = True
            if self._thread is None:
                self._stopped.callback(None)
            else:
                self._queue.put(_STOP)
        return self._stopped

    # -- in the thread ---------------------------------------------------------

    def _loop(self) -> None:
        from django.db import connection

        try:
            while True:
                items = [self._queue.get()]
                while True:
                    try:
                        items.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
                stopping = _STOP in items
                ops = [item for item in items if item is not _STOP and item is not _WAKE]
                for op in [op for op in ops if op[3]]:
                    self._run_alone(op)
                ops = [op for op in ops if not op[3]]
                if ops or self._coalesced:
                    self._run_batch(ops)
                if stopping:
                    break
        finally:
            connection.close()
            self.reactor.callFromThread(self._stopped.callback, None)

    def _run_alone(self, op) -> None:
        fn, args, d, _ = op
        try:
            self._begin_batch()
            outcome, failed = fn(*args), False
        except Exception:
            outcome, failed = Failure(), True
        self.reactor.callFromThread(_deliver, [(d, outcome, failed)])

    def _run_batch(self, ops: list) -> None:
        from django.db import transaction

        with self._coalesced_lock:
            coalesced, self._coalesced = self._coalesced, {}
        self._begin_batch()
        try:
            # The common case: every operation succeeds, one commit for all.
            with transaction.atomic():
                results = [(fn(*args), False) for fn, args, _, _ in ops]
                if coalesced:
                    self._write_coalesced(coalesced)
        except Exception:
            # One of them failed (an unknown id, a broken row): the batch
            # was rolled back; run each alone so the others still succeed.
            results = []
            for fn, args, _, _ in ops:
                try:
                    with transaction.atomic():
                        results.append((fn(*args), False))
                except Exception:
                    results.append((Failure(), True))
            if coalesced:
                try:
                    with transaction.atomic():
                        self._write_coalesced(coalesced)
                except Exception:
                    log.failure("{name} could not write its coalesced values", name=self.name)
        self.batches += 1
        self.operations += len(ops)
        if ops and self.observe_batch is not None:
            self.observe_batch(len(ops))
        if ops:
            self.reactor.callFromThread(
                _deliver, [(d, r, f) for (_, _, d, _), (r, f) in zip(ops, results, strict=True)]
            )


def _deliver(items) -> None:
    for d, result, failed in items:
        if failed:
            d.errback(result)
        else:
            d.callback(result)
