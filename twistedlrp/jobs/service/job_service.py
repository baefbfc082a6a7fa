"""
The job service: the store, the queue, the workers and the front ends. Each
service is a job node (L{lease}): on SQLite the only one, holding the queue in
memory; on PostgreSQL one of several, each claiming due jobs from the table, woken
by C{LISTEN/NOTIFY}. docs/design.md says in what order it starts and stops.
"""

from __future__ import annotations

import os

from twisted.application import service
from twisted.internet import defer, task
from twisted.logger import Logger

from twistedlrp.jobs import eager, registry
from twistedlrp.jobs.client import transactions
from twistedlrp.jobs.client.calls import DEFAULT_TIMEOUT, STORE_WAIT_SHARE, jobs_timeout
from twistedlrp.jobs.errors import JobServiceUnavailable
from twistedlrp.jobs.service.dispatch import Dispatcher
from twistedlrp.jobs.service.handlers import JobOperations
from twistedlrp.jobs.service.lease import NodeLease, Watchdog, node_lease, renewal_interval
from twistedlrp.jobs.service.queue import JobRecord
from twistedlrp.jobs.service.retention import Pruner, default_keep
from twistedlrp.jobs.service.schedules import Scheduler, configured
from twistedlrp.jobs.states import FINISHED
from twistedlrp.jobs.store import Store, StoreUnavailable, operations, recovery, session_limit
from twistedlrp.jobs.workers.worker import HOSTNAME
from twistedlrp.ordered_service import StartupFailed, Waiters, within

log = Logger()

DEFAULT_CANCEL_GRACE = 5.0
# Seconds without a usable worker before the health endpoint says "degraded".
WORKER_GRACE = 5.0
# Seconds the start waits for a store that cannot be reached before it fails.
START_WAIT = 30.0
# Several nodes: seconds between claims that no notification asked for.
POLL_INTERVAL = 5.0
# One node: seconds between looks for jobs committed by a site's transaction
# whose process died before it told the job service.
SWEEP_INTERVAL = 2.0


def node_name(options) -> str:
    """@return: this job node's name: C{--node-name}, or the host name and the state directory."""
    state_dir = os.path.abspath(options.get("state-dir") or ".lrp")
    return options.get("node-name") or f"{HOSTNAME}:{state_dir}"[:255]


def store_wait() -> float:
    """@return: the seconds an operation waits for an unreachable store (8 s by default)."""
    try:
        timeout = jobs_timeout()
    except (TypeError, ValueError):
        timeout = DEFAULT_TIMEOUT
    return max(timeout * STORE_WAIT_SHARE, 0.1)


class JobService(service.Service):
    """
    @param front_ends: objects with C{listen(operations)} (awaited) and
        C{stop()}; the first one's C{client_endpoint} is given to the workers.
    @param cancel_grace: seconds a cancelled job has before SIGTERM (again: SIGKILL).
    """

    name = "jobs"

    def __init__(self, reactor, options, front_ends=(), cancel_grace=DEFAULT_CANCEL_GRACE):
        self.reactor, self.options = reactor, options
        self.max_payload = options["max-job-payload"]
        # Submissions inside a transaction of this process's views check it there.
        transactions.limit_payload(self.max_payload)
        self.front_ends = list(front_ends)
        from django.db import connection

        # Several job nodes share a PostgreSQL database; any other is one node's.
        self.shared = connection.vendor == "postgresql"
        self.node = node_name(options)
        self.queues = list(options.get("queues") or ()) or None
        self.lease = node_lease()
        # Several nodes: a thread of its own renews the lease.
        self.store = Store(
            reactor,
            renewal_interval(self.lease) if self.shared else None,
            idle_limit=session_limit(self.lease),
        )
        self.store_wait = store_wait()
        self.store.availability.wait = self.store_wait
        self.worker_env: dict[str, str] = {}
        self.dispatcher = Dispatcher(
            reactor, self.store, options, self.worker_env, cancel_grace, self.node, self.shared,
            self.queues,
        )  # fmt: skip
        self.pool = self.dispatcher.pool
        self.unavailable: str | None = "the job service is starting"
        self.operations = JobOperations(
            self.dispatcher,
            self.max_payload,
            self.store_wait,
            lambda: self.unavailable,
            self._about,
        )
        node = self.node if self.shared else None
        self.watchdog = Watchdog(reactor, self.dispatcher, self.store, f"{HOSTNAME}:", node)
        self.lease_keeper = NodeLease(
            reactor, self.store, self.node, HOSTNAME, os.getpid(), self.queues, self.lease,
            self.shared, on_requeued=self.dispatcher.wake, runner=self.store.lease,
            on_fenced=self.dispatcher.fence,
            on_unfenced=self.dispatcher.unfence,
        )  # fmt: skip
        if self.shared:  # claim only while this node's lease is fresh (as fencing counts it)
            self.dispatcher.claims.lease_check = self.lease - self.lease_keeper.margin
        definitions = lambda: [registry.lookup(name) for name in registry.names()]  # noqa: E731
        self.pruner = Pruner(reactor, self.store, default_keep(), definitions)
        self.schedules = configured()
        self.scheduler = Scheduler(reactor, self.store, self.operations.submit, self.queues)
        self.listener = None
        # Several nodes poll the table; one looks for jobs announced to nobody.
        self._loop = task.LoopingCall(
            self.dispatcher.wake if self.shared else self._sweep_announced
        )
        self._loop.clock = reactor
        self._last_usable = reactor.seconds()  # when a worker could last take a job
        self._listening: Waiters | None = Waiters()  # None: listening

    def startService(self) -> defer.Deferred:
        super().startService()
        return defer.ensureDeferred(self._start())

    async def _start(self) -> None:
        # Without the job table the service stays up and listens, telling
        # clients to migrate.
        reason = await self._open()
        for front_end in self.front_ends:
            await front_end.listen(self.operations)
        if self.front_ends:
            self.worker_env["LRP_JOBS_CONNECT"] = self.front_ends[0].client_endpoint
            if self.options["jobs-secret-file"]:
                self.worker_env["LRP_JOBS_SECRET_FILE"] = self.options["jobs-secret-file"]
        listening, self._listening = self._listening, None
        listening.fire(self.client_endpoint)
        if reason:
            return
        self.dispatcher.accepting = True
        self.pool.start()
        self._last_usable = self.reactor.seconds()
        self.watchdog.start()
        self.lease_keeper.start()
        await self.scheduler.start(self.schedules)
        self.pruner.start()
        if self.shared:
            from twistedlrp.jobs.store import Listener

            wake = self.dispatcher.wake
            self.listener = Listener(self.reactor, self._notified, wake, self.store.availability)
            self.listener.start()
        self._loop.start(POLL_INTERVAL if self.shared else SWEEP_INTERVAL, now=False)
        if eager.enabled():
            log.warn(
                "LRP_JOBS_EAGER is set (a setting for tests): jobs submitted in this process run "
                "in the thread that submits them, not in the workers"
            )
        log.info(
            "Job service ready: {queued} queued job(s), {workers} worker(s) starting, jobs: {names}",
            queued="the table's" if self.shared else len(self.dispatcher.queue),
            workers=self.pool.size,
            names=", ".join(registry.names()) or "(none registered)",
        )
        log.info(
            "Job node {node}: {mode}; queues: {queues}",
            node=self.node,
            mode="one of several on PostgreSQL (SKIP LOCKED claims, LISTEN/NOTIFY, lease "
            f"{self.lease:g} s renewed every {self.lease_keeper.interval:g} s, running jobs "
            f"stopped after {self.lease - self.lease_keeper.margin:g} s without renewal)"
            if self.shared
            else "the only one on this database",
            queues=", ".join(self.queues) if self.queues else "all",
        )

    async def _open(self) -> str | None:
        """
        Open the store, register this node, queue what it left when it died.
        @return: why the service cannot run (no job table), or C{None}.
        @raise StartupFailed: the store cannot be reached, or another node holds it.
        """
        self.store.start()
        try:
            reason = await self.store.prepare(within=START_WAIT)
            if reason:
                self.unavailable = reason
                log.error("The job service cannot run: {reason}", reason=reason)
                return reason
            await self.lease_keeper.register()
            queued, failed = await self.store.run(
                recovery.recover, self.node, self.queues, self.shared, within=START_WAIT
            )
        except recovery.NodeConflict as e:
            raise StartupFailed(str(e)) from None
        except StoreUnavailable as e:
            raise StartupFailed(f"the job service cannot start: {e}") from None
        for job_id in failed:
            log.warn("Job {job_id} was running when the server died: failed", job_id=job_id)
        for row in queued:
            run_after = row["run_after"].timestamp() if row["run_after"] else None
            self.dispatcher.queue.push(JobRecord.from_row(row), run_after)
        self.unavailable = None
        return None

    def _notified(self, payload: str) -> None:
        if not self.dispatcher.accepting:
            return
        what, _, value = payload.partition(":")
        if what == "queued":
            if self.queues is None or value in self.queues:
                self.dispatcher.wake()
        elif what == "cancel":
            self.dispatcher.request_cancel(value)
        elif what == "finished" and value in self.operations.waiters:
            d = self.operations.status(value)
            outcomes = self.dispatcher.outcomes
            d.addCallback(lambda info: info["state"] in FINISHED and outcomes.notify(info))
            d.addErrback(lambda _: None)

    def _sweep_announced(self) -> defer.Deferred:
        """Queue the announced jobs nobody told us of (their process died first)."""
        d = self.store.run(operations.announced, alone=True)
        d.addCallback(
            lambda n: self.operations.take_announced() if n and self.dispatcher.accepting else None
        )
        # The store's own trouble is the watchdog's to report; try again next time.
        return d.addErrback(lambda _: None)

    @property
    def client_endpoint(self) -> str | None:
        return self.front_ends[0].client_endpoint if self.front_ends else None

    def when_listening(self) -> defer.Deferred:
        """@return: a Deferred firing with L{client_endpoint} once the service listens."""
        if self._listening is None:
            return defer.succeed(self.client_endpoint)
        return self._listening.wait()

    def stopService(self) -> defer.Deferred:
        return self.stop_by(self.reactor.seconds() + self.options["graceful-timeout"])

    def stop_by(self, deadline: float) -> defer.Deferred:
        """
        Stop taking work; jobs still running shortly before C{deadline} are killed
        and requeued without the attempt. @return: a Deferred of the store's end.
        """
        super().stopService()
        return defer.ensureDeferred(self._stop(deadline))

    async def _stop(self, deadline: float) -> None:
        reactor = self.reactor

        def left(cut: float = 0.0) -> float:
            return max(deadline - reactor.seconds() - cut, 0.5)

        for front_end in self.front_ends:
            await within(reactor, front_end.stop(), left())
        dispatcher = self.dispatcher
        self.watchdog.stop()
        self.scheduler.stop()
        self.pruner.stop()
        if self._loop.running:
            self._loop.stop()
        if self.listener is not None:
            self.listener.stop()
        dispatcher.stop_accepting()
        if self.unavailable is None:
            self.unavailable = "the job service is shutting down"
        dispatcher.outcomes.fail_waiters(JobServiceUnavailable("the job service is shutting down"))
        remaining = deadline - reactor.seconds()
        margin = min(1.0, max(0.3, remaining * 0.2))
        if dispatcher.running:
            log.info("Waiting for {n} running job(s) to finish", n=len(dispatcher.running))
            await within(reactor, dispatcher.when_idle(), remaining - margin)
        if dispatcher.running:
            message = "{n} job(s) still running at the graceful deadline: stopping them and "
            log.warn(message + "putting them back in the queue", n=len(dispatcher.running))
        self.pool.kill_all("shutdown")
        await within(reactor, dispatcher.claims_in_flight(), left(0.2))
        await within(reactor, self.pool.when_all_ended(), left(0.1))
        self.lease_keeper.stop()
        # Registered (a successor need not wait for the lease):
        if self.lease_keeper.renewed_at is not None and not self.store.closed:
            self.store.run(recovery.leave_node, self.node, os.getpid()).addErrback(lambda _: None)
        await within(reactor, self.store.stop(), left())

    def _about(self) -> dict:
        """@return: the service's own part of the C{stats} operation's answer."""
        node = dict(name=self.node, shared=self.shared, queues=self.queues, lease=self.lease)
        return {"unavailable": self.unavailable, "node": node, "retention": self.pruner.describe()}

    def force_exit(self) -> None:
        self.pool.kill_all("shutdown")

    def health(self) -> dict:
        """@return: the job service's part of the health endpoint (C{healthy}: else 503)."""
        usable = sum(1 for w in self.pool.workers if w.state in ("idle", "busy", "claiming"))
        now = self.reactor.seconds()
        if usable or not self.pool.size:
            self._last_usable = now
        store_error = self.watchdog.store_error
        problems = (
            self.unavailable,
            self.store.away and f"the job store cannot be reached: {self.store.away}",
            self.lease_keeper.fenced is not None
            and "this job node could not renew its lease in time: it runs no job until it does",
            store_error and f"the job store cannot be reached: {store_error}",
            now - self._last_usable > WORKER_GRACE
            and f"no worker can take a job (0 of {self.pool.size} usable for "
            f"{now - self._last_usable:.0f} s)",
        )
        problem = next((p for p in problems if p), None)
        return {
            "healthy": problem is None,
            "state": "running" if problem is None else "degraded",
            "reason": problem,
            "workers": usable,
            "workers_configured": self.pool.size,
            "queued": len(self.dispatcher.queue),
            "running": len(self.dispatcher.running),
        }
