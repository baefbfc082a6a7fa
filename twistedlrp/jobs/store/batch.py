"""
A group-commit thread: the operations queued so far run in one transaction
(should one fail, each in its own). While the database cannot be reached they
wait, and L{Availability} logs a WARNING when it is lost, one when it is back;
a commit the connection broke under is looked up (C{txid_status}).
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from twistedlrp.backoff import Backoff
from twistedlrp.jobs.errors import JobServiceUnavailable
from twistedlrp.ordered_service import cancel_call

log = Logger()

_STOP = object()
_WAKE = object()

# The longest wait between attempts to reach the database.
RECONNECT_MAX = 1.0

_QUEUED, _RUNNING, _ABANDONED = "queued", "running", "abandoned"


class StoreUnavailable(JobServiceUnavailable):
    """An operation could not run in time; C{started}: it may have run (else it did not)."""

    def __init__(self, message: str, started: bool):
        super().__init__(message)
        self.started = started


class Availability:
    """Kept in the reactor thread; C{wait}: how long a submission waits, for the log line."""

    def __init__(self, reactor):
        self.reactor = reactor
        self.wait: float | None = None
        # source -> why it cannot reach the database now
        self._lost: dict[str, str] = {}
        self.since = 0.0  # when the current outage began
        self.outages = 0

    @property
    def reason(self) -> str | None:
        """@return: why the store cannot be reached now, or C{None} when it can."""
        return next(iter(self._lost.values()), None)

    def lost(self, source: str, reason: str) -> None:
        """C{source} (a connection) cannot reach the database: C{reason}."""
        first = not self._lost
        self._lost.setdefault(source, reason)
        if not first:
            return
        self.since = self.reactor.seconds()
        self.outages += 1
        waits = f"submissions wait for it up to {self.wait:g} s, " if self.wait is not None else ""
        log.warn(
            "The job store cannot be reached: {reason}; {waits}outcomes of jobs are kept and "
            "written once it is back",
            reason=reason,
            waits=waits,
        )

    def back(self, source: str) -> None:
        """C{source} reaches the database (again)."""
        if self._lost.pop(source, None) is None or self._lost:
            return
        took = self.reactor.seconds() - self.since
        log.warn("The job store can be reached again, after {took:.1f} s", took=took)


def first_line(error: BaseException) -> str:
    """@return: the first line of C{error}'s text (its type's name when it has none)."""
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__


def broken(connection, raw) -> bool:
    """@return: whether Django's C{connection} is no longer the usable DB-API connection C{raw}."""
    current = connection.connection
    if current is None or (raw is not None and current is not raw):
        return True
    if getattr(current, "broken", False) or getattr(current, "closed", False):
        return True
    try:
        return not connection.is_usable()
    except Exception:
        return True


class _Op:
    __slots__ = ("fn", "args", "d", "alone", "state", "timer", "within", "graced")

    def __init__(self, fn, args, d, alone, within):
        self.fn, self.args, self.d, self.alone, self.within = fn, args, d, alone, within
        self.state, self.timer, self.graced = _QUEUED, None, False


class GroupCommitThread:
    """The callbacks run in the thread; C{observe_batch} (if set) gets each batch's size."""

    observe_batch: Callable[[int], None] | None = None
    availability = None

    def __init__(
        self,
        reactor,
        name: str,
        write_coalesced: Callable[[dict], None] = lambda _: None,
        begin_batch: Callable[[], None] = lambda: None,
        setup: Callable[[], None] = lambda: None,
    ):
        self.reactor, self.name = reactor, name
        self._write_coalesced, self._begin_batch, self._setup = write_coalesced, begin_batch, setup
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._coalesced: dict = {}
        # Guards the coalesced values and the state of operations (withdrawn by the
        # reactor, begun by the thread).
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._stopped = defer.Deferred()
        self.batches = self.operations = 0
        self.closed = False
        # In the thread: the database cannot be reached (since the last failure).
        self._away = False

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
        self._thread.start()

    def run(
        self, fn: Callable[..., Any], *args, within: float | None = None, alone: bool = False
    ) -> defer.Deferred:
        """
        @param within: seconds after which an operation that has not begun fails with
            L{StoreUnavailable}; one that has gets a tenth more (at most 1 s).
        @param alone: run it outside any transaction (for PRAGMAs, checks and reads).
        @return: a Deferred of C{fn(*args)} run in a transaction, fired once committed.
        """
        if self.closed:
            return defer.fail(JobServiceUnavailable("the job store is closed"))
        op = _Op(fn, args, None, alone, within)
        op.d = defer.Deferred(canceller=lambda _: self._withdraw(op, cancelled=True))
        if within is not None:
            op.timer = self.reactor.callLater(max(within, 0.0), self._withdraw, op)
        self._queue.put(op)
        return op.d

    def _withdraw(self, op: _Op, cancelled: bool = False) -> None:
        cancel_call(op.timer)
        if op.d.called:
            return
        with self._lock:
            started = op.state == _RUNNING
            if not started:
                op.state = _ABANDONED
        if started and not cancelled and not op.graced:
            # A moment more for its own answer rather than "it may have run".
            op.graced = True
            op.timer = self.reactor.callLater(min(op.within * 0.1, 1.0), self._withdraw, op)
            return
        reason = self.availability.reason if self.availability is not None else None
        if reason is not None:
            message = f"the job store cannot be reached ({reason})"
        else:
            within = f" within {op.within:g} s" if op.within is not None else ""
            message = f"the job store did not answer{within}"
        op.d.errback(StoreUnavailable(message, started))

    def coalesce(self, key, value) -> None:
        """Keep C{value} as the newest for C{key}; it is written with the next batch."""
        with self._lock:
            first = not self._coalesced
            self._coalesced[key] = value
        if first:
            self._queue.put(_WAKE)

    def stop(self) -> defer.Deferred:
        """@return: a Deferred firing once the queued operations are done and the thread ended."""
        if not self.closed:
            self.closed = True
            self._stopping.set()
            if self._thread is None:
                self._stopped.callback(None)
            else:
                self._queue.put(_STOP)
        return self._stopped

    def _loop(self) -> None:
        from django.db import connection

        pending: list[_Op] = []
        # (xid, operations, results, coalesced) of commits sent as the connection broke
        doubtful: list[tuple] = []
        stopping = False
        reconnect = Backoff(0.1, RECONNECT_MAX, jitter=0.1)
        try:
            self._setup()
            while True:
                block = not (pending or doubtful or self._away)
                stopping = self._gather(pending, block) or stopping
                if self._away:
                    if stopping:
                        self._give_up(pending, doubtful)
                        break
                    if not self._reachable():
                        self._stopping.wait(reconnect.next())
                        continue
                    reconnect.reset()
                    self._away = False
                    self._report("back", self.name)
                if doubtful and not self._resolve(doubtful, pending):
                    continue
                alone = self._begin([op for op in pending if op.alone])
                batch = self._begin([op for op in pending if not op.alone])
                pending = []
                for i, op in enumerate(alone):
                    how, _, outcome = self._transaction([op], None, atomic=False)
                    if how == "lost":
                        pending.extend(self._requeue(alone[i:] + batch))
                        batch = []
                        break
                    failed = how == "error"
                    done = [(op, outcome if failed else outcome[0], failed)]
                    self.reactor.callFromThread(self._deliver, done)
                if batch or (self._coalesced and not self._away):
                    self._run_batch(batch, pending, doubtful)
                if stopping and not self._away and not pending and not doubtful:
                    break
        except Exception:
            log.failure("{name} stopped on an unexpected error", name=self.name)
            self._give_up(pending, doubtful)
        finally:
            with contextlib.suppress(Exception):
                connection.close()
            self.reactor.callFromThread(self._stopped.callback, None)

    def _gather(self, pending: list, block: bool) -> bool:
        """Add what is queued to C{pending} (waiting if C{block}). @return: whether to stop."""
        items = [self._queue.get()] if block else []
        with contextlib.suppress(queue.Empty):
            while True:
                items.append(self._queue.get_nowait())
        pending.extend(item for item in items if item is not _STOP and item is not _WAKE)
        return _STOP in items

    def _begin(self, ops: list[_Op]) -> list[_Op]:
        """@return: C{ops} but those withdrawn, marked as begun (no longer withdrawable)."""
        begun = []
        with self._lock:
            for op in ops:
                if op.state != _ABANDONED:
                    op.state = _RUNNING
                    begun.append(op)
        return begun

    def _requeue(self, ops: list[_Op]) -> list[_Op]:
        """C{ops} did not run (the database went away): withdrawable again until they do."""
        with self._lock:
            for op in ops:
                if op.state == _RUNNING:
                    op.state = _QUEUED
        return list(ops)

    def _run_batch(self, ops: list[_Op], pending: list, doubtful: list) -> None:
        with self._lock:
            coalesced, self._coalesced = self._coalesced, {}
        # The common case: every operation succeeds, one commit for all.
        how, xid, results = self._transaction(ops, coalesced)
        if how == "ok":
            self._delivered(ops, results)
        elif how == "lost":
            self._keep_coalesced(coalesced)
            pending.extend(self._requeue(ops))
        elif how == "doubt":
            doubtful.append((xid, ops, results, coalesced))
        else:
            # One failed and rolled the batch back: run each alone so the others succeed.
            self._run_each(ops, coalesced, pending, doubtful)

    def _run_each(self, ops: list[_Op], coalesced: dict, pending: list, doubtful: list) -> None:
        done: list[tuple] = []
        for i, op in enumerate(ops):
            how, xid, results = self._transaction([op], None)
            if how == "lost":
                pending.extend(self._requeue(ops[i:]))
                break
            if how == "doubt":
                doubtful.append((xid, [op], results, None))
            elif how == "ok":
                done.append((op, results[0], False))
            else:
                done.append((op, results, True))
        if coalesced:
            how, xid, outcome = (
                self._transaction([], coalesced) if not self._away else ("lost", None, None)
            )
            if how == "lost":
                self._keep_coalesced(coalesced)
            elif how == "doubt":
                doubtful.append((xid, [], [], coalesced))
            elif how == "error":
                log.failure("{name} could not write its coalesced values", outcome, name=self.name)
        if done:
            self._count(len(done))
            self.reactor.callFromThread(self._deliver, done)

    def _transaction(self, ops: list[_Op], coalesced: dict | None, atomic: bool = True) -> tuple:
        """
        @return: how running C{ops} (and writing C{coalesced}) in one transaction (none if
            not C{atomic}) went: C{("ok" or "doubt" (broke while committing), xid, [result
            of each])}, C{("error", None, failure)} or C{("lost", None, None)}.
        """
        from django.db import connection, transaction

        body_done, xid, results, raw = False, None, None, None
        try:
            self._begin_batch()
            with transaction.atomic() if atomic else contextlib.nullcontext():
                raw = connection.connection
                if atomic and connection.vendor == "postgresql":
                    # To look the transaction up should its commit be lost.
                    with connection.cursor() as cursor:
                        cursor.execute("SELECT txid_current()")
                        xid = cursor.fetchone()[0]
                results = [op.fn(*op.args) for op in ops]
                if coalesced:
                    self._write_coalesced(coalesced)
                body_done = True
        except Exception as e:
            if self._lost(e, raw):
                if body_done and xid is not None:
                    return "doubt", xid, results
                return "lost", None, None
            return "error", None, Failure()
        return "ok", None, results

    def _resolve(self, doubtful: list, pending: list) -> bool:
        """Deliver doubtful transactions that committed, rerun others. @return: False if lost."""
        from django.db import connection

        while doubtful:
            xid, ops, results, coalesced = doubtful[0]
            try:
                with connection.cursor() as cursor:
                    cursor.execute("SELECT txid_status(%s)", [xid])
                    status = cursor.fetchone()[0]
            except Exception as e:
                if self._lost(e):
                    return False
                status = None
            if status == "in progress":
                # The old session is still finishing: look again shortly.
                self._stopping.wait(RECONNECT_MAX)
                return False
            doubtful.pop(0)
            if status == "committed":
                self._delivered(ops, results)
            else:
                self._keep_coalesced(coalesced or {})
                pending.extend(self._requeue(ops))
        return True

    def _delivered(self, ops: list[_Op], results: list) -> None:
        self._count(len(ops))
        if ops:
            self.reactor.callFromThread(
                self._deliver, [(op, r, False) for op, r in zip(ops, results, strict=True)]
            )

    def _count(self, n: int) -> None:
        self.batches += 1
        self.operations += n
        if n and self.observe_batch is not None:
            self.observe_batch(n)

    def _keep_coalesced(self, coalesced: dict) -> None:
        """Values of a batch that did not commit: written with the next one (unless newer came)."""
        with self._lock:
            self._coalesced = {**coalesced, **self._coalesced}

    def _lost(self, error: Exception, raw=None) -> bool:
        """@return: whether C{error} (of work begun on C{raw}) means the database went away."""
        from django.db import connection
        from django.db.utils import InterfaceError, OperationalError

        if not isinstance(error, OperationalError | InterfaceError) or not broken(connection, raw):
            return False
        if not self._away:
            self._away = True
            self._report("lost", self.name, first_line(error))
        return True

    def _reachable(self) -> bool:
        from django.db import connection

        try:
            self._begin_batch()
            if connection.connection is not None and not connection.is_usable():
                connection.close()
            connection.ensure_connection()
            return connection.is_usable()
        except Exception:
            return False

    def _report(self, what: str, *args) -> None:
        if self.availability is not None:
            self.reactor.callFromThread(getattr(self.availability, what), *args)

    def _give_up(self, pending: list, doubtful: list) -> None:
        """Stopping while the database cannot be reached: fail what waits for it."""
        away = "the job store cannot be reached"
        failed = [(op, Failure(JobServiceUnavailable(away)), True) for op in self._begin(pending)]
        doubt = JobServiceUnavailable(
            "the job store's connection broke while committing; the change may or may not "
            "have been stored"
        )
        failed.extend((op, Failure(doubt), True) for _, ops, _, _ in doubtful for op in ops)
        pending.clear()
        doubtful.clear()
        if failed:
            self.reactor.callFromThread(self._deliver, failed)

    @staticmethod
    def _deliver(items) -> None:
        for op, result, failed in items:
            cancel_call(op.timer)
            if not op.d.called:  # else withdrawn at its deadline meanwhile
                (op.d.errback if failed else op.d.callback)(result)
