"""
This job node's lease in the node table (L{NodeLease}): a heartbeat every few
seconds and, with several nodes on one database, the expiry of the others.
Fencing: a node that could not renew its lease for the lease less a margin (on
its own monotonic clock) kills its running jobs and claims nothing before any
other node may take its lease for expired: a job never runs on two nodes at once.

The L{Watchdog}: no job stays C{running} without a live worker that holds it, in
the service or in the store (jobs recorded as running on this machine's workers
or node that the service neither runs nor claims); that query also tells the
health endpoint whether the store can be reached.
"""

from __future__ import annotations

import os
import threading
import time
from datetime import UTC, datetime

from twisted.internet import defer, task
from twisted.logger import Logger

from twistedlrp.jobs.service.queue import JobRecord
from twistedlrp.jobs.states import QUEUED
from twistedlrp.jobs.store import recovery
from twistedlrp.ordered_service import cancel_call

log = Logger()

# Seconds registering a node at start-up waits for a store that cannot be reached.
REGISTER_WAIT = 30.0
# Seconds without a heartbeat after which the other nodes take a job node for
# dead. Renewed every 2 s and fenced 3 s before expiry: a cut of the network or
# the database shorter than about 24 s stops nothing and runs nothing twice.
DEFAULT_NODE_LEASE = 30.0
CHECK_INTERVAL = 2.0
STORE_INTERVAL = 5.0
# A job claimed less than this long ago may still be on its way to its worker.
CLAIM_GRACE = 10.0


class MonotonicAlarm:
    """
    Calls C{fn} in the reactor once C{clock()} (monotonic) reaches the time last
    given to L{set}, from a daemon thread: Twisted's timers follow the wall
    clock, which a step back would delay.
    """

    def __init__(self, reactor, fn, clock=time.monotonic):
        self.reactor, self.fn, self.clock = reactor, fn, clock
        self._cond = threading.Condition()
        self._due: float | None = None
        self._stopped = False
        self._thread: threading.Thread | None = None

    def set(self, due: float | None) -> None:
        with self._cond:
            self._due = due
            self._cond.notify()
        if self._thread is None and due is not None:
            self._thread = threading.Thread(
                target=self._run, name="twistedlrp-job-lease-alarm", daemon=True
            )
            self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                if self._stopped:
                    return
                remaining = 1.0 if self._due is None else self._due - self.clock()
                if remaining > 0:
                    self._cond.wait(min(remaining, 1.0))
                    continue
                self._due = None
            self.reactor.callFromThread(self.fn)


class _ReactorAlarm:
    """L{MonotonicAlarm}'s interface on the reactor's own timers (for a fake reactor)."""

    def __init__(self, reactor, fn, clock):
        self.reactor, self.fn, self.clock = reactor, fn, clock
        self._call = None

    def set(self, due: float | None) -> None:
        cancel_call(self._call)
        self._call = None
        if due is not None:
            self._call = self.reactor.callLater(max(due - self.clock(), 0.0), self.fn)

    def stop(self) -> None:
        self.set(None)


def node_lease() -> float:
    """@return: C{LRP_JOBS_NODE_LEASE} (environment, then setting) in seconds; @raise BootError."""
    from django.conf import settings

    from twistedlrp.boot import BootError

    value = os.environ.get("LRP_JOBS_NODE_LEASE") or getattr(
        settings, "LRP_JOBS_NODE_LEASE", DEFAULT_NODE_LEASE
    )
    try:
        lease = float(value)
    except (TypeError, ValueError):
        raise BootError(
            f"LRP_JOBS_NODE_LEASE: expected a number of seconds, got {value!r}"
        ) from None
    if not 0.5 <= lease < 1e9:
        raise BootError(f"LRP_JOBS_NODE_LEASE: must be at least 0.5 s, got {value!r}")
    return lease


def renewal_interval(lease: float) -> float:
    return max(min(2.0, lease / 4), 0.1)


def fence_margin(lease: float) -> float:
    """@return: how long before its lease can expire elsewhere a node stops its jobs."""
    return min(max(lease / 10, 1.0), 5.0, lease / 2)


class NodeLease:
    """
    @param runner: what runs the heartbeats [default: the store thread].
    @param on_requeued: called when jobs went back to the queue.
    @param on_fenced: C{()}: stop the running jobs; @return: their ids (called
        when several nodes share the database; then C{on_unfenced} once renewed).
    @param clock: a test's clock: fence by the reactor's timers, not by a
        L{MonotonicAlarm} (which a fake reactor does not drive).
    """

    def __init__(
        self,
        reactor,
        store,
        node: str,
        host: str,
        pid: int,
        queues: list[str] | None,
        lease: float,
        shared: bool,
        on_requeued,
        runner=None,
        on_fenced=None,
        on_unfenced=None,
        clock=time.monotonic,
    ):
        self.reactor, self.store = reactor, store
        self.runner = runner if runner is not None else store
        self.node, self.lease, self.shared, self.clock = node, lease, shared, clock
        # What the node table holds of this node.
        self._entry = (node, host, pid, queues)
        self.on_requeued, self.on_fenced, self.on_unfenced = on_requeued, on_fenced, on_unfenced
        self.interval = renewal_interval(lease)
        self.margin = fence_margin(lease)
        self._loop = task.LoopingCall(self.beat)
        self._loop.clock = reactor
        self._busy = False
        self.renewed_at: float | None = None  # (self.clock) the last renewal sent that succeeded
        # The jobs stopped by fencing, until a renewal dealt with them; None: not fenced.
        self.fenced: list[str] | None = None
        self._fenced_for = ""
        alarm = MonotonicAlarm if clock is time.monotonic else _ReactorAlarm
        self._alarm = alarm(reactor, self._check_fence, clock)
        self._beat_error: str | None = None
        self._again = False

    def register(self) -> defer.Deferred:
        """@return: a Deferred failing with L{recovery.NodeConflict} (a second node on SQLite)."""
        sent = self.clock()
        d = self.runner.run(
            recovery.register_node, *self._entry, self.lease, self.shared, within=REGISTER_WAIT
        )

        def registered(result):
            self.renewed_at = sent
            return result

        return d.addCallback(registered)

    def start(self) -> None:
        self._loop.start(self.interval, now=False)
        self._arm()

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()
        self._alarm.stop()

    def beat(self) -> None:
        if self._busy or self.runner.closed:
            return
        self._busy = True
        sent = self.clock()
        fenced = list(self.fenced) if self.fenced is not None else None
        d = self.runner.run(recovery.heartbeat, *self._entry, fenced, self._fenced_for)
        d.addCallbacks(self._beaten, self._beat_failed, callbackArgs=(sent, fenced))
        if self.shared:
            grace = datetime.fromtimestamp(self.reactor.seconds() - CLAIM_GRACE, UTC)
            expired = self.runner.run(recovery.expire_nodes, self.node, self.lease, grace)
            expired.addCallbacks(self._expired, self._expire_failed)
            d = defer.DeferredList([d, expired], consumeErrors=True)
        d.addBoth(self._done)

    def _done(self, _) -> None:
        self._busy = False
        if self._again:  # renewed, but the jobs it stopped are still to be dealt with
            self._again = False
            if self._loop.running:
                self.reactor.callLater(0, self.beat)

    def _beaten(self, outcome: dict, sent: float, fenced: list[str] | None) -> None:
        self._beat_error = None
        self.renewed_at = sent if self.renewed_at is None else max(self.renewed_at, sent)
        if not outcome["held"]:
            log.warn(
                "This job node ({node}) was missing from the node table: another node took it "
                "for dead (no heartbeat for {lease:g} s) and retried or failed the jobs it was "
                "running; {what}",
                node=self.node,
                lease=self.lease,
                what="it had stopped them already (fenced)"
                if fenced is not None or self.fenced is not None
                else "their outcomes here are not recorded",
            )
        stopped = "; it was stopped here when this node could not renew its lease"
        self._ended(outcome["ended"], stopped, self._fenced_for)
        if self.fenced is not None and fenced is not None and set(self.fenced) <= set(fenced):
            self.fenced = None
            log.warn("Job node {node} renewed its lease again: it takes work again", node=self.node)
            self.on_unfenced()
        elif self.fenced is not None:
            self._again = True
            return
        self._arm()

    def _beat_failed(self, failure) -> None:
        # Not an unreachable database (the heartbeat waits for it): said once.
        error = failure.getErrorMessage() or failure.type.__name__
        if self._beat_error is None:
            log.warn("Could not renew this job node's lease: {error}", error=error)
        self._beat_error = error

    def _arm(self) -> None:
        if not self.shared or self.renewed_at is None or not self._loop.running:
            return
        self._alarm.set(
            None if self.fenced is not None else self.renewed_at + self.lease - self.margin
        )

    def _check_fence(self) -> None:
        if self.fenced is not None or not self._loop.running:
            return
        if self.renewed_at + self.lease - self.margin - self.clock() > 0:
            # A timer on another clock (the reactor's) came early: not yet.
            self._arm()
            return
        age = self.clock() - self.renewed_at
        self._fenced_for = (
            f"the job node {self.node} could not renew its lease for {age:.0f} s "
            f"(lease {self.lease:g} s) and stopped the job"
        )
        stopped = list(self.on_fenced())
        self.fenced = stopped
        log.warn(
            "Job node {node}: its lease could not be renewed for {age:.1f} s (lease {lease:g} s; "
            "the job store: {reason}): stopping its {n} running job(s) and taking no work until "
            "it renews it, before another node may take it for dead and run them",
            node=self.node,
            age=age,
            lease=self.lease,
            reason=getattr(self.store, "away", None) or self._beat_error or "no answer",
            n=len(stopped),
        )

    def _expire_failed(self, failure) -> None:
        log.warn(
            "Could not check the leases of the other job nodes: {error}",
            error=failure.getErrorMessage() or failure.type.__name__,
        )

    def _expired(self, outcome: dict) -> None:
        dead = "Job node {name}: no heartbeat for {age:.0f} s (lease {lease:g} s): taken for dead"
        for name, age in outcome["nodes"]:
            log.warn(dead, name=name, age=age, lease=self.lease)
        self._ended(outcome["jobs"])

    def _ended(self, jobs: list[dict], after: str = "", reason: str = "") -> None:
        """Log the jobs the store retried, failed or cancelled for a node's lease."""
        message = "Job {job_id}: {state} ({reason})" + after
        for job in jobs:
            state = "retried" if job["state"] == QUEUED else job["state"]
            log.warn(message, job_id=job["id"], state=state, reason=reason or job["reason"])
        if any(job["state"] == QUEUED for job in jobs):
            self.on_requeued()


class Watchdog:
    """@param worker_prefix: the start of this machine's worker ids (C{"host:"})."""

    def __init__(self, reactor, dispatcher, store, worker_prefix: str, node: str | None = None):
        self.reactor, self.dispatcher, self.store = reactor, dispatcher, store
        self.worker_prefix = worker_prefix
        self.node = node  # several nodes: this node's jobs only
        self.store_error: str | None = None
        self._loop = task.LoopingCall(self.check)
        self._loop.clock = reactor
        self._last_store_check = 0.0
        self._store_check_running = False

    def start(self) -> None:
        self._loop.start(CHECK_INTERVAL, now=False)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()

    def check(self) -> None:
        for record in list(self.dispatcher.running.values()):
            if reason := _why_orphaned(record, self.dispatcher.pool.workers):
                self.dispatcher.orphaned(record, reason)
        now = self.reactor.seconds()
        # Fenced: the jobs it stopped are the lease's to deal with once it is renewed.
        if self.dispatcher.fenced or self._store_check_running:
            return
        if now - self._last_store_check >= STORE_INTERVAL:
            self._last_store_check, self._store_check_running = now, True
            grace = datetime.fromtimestamp(now - CLAIM_GRACE, UTC)
            d = self.store.run(recovery.running_on, self.worker_prefix, grace, self.node)
            d.addCallback(self._orphans_in_store).addBoth(self._store_checked)

    def _store_checked(self, outcome) -> None:
        self._store_check_running = False
        if hasattr(outcome, "getErrorMessage"):
            error = outcome.getErrorMessage() or outcome.type.__name__
            if self.store_error is None:
                log.error("The job store cannot be reached: {error}", error=error)
            self.store_error = error
        elif self.store_error is not None:
            log.info("The job store can be reached again")
            self.store_error = None

    def _orphans_in_store(self, rows: list[dict]) -> None:
        dispatcher = self.dispatcher
        for row in rows:
            job_id = row["id"]
            if job_id in dispatcher.running or job_id in dispatcher.claiming:
                continue
            reason = (
                f"the job was recorded as running on {row['worker'] or 'no worker'} "
                f"(attempt {row['attempts']}), which does not hold it"
            )
            log.warn("Job {job_id}: {reason}", job_id=job_id, reason=reason)
            d = self.store.run(recovery.end_orphan, job_id, reason, self.node)
            d.addCallback(self._requeue, job_id)
            d.addErrback(lambda f, job_id=job_id: log.failure("Ending job {id}", f, id=job_id))

    def _requeue(self, after: dict | None, job_id: str) -> None:
        if after is None or after["state"] != QUEUED or not self.dispatcher.accepting:
            return
        record = JobRecord(job_id, after["priority"], after["created_at"].timestamp())
        self.dispatcher.enqueue(record)


def _why_orphaned(record: JobRecord, workers: list) -> str | None:
    """@return: why C{record}'s worker does not hold it any more, or C{None} if it does."""
    worker = record.worker
    if worker is None:
        return "no worker was recorded"
    if worker not in workers or worker.state == "dead":
        return f"worker process {worker.pid} has ended"
    if worker.job_id != record.id:
        return f"worker process {worker.pid} runs another job"
    try:
        os.kill(worker.pid, 0)
    except ProcessLookupError:
        return f"worker process {worker.pid} does not exist"
    except OSError:
        pass
    return None
