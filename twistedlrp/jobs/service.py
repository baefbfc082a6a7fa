"""
The job service: a Twisted service holding the store, the queue, the
workers and the front ends that clients reach it through.

The operations clients use (L{JobService.submit}, C{status}, C{cancel},
C{wait}, C{list_jobs}, C{stats}) are plain methods returning Deferreds of
JSON-ready dicts; the AMP front end (L{twistedlrp.jobs.amp}) and the
Perspective Broker one (L{twistedlrp.jobs.pb}) call the same methods. Every
state change goes through the store thread and is acknowledged only after
its commit. Which job runs where is L{twistedlrp.jobs.dispatch}'s business.

Job nodes: each service is a node, named in the node table, with a
heartbeat (L{twistedlrp.jobs.watchdog.NodeLease}). On SQLite it is the only
one (a second node on the same database is refused at start-up), holds the
queue in memory and never polls. On PostgreSQL several nodes may share the
database: each claims due jobs from the table with C{SELECT ... FOR UPDATE
SKIP LOCKED}, is woken by C{LISTEN/NOTIFY} (L{twistedlrp.jobs.store.listen})
and polls slowly (L{POLL_INTERVAL}) for anything missed; the other nodes
retry or fail the running jobs of a node whose lease expired.

Start (see docs/design.md): open the store, enter the node, recover what
this node left when it died, listen, then start the workers (so that they know the address a job
submitting a job must use). Stop: no new work, running jobs get until
shortly before the graceful deadline, then are stopped and put back in the
queue; the store thread ends once every change is committed.
"""

from __future__ import annotations

import json
import os
import uuid
from datetime import UTC, datetime

from twisted.application import service
from twisted.internet import defer, task
from twisted.logger import Logger

from twistedlrp.jobs import registry
from twistedlrp.jobs.arguments import check_submission
from twistedlrp.jobs.dispatch import KEEP_PAYLOAD, Dispatcher
from twistedlrp.jobs.errors import (
    InvalidArguments,
    JobServiceUnavailable,
    NotRegistered,
    PayloadTooLarge,
)
from twistedlrp.jobs.queue import JobRecord
from twistedlrp.jobs.states import FINISHED, RUNNING
from twistedlrp.jobs.store import Store, recovery
from twistedlrp.jobs.store import operations as ops
from twistedlrp.jobs.watchdog import NodeLease, Watchdog
from twistedlrp.jobs.workers import worker_id_prefix
from twistedlrp.services import StartupFailed, within

log = Logger()

DEFAULT_CANCEL_GRACE = 5.0
# Seconds without a usable worker before the health endpoint says "degraded"
# (a worker being replaced takes about one).
WORKER_GRACE = 5.0
# Seconds without a heartbeat after which the other nodes take a job node for dead.
DEFAULT_NODE_LEASE = 15.0
# Several nodes: seconds between claims that no notification asked for.
POLL_INTERVAL = 5.0
_HOST = os.uname().nodename


def node_name(options) -> str:
    """@return: this job node's name: C{--node-name}, or the host name and the state directory."""
    name = options.get("node-name")
    if name:
        return name
    return f"{_HOST}:{os.path.abspath(options.get('state-dir') or '.lrp')}"[:255]


def node_lease() -> float:
    """
    @return: the seconds of a node's lease, from C{LRP_JOBS_NODE_LEASE}
        (environment, then setting).
    @raise twistedlrp.boot.BootError: it is not a number of seconds of at least 0.5.
    """
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


class JobService(service.Service):
    """
    @param options: the server's checked options (C{workers},
        C{max-job-payload}, C{max-jobs-per-worker}, C{max-worker-memory},
        C{pythonpath}, C{jobs-secret-file}, C{graceful-timeout}).
    @param front_ends: what listens for clients: objects with C{listen(service)}
        (awaited) and C{stop()}; the first one's C{client_endpoint} is given
        to the workers, whose jobs may submit jobs.
    @param cancel_grace: seconds a running job has to stop after a cancel
        before SIGTERM (and as long again before SIGKILL).
    """

    name = "jobs"

    def __init__(self, reactor, options, front_ends=(), cancel_grace=DEFAULT_CANCEL_GRACE):
        self.reactor = reactor
        self.options = options
        self.max_payload = options["max-job-payload"]
        self.front_ends = list(front_ends)
        self.store = Store(reactor)
        self.worker_env: dict[str, str] = {}
        self.waiters: dict[str, list[defer.Deferred]] = {}
        from django.db import connection

        # Several job nodes share a PostgreSQL database; any other is one node's.
        self.shared = connection.vendor == "postgresql"
        self.node = node_name(options)
        self.queues = list(options.get("queues") or ()) or None
        self.lease = node_lease()
        self.dispatcher = Dispatcher(
            reactor,
            self.store,
            options,
            self.worker_env,
            cancel_grace,
            waiting=self.waiters.__contains__,
            notify=self._notify,
            node=self.node,
            shared=self.shared,
            queues=self.queues,
        )
        self.pool = self.dispatcher.pool
        self.watchdog = Watchdog(
            reactor,
            self.dispatcher,
            self.store,
            worker_id_prefix(),
            self.node if self.shared else None,
        )
        self.lease_keeper = NodeLease(
            reactor,
            self.store,
            self.node,
            _HOST,
            os.getpid(),
            self.queues,
            self.lease,
            self.shared,
            on_requeued=self.dispatcher.wake,
        )
        self.listener = None
        self._poll = task.LoopingCall(self.dispatcher.wake)
        self._poll.clock = reactor
        self._registered = False
        self.unavailable: str | None = "the job service is starting"
        # When a worker could last take a job (or the workers were started).
        self._last_usable = reactor.seconds()
        # Deferreds waiting for the front ends to listen; None once they do.
        self._listen_waiters: list[defer.Deferred] | None = []

    # -- life ----------------------------------------------------------------------

    def startService(self) -> defer.Deferred:
        super().startService()
        return defer.ensureDeferred(self._start())

    async def _start(self) -> None:
        """
        When the job table is missing the service stays up but refuses work
        with a message saying to migrate (and starts no workers).
        """
        self.store.start()
        reason = await self.store.prepare()
        if reason:
            self.unavailable = reason
            log.error("The job service cannot run: {reason}", reason=reason)
        else:
            await self._register()
            queued, failed = await self.store.run(recovery.recover, self.node, self.queues, self.shared)
            for job_id in failed:
                log.warn("Job {job_id} was running when the server died: failed", job_id=job_id)
            for row in queued:
                record = JobRecord(row["id"], row["priority"], row["created_at"].timestamp())
                self.dispatcher.queue.push(
                    record, row["run_after"].timestamp() if row["run_after"] else None
                )
            self.unavailable = None
        # Listening even when unavailable: clients are told why, not refused.
        for front_end in self.front_ends:
            await front_end.listen(self)
        if self.front_ends:
            self.worker_env["LRP_JOBS_CONNECT"] = self.front_ends[0].client_endpoint
            if self.options["jobs-secret-file"]:
                self.worker_env["LRP_JOBS_SECRET_FILE"] = self.options["jobs-secret-file"]
        waiters, self._listen_waiters = self._listen_waiters, None
        for d in waiters:
            d.callback(self.client_endpoint)
        if reason:
            return
        self.dispatcher.accepting = True
        self.pool.start()
        self._last_usable = self.reactor.seconds()
        self.watchdog.start()
        self.lease_keeper.start()
        if self.shared:
            from twistedlrp.jobs.store.listen import Listener

            self.listener = Listener(self.reactor, self._notified, self.dispatcher.wake)
            self.listener.start()
            self._poll.start(POLL_INTERVAL, now=False)
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
            f"{self.lease:g} s)"
            if self.shared
            else "the only one on this database",
            queues=", ".join(self.queues) if self.queues else "all",
        )

    async def _register(self) -> None:
        """Enter this node in the node table, or refuse to start beside another live one."""
        try:
            await self.store.run(
                recovery.register_node,
                self.node,
                _HOST,
                os.getpid(),
                self.queues,
                self.lease,
                self.shared,
            )
        except recovery.NodeConflict as e:
            raise StartupFailed(str(e)) from None
        self._registered = True

    def _notified(self, payload: str) -> None:
        """A notification from a job node on the database (possibly this one)."""
        if not self.dispatcher.accepting:
            return
        what, _, value = payload.partition(":")
        if what == "queued":
            if self.queues is None or value in self.queues:
                self.dispatcher.wake()
        elif what == "cancel":
            self.dispatcher.request_cancel(value)
        elif what == "finished" and value in self.waiters:
            d = self.status(value)
            d.addCallback(lambda info: info["state"] in FINISHED and self._notify(info))
            d.addErrback(lambda _: None)

    @property
    def client_endpoint(self) -> str | None:
        """The client endpoint string of the first front end, once it listens."""
        return self.front_ends[0].client_endpoint if self.front_ends else None

    def when_listening(self) -> defer.Deferred:
        """@return: a Deferred firing with L{client_endpoint} once the service listens."""
        if self._listen_waiters is None:
            return defer.succeed(self.client_endpoint)
        d = defer.Deferred()
        self._listen_waiters.append(d)
        return d

    def stopService(self) -> defer.Deferred:
        return self.stop_by(self.reactor.seconds() + self.options["graceful-timeout"])

    def stop_by(self, deadline: float) -> defer.Deferred:
        """
        Stop taking work; running jobs may finish until shortly before
        C{deadline}, then their processes are killed and the jobs go back
        to the queue (without using up an attempt).

        @return: a Deferred that fires once the store thread has ended.
        """
        super().stopService()
        return defer.ensureDeferred(self._stop(deadline))

    async def _stop(self, deadline: float) -> None:
        reactor = self.reactor
        for front_end in self.front_ends:
            await within(reactor, front_end.stop(), max(deadline - reactor.seconds(), 0.5))
        dispatcher = self.dispatcher
        self.watchdog.stop()
        if self._poll.running:
            self._poll.stop()
        if self.listener is not None:
            self.listener.stop()
        dispatcher.stop_accepting()
        if self.unavailable is None:
            self.unavailable = "the job service is shutting down"
        for waiters in self.waiters.values():
            for d in waiters:
                if not d.called:
                    d.errback(JobServiceUnavailable("the job service is shutting down"))
        self.waiters.clear()
        remaining = deadline - reactor.seconds()
        margin = min(1.0, max(0.3, remaining * 0.2))
        if dispatcher.running:
            log.info("Waiting for {n} running job(s) to finish", n=len(dispatcher.running))
            await within(reactor, dispatcher.when_idle(), remaining - margin)
        if dispatcher.running:
            log.warn(
                "{n} job(s) still running at the graceful deadline: stopping them and "
                "putting them back in the queue",
                n=len(dispatcher.running),
            )
        self.pool.kill_all("shutdown")
        await within(
            reactor, dispatcher.claims_in_flight(), max(deadline - reactor.seconds() - 0.2, 0.5)
        )
        await within(
            reactor, self.pool.when_all_ended(), max(deadline - reactor.seconds() - 0.1, 0.5)
        )
        self.lease_keeper.stop()
        if self._registered and not self.store.closed:
            # The node's row goes with the last batch: a successor need not wait for its lease.
            self.store.run(recovery.leave_node, self.node, os.getpid()).addErrback(lambda _: None)
        await within(reactor, self.store.stop(), max(deadline - reactor.seconds(), 0.5))

    def force_exit(self) -> None:
        """The process ends at once: leave no worker behind."""
        self.pool.kill_all("shutdown")

    def health(self) -> dict:
        """
        @return: the job service's part of the health endpoint; C{healthy}
            is false (the endpoint answers 503, "degraded") when the service
            is unavailable, its store cannot be reached, or no worker has
            been able to take a job for L{WORKER_GRACE} seconds.
        """
        usable = sum(1 for w in self.pool.workers if w.state in ("idle", "busy", "claiming"))
        now = self.reactor.seconds()
        if usable or not self.pool.size:
            self._last_usable = now
        problem = self.unavailable
        if problem is None and self.watchdog.store_error:
            problem = f"the job store cannot be reached: {self.watchdog.store_error}"
        if problem is None and now - self._last_usable > WORKER_GRACE:
            problem = (
                f"no worker can take a job (0 of {self.pool.size} usable for "
                f"{now - self._last_usable:.0f} s)"
            )
        return {
            "healthy": problem is None,
            "state": "running" if problem is None else "degraded",
            "reason": problem,
            "workers": usable,
            "workers_configured": self.pool.size,
            "queued": len(self.dispatcher.queue),
            "running": len(self.dispatcher.running),
        }

    # -- operations (what clients call) ------------------------------------------------

    def submit(
        self,
        name: str,
        payload: bytes,
        priority: int | None = None,
        run_after: float | None = None,
        key: str | None = None,
        timeout: float | None = None,
        job_id: str | None = None,
    ) -> defer.Deferred:
        """
        Store and queue a job. C{payload} is the JSON of
        C{{"args": [...], "kwargs": {...}}}.

        @param job_id: the id the client chose (a UUID): submitting again
            with it returns the job stored the first time.
        @return: a Deferred firing, after the commit, with the job's
            description (an existing one's when C{job_id} names one, or
            C{key} an unfinished one). It fails with L{NotRegistered},
            L{PayloadTooLarge}, L{InvalidArguments} or
            L{JobServiceUnavailable}; then nothing was stored.
        """
        return defer.ensureDeferred(
            self._submit(name, payload, priority, run_after, key, timeout, job_id)
        )

    async def _submit(self, name, payload, priority, run_after, key, timeout, job_id) -> dict:
        if self.unavailable:
            raise JobServiceUnavailable(self.unavailable)
        checked = check_submission(name, priority, run_after, key, timeout, job_id)
        priority, run_after, key = checked["priority"], checked["run_after"], checked["key"]
        timeout, job_id = checked["timeout"], checked["job_id"]
        if not isinstance(payload, bytes):
            raise InvalidArguments(f"the payload of {name} must be JSON bytes")
        definition = registry.lookup(name)
        if definition is None:
            known = registry.names()
            raise NotRegistered(
                f"no job is registered under the name {name!r}; registered: "
                f"{', '.join(known[:20]) or 'none'} (jobs are functions decorated with "
                f"@twistedlrp.jobs.job in a 'jobs' or 'tasks' module of an installed app, "
                f"or in settings.LRP_JOB_MODULES)"
            )
        if len(payload) > self.max_payload:
            raise PayloadTooLarge(
                f"the arguments of {name} take {len(payload)} bytes of JSON, more than the "
                f"job service's limit of {self.max_payload} bytes (--max-job-payload)"
            )
        args, kwargs = _decode_arguments(name, payload)
        fields = {
            "name": name,
            "args": args,
            "kwargs": kwargs,
            "priority": definition.priority if priority is None else priority,
            "queue": definition.queue,
            "run_after": datetime.fromtimestamp(run_after, UTC) if run_after else None,
            "max_attempts": definition.retries + 1,
            "retry_delay": definition.retry_delay,
            "timeout": definition.timeout if timeout is None else timeout,
            "key": key,
        }
        created, info = await self.store.run(ops.create, fields, job_id, self.shared)
        if created and (self.queues is None or definition.queue in self.queues):
            self.dispatcher.counters["submitted"] += 1
            record = JobRecord(
                info["id"],
                fields["priority"],
                self.reactor.seconds(),
                name=name,
                max_attempts=fields["max_attempts"],
                retry_delay=fields["retry_delay"],
                timeout=fields["timeout"],
                payload=payload if len(payload) <= KEEP_PAYLOAD else None,
            )
            self.dispatcher.enqueue(record, run_after)
        return self._overlay(info)

    def status(self, job_id: str) -> defer.Deferred:
        """
        @return: a Deferred firing with the job's description (live
            progress while it runs), or failing with L{UnknownJob}.
        """
        self._check_store()
        return self.store.run(ops.get, job_id).addCallback(self._overlay)

    def cancel(self, job_id: str) -> defer.Deferred:
        """
        Cancel a job: a queued one is cancelled at once and never runs; a
        running one is asked to stop (C{cancelled()} turns true), its
        process gets SIGTERM after the grace period and SIGKILL after twice
        that. A finished job is left as it is.

        @return: a Deferred firing with the job's description after the request.
        """
        return defer.ensureDeferred(self._cancel(job_id))

    async def _cancel(self, job_id: str) -> dict:
        self._check_store()
        try:
            job_id = str(uuid.UUID(str(job_id)))
        except ValueError:
            pass  # the store says it is unknown
        # Out of the queue first, before any await: it can no longer be dispatched.
        self.dispatcher.request_cancel(job_id)
        info = await self.store.run(ops.mark_cancel, job_id, self.shared)
        # A running job's cancellation may have been asked before its claim was read.
        self.dispatcher.request_cancel(job_id)
        if info["state"] in FINISHED:
            self._notify(info)
        return self._overlay(info)

    def wait(self, job_id: str, timeout: float) -> defer.Deferred:
        """
        @return: a Deferred firing with the job's description once it is
            finished, or after C{timeout} seconds with its current one.
        """
        return defer.ensureDeferred(self._wait(job_id, timeout))

    async def _wait(self, job_id: str, timeout: float) -> dict:
        self._check_store()
        finished = defer.Deferred()
        # Registered before reading, so a finish in between is not missed.
        self.waiters.setdefault(job_id, []).append(finished)
        try:
            info = await self.status(job_id)
            if info["state"] in FINISHED:
                return info
            call = self.reactor.callLater(max(timeout, 0), _fire, finished, None)
            outcome = await finished
            if call.active():
                call.cancel()
            return outcome if outcome is not None else await self.status(job_id)
        finally:
            waiters = self.waiters.get(job_id)
            if waiters and finished in waiters:
                waiters.remove(finished)
                if not waiters:
                    del self.waiters[job_id]

    def list_jobs(self, state=None, name=None, limit=100) -> defer.Deferred:
        """@return: a Deferred firing with C{{"jobs": [descriptions, newest first]}}."""
        self._check_store()
        d = self.store.run(ops.list_jobs, state, name, min(int(limit), 1000))
        return d.addCallback(lambda jobs: {"jobs": [self._overlay(j) for j in jobs]})

    def stats(self) -> defer.Deferred:
        """@return: a Deferred firing with the service's counters and workers."""
        self._check_store()
        dispatcher = self.dispatcher

        def assemble(counts):
            return {
                "jobs": counts,
                "queued_in_memory": len(dispatcher.queue),
                "running": len(dispatcher.running),
                "workers": self.pool.describe(),
                "workers_started": self.pool.started,
                "counters": dict(dispatcher.counters),
                "store": {"batches": self.store.batches, "operations": self.store.operations},
                "unavailable": self.unavailable,
                "node": {
                    "name": self.node,
                    "shared": self.shared,
                    "queues": self.queues,
                    "lease": self.lease,
                },
            }

        return self.store.run(ops.counts).addCallback(assemble)

    def _check_store(self) -> None:
        if self.store.closed or (
            self.unavailable and not self.dispatcher.accepting and self.store.batches == 0
        ):
            raise JobServiceUnavailable(self.unavailable or "the job store is closed")

    def _overlay(self, info: dict) -> dict:
        record = self.dispatcher.running.get(info["id"])
        if record is not None:
            info["state"] = RUNNING
            info["progress"] = list(record.progress)
        return info

    def _notify(self, info: dict) -> None:
        for d in self.waiters.pop(info["id"], []):
            _fire(d, info)


def _decode_arguments(name: str, payload: bytes) -> tuple[list, dict]:
    """
    @return: the C{args} and C{kwargs} of a submission's JSON payload.
    @raise InvalidArguments: it is not JSON, or not a list and an object.
    """
    try:
        # NaN and Infinity are not JSON (and PostgreSQL's jsonb refuses them).
        data = json.loads(payload, parse_constant=_not_json)
        args, kwargs = data["args"], data["kwargs"]
        if not isinstance(args, list) or not isinstance(kwargs, dict):
            raise ValueError("args must be a list and kwargs an object")
    except (ValueError, KeyError, TypeError) as e:
        raise InvalidArguments(f"the payload of {name} is not valid job arguments: {e}") from None
    return args, kwargs


def _not_json(constant: str):
    raise ValueError(f"{constant} is not JSON")


def _fire(d: defer.Deferred, value) -> None:
    if not d.called:
        d.callback(value)
