"""
The job service: the AMP server, the scheduler and the bookkeeping of
running jobs.

L{JobService} holds the queue in memory (it knows what it queued: there is
no polling of the database), ordered by priority then age, with delayed
jobs (C{run_after}, retries) waiting on one timer. Free workers take the
next job; the claim, every state change and every result go through the
store thread (L{twistedlrp.jobs.store}) and are acknowledged only after
their commit.

The operations clients use (L{JobService.submit}, C{status}, C{cancel},
C{wait}, C{list_jobs}, C{stats}) are plain methods returning Deferreds of
JSON-ready dicts; the AMP front end (L{ServiceProtocol}) and any other
front end (Perspective Broker) call the same methods.
"""

from __future__ import annotations

import heapq
import hmac
import itertools
import json
import os
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime

from twisted.internet import defer, protocol
from twisted.logger import Logger
from twisted.protocols import amp

from twistedlrp.jobs import protocol as wire
from twistedlrp.jobs import registry, store
from twistedlrp.jobs.errors import (
    AuthenticationFailed,
    InvalidArguments,
    JobError,
    JobServiceUnavailable,
    NotRegistered,
    PayloadTooLarge,
)
from twistedlrp.jobs.workers import WorkerPool

log = Logger()

DEFAULT_CANCEL_GRACE = 5.0
# Payloads up to this size stay in memory while queued, so a claim needs no read.
_KEEP_PAYLOAD = 64 * 1024


@dataclass
class _Active:
    """A job a worker is running."""

    id: str
    name: str
    worker: object
    attempts: int
    max_attempts: int
    retry_delay: float
    timeout: float | None
    priority: int = 0
    payload: bytes | None = None
    progress: list = field(default_factory=lambda: [0, None, ""])
    cancel_requested: bool = False
    timers: list = field(default_factory=list)


class JobService:
    """
    @param options: the server's checked options (C{workers},
        C{max-job-payload}, C{max-jobs-per-worker}, C{max-worker-memory},
        C{settings}, C{pythonpath}).
    @param cancel_grace: seconds a running job has to stop after a cancel
        before SIGTERM (and as long again before SIGKILL).
    @param worker_env: extra environment for the worker children.
    """

    def __init__(self, reactor, options, cancel_grace=DEFAULT_CANCEL_GRACE, worker_env=None):
        self.reactor = reactor
        self.options = options
        self.max_payload = options["max-job-payload"]
        self.cancel_grace = cancel_grace
        self.store = store.Store(reactor)
        self.pool = WorkerPool(
            reactor,
            options["workers"],
            settings_module=os.environ["DJANGO_SETTINGS_MODULE"],
            pythonpath=list(options["pythonpath"]),
            max_payload=self.max_payload,
            env=worker_env or {},
            on_ready=self._worker_ready,
            on_died=self._worker_died,
            on_progress=self._progress,
        )
        self.unavailable: str | None = "the job service is starting"
        self.store_ready = False
        self.accepting = False
        self.queued: dict[str, tuple] = {}
        # What the service knows of a queued job, so that claiming it is one UPDATE.
        self._meta: dict[str, dict] = {}
        self._ready: list[tuple] = []
        self._delayed: list[tuple] = []
        self._delayed_call = None
        self._seq = itertools.count()
        self.active: dict[str, _Active] = {}
        self.waiters: dict[str, list[defer.Deferred]] = {}
        self._drained: list[defer.Deferred] = []
        # Jobs being claimed: their outcome must be recorded before the store closes.
        self._starting: set[defer.Deferred] = set()
        self.counters = {"submitted": 0, "succeeded": 0, "failed": 0, "cancelled": 0, "retried": 0}

    # -- life ----------------------------------------------------------------------

    async def start(self) -> None:
        """
        Open the store, recover what a dead server left, start the workers.
        When the job table is missing the service stays up but refuses work
        with a message saying to migrate (and starts no workers).
        """
        self.store.start()
        reason = await self.store.prepare()
        if reason:
            self.unavailable = reason
            log.error("The job service cannot run: {reason}", reason=reason)
            return
        self.store_ready = True
        queued, failed = await self.store.run(store.recover)
        for job_id in failed:
            log.warn("Job {job_id} was running when the server died: failed", job_id=job_id)
        for row in queued:
            self._enqueue(
                row["id"],
                row["priority"],
                row["created_at"].timestamp(),
                row["run_after"].timestamp() if row["run_after"] else None,
            )
        self.unavailable = None
        self.accepting = True
        self.pool.start()
        log.info(
            "Job service ready: {queued} queued job(s), {workers} worker(s) starting, jobs: {names}",
            queued=len(self.queued),
            workers=self.pool.size,
            names=", ".join(registry.names()) or "(none registered)",
        )

    async def stop(self, deadline: float) -> None:
        """
        Stop taking work; running jobs may finish until shortly before
        C{deadline}, then their processes are killed and the jobs go back
        to the queue (without using up an attempt). Ends with the store
        thread once every change is committed.
        """
        self.accepting = False
        if self.unavailable is None:
            self.unavailable = "the job service is shutting down"
        if self._delayed_call is not None and self._delayed_call.active():
            self._delayed_call.cancel()
        self.pool.stop_idle()
        for waiters in self.waiters.values():
            for d in waiters:
                if not d.called:
                    d.errback(JobServiceUnavailable("the job service is shutting down"))
        self.waiters.clear()
        remaining = deadline - self.reactor.seconds()
        margin = min(1.0, max(0.3, remaining * 0.2))
        if self.active:
            log.info("Waiting for {n} running job(s) to finish", n=len(self.active))
            d = defer.Deferred()
            self._drained.append(d)
            await _within(self.reactor, d, remaining - margin)
        if self.active:
            log.warn(
                "{n} job(s) still running at the graceful deadline: stopping them and "
                "putting them back in the queue",
                n=len(self.active),
            )
        self.pool.kill_all("shutdown")
        if self._starting:
            await _within(
                self.reactor,
                defer.DeferredList(list(self._starting)),
                max(deadline - self.reactor.seconds() - 0.2, 0.5),
            )
        await _within(
            self.reactor,
            self.pool.when_all_ended(),
            max(deadline - self.reactor.seconds() - 0.1, 0.5),
        )
        await _within(self.reactor, self.store.stop(), max(deadline - self.reactor.seconds(), 0.5))

    def force_exit(self) -> None:
        self.pool.kill_all("shutdown")

    def health(self) -> dict:
        return {
            "state": "unavailable" if self.unavailable else "running",
            "reason": self.unavailable,
            "workers": sum(1 for w in self.pool.workers if w.state in ("idle", "busy")),
            "queued": len(self.queued),
            "running": len(self.active),
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
    ) -> defer.Deferred:
        """
        Store and queue a job. C{payload} is the JSON of
        C{{"args": [...], "kwargs": {...}}}.

        @return: a Deferred firing, after the commit, with the job's
            description (an existing unfinished job's when C{key} matches one).
            It fails with L{NotRegistered}, L{PayloadTooLarge},
            L{InvalidArguments} or L{JobServiceUnavailable}; then nothing was stored.
        """
        return defer.ensureDeferred(self._submit(name, payload, priority, run_after, key, timeout))

    async def _submit(self, name, payload, priority, run_after, key, timeout) -> dict:
        self._check_available()
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
        try:
            # NaN and Infinity are not JSON (and PostgreSQL's jsonb refuses them).
            data = json.loads(payload, parse_constant=_not_json)
            args, kwargs = data["args"], data["kwargs"]
            if not isinstance(args, list) or not isinstance(kwargs, dict):
                raise ValueError("args must be a list and kwargs an object")
        except (ValueError, KeyError, TypeError) as e:
            raise InvalidArguments(
                f"the payload of {name} is not valid job arguments: {e}"
            ) from None
        fields = {
            "name": name,
            "args": args,
            "kwargs": kwargs,
            "priority": definition.priority if priority is None else int(priority),
            "queue": definition.queue,
            "run_after": datetime.fromtimestamp(run_after, UTC) if run_after else None,
            "max_attempts": definition.retries + 1,
            "retry_delay": definition.retry_delay,
            "timeout": definition.timeout if timeout is None else timeout,
            "key": key or None,
        }
        created, info = await self.store.run(store.create, fields)
        if created:
            self.counters["submitted"] += 1
            meta = {
                "name": name,
                "attempts": 0,
                "max_attempts": fields["max_attempts"],
                "retry_delay": fields["retry_delay"],
                "timeout": fields["timeout"],
                "priority": fields["priority"],
                "payload": payload if len(payload) <= _KEEP_PAYLOAD else None,
            }
            self._enqueue(info["id"], fields["priority"], time.time(), run_after, meta)
            self._dispatch()
        return self._overlay(info)

    def status(self, job_id: str) -> defer.Deferred:
        """
        @return: a Deferred firing with the job's description (live
            progress while it runs), or failing with L{UnknownJob}.
        """
        self._check_store()
        return self.store.run(store.get, job_id).addCallback(self._overlay)

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
        self._meta.pop(job_id, None)
        if self.queued.pop(job_id, None) is not None:
            self.counters["cancelled"] += 1
        info = await self.store.run(store.mark_cancel, job_id)
        active = self.active.get(job_id)
        if active is not None and not active.cancel_requested:
            active.cancel_requested = True
            worker = active.worker
            worker.cancel(job_id)
            log.info("Job {job_id}: cancellation requested", job_id=job_id)
            active.timers.append(
                self.reactor.callLater(self.cancel_grace, worker.signal, "TERM", "cancel")
            )
            active.timers.append(
                self.reactor.callLater(2 * self.cancel_grace, worker.signal, "KILL", "cancel")
            )
        if info["state"] in store.FINISHED:
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
            if info["state"] in store.FINISHED:
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
        d = self.store.run(store.list_jobs, state, name, min(int(limit), 1000))
        return d.addCallback(lambda jobs: {"jobs": [self._overlay(j) for j in jobs]})

    def stats(self) -> defer.Deferred:
        """@return: a Deferred firing with the service's counters and workers."""
        self._check_store()

        def assemble(counts):
            return {
                "jobs": counts,
                "queued_in_memory": len(self.queued),
                "running": len(self.active),
                "workers": self.pool.describe(),
                "workers_started": self.pool.started,
                "counters": dict(self.counters),
                "store": {"batches": self.store.batches, "operations": self.store.operations},
                "unavailable": self.unavailable,
            }

        return self.store.run(store.counts).addCallback(assemble)

    def _check_available(self) -> None:
        if self.unavailable:
            raise JobServiceUnavailable(self.unavailable)

    def _check_store(self) -> None:
        if self.store.closed or (
            self.unavailable and not self.accepting and self.store.batches == 0
        ):
            raise JobServiceUnavailable(self.unavailable or "the job store is closed")

    def _overlay(self, info: dict) -> dict:
        active = self.active.get(info["id"])
        if active is not None:
            info["state"] = store.RUNNING
            info["progress"] = list(active.progress)
        return info

    def _notify(self, info: dict) -> None:
        for d in self.waiters.pop(info["id"], []):
            _fire(d, info)

    # -- scheduling ----------------------------------------------------------------------

    def _enqueue(
        self,
        job_id: str,
        priority: int,
        created: float,
        run_after: float | None,
        meta: dict | None = None,
    ) -> None:
        entry = (-priority, created, next(self._seq), job_id)
        self.queued[job_id] = entry
        if meta is not None:
            self._meta[job_id] = meta
        if run_after and run_after > time.time():
            heapq.heappush(self._delayed, (run_after, entry))
            self._schedule_delayed()
        else:
            heapq.heappush(self._ready, entry)

    def _schedule_delayed(self) -> None:
        if not self._delayed or not self.accepting:
            return
        first = self._delayed[0][0]
        delay = max(first - time.time(), 0)
        call = self._delayed_call
        if call is not None and call.active():
            if call.getTime() <= self.reactor.seconds() + delay:
                return
            call.cancel()
        self._delayed_call = self.reactor.callLater(delay, self._release_delayed)

    def _release_delayed(self) -> None:
        self._delayed_call = None
        now = time.time()
        while self._delayed and self._delayed[0][0] <= now:
            _, entry = heapq.heappop(self._delayed)
            heapq.heappush(self._ready, entry)
        self._schedule_delayed()
        self._dispatch()

    def _dispatch(self) -> None:
        if not self.accepting:
            return
        while self._ready:
            idle = self.pool.idle()
            if not idle:
                return
            entry = heapq.heappop(self._ready)
            job_id = entry[3]
            if self.queued.get(job_id) is not entry:
                continue  # cancelled, or queued again under a newer entry
            del self.queued[job_id]
            meta = self._meta.pop(job_id, None)
            worker = idle[0]
            worker.state = "claiming"
            d = defer.ensureDeferred(self._start_job(worker, job_id, meta))
            d.addErrback(
                lambda f, job_id=job_id: log.failure(
                    "Could not start job {job_id}", f, job_id=job_id
                )
            )
            self._starting.add(d)
            d.addBoth(lambda _, d=d: self._starting.discard(d))

    async def _start_job(self, worker, job_id: str, meta: dict | None) -> None:
        if meta is not None and meta["payload"] is not None:
            # The service owns its queue, so the job is sent at once and the
            # claim is committed with the next batch meanwhile. (Were the
            # server to die before that commit, the job is still queued in
            # the store and runs again after a restart.)
            active = self._run_on(worker, job_id, dict(meta, attempts=meta["attempts"] + 1))
            claimed = await self.store.run(store.claim, job_id, worker.ident, False)
            if claimed is None and self.active.get(job_id) is active:
                # No longer queued in the store (changed behind our back):
                # this run must not count; stop it and record nothing.
                log.warn("Job {job_id} was no longer queued in the store: stopped", job_id=job_id)
                self._forget(active)
                worker.signal("KILL", "orphan")
            return
        claimed = await self.store.run(store.claim, job_id, worker.ident, True)
        if claimed is None:
            # Cancelled (or taken) meanwhile.
            if worker.state == "claiming":
                worker.state = "idle"
            self._dispatch()
            return
        if worker.state != "claiming":
            # The worker died (or the service began stopping) during the claim.
            await self.store.run(
                store.requeue, job_id, "its worker ended before the job started", False
            )
            if self.accepting:
                self._enqueue(job_id, claimed["priority"], time.time(), None)
                self._dispatch()
            return
        self._run_on(worker, job_id, claimed)

    def _run_on(self, worker, job_id: str, claimed: dict) -> _Active:
        """Send a claimed job to C{worker}; @return: its L{_Active} record."""
        active = _Active(
            id=job_id,
            name=claimed["name"],
            worker=worker,
            attempts=claimed["attempts"],
            max_attempts=claimed["max_attempts"],
            retry_delay=claimed["retry_delay"],
            timeout=claimed["timeout"],
            priority=claimed["priority"],
            payload=claimed["payload"] if len(claimed["payload"]) <= _KEEP_PAYLOAD else None,
        )
        self.active[job_id] = active
        if active.timeout:
            active.timers.append(
                self.reactor.callLater(active.timeout, worker.signal, "KILL", "timeout")
            )
        d = worker.run(job_id, claimed["name"], claimed["payload"], claimed["attempts"])
        d.addCallbacks(
            lambda outcome: self._job_ended(active, outcome),
            # The worker died: _worker_died, called from processEnded, decides.
            lambda failure: None,
        )
        d.addErrback(lambda f: log.failure("While finishing job {job_id}", f, job_id=job_id))
        return active

    # -- worker events --------------------------------------------------------------

    def _worker_ready(self, worker) -> None:
        self._dispatch()

    def _progress(self, job_id, current, total, message) -> None:
        active = self.active.get(job_id)
        if active is not None:
            active.progress = [current, total, message]
            self.store.set_progress(job_id, current, total, message)

    def _job_ended(self, active: _Active, outcome: dict) -> None:
        if self.active.get(active.id) is not active:
            return
        self._forget(active)
        worker = active.worker
        output = worker.take_output()
        if self.pool.job_done(
            worker, self.options["max-jobs-per-worker"], self.options["max-worker-memory"]
        ):
            self._dispatch()
        fields = {"output": output, "worker": worker.ident}
        fields["progress_current"], fields["progress_total"], fields["progress_message"] = (
            active.progress
        )
        if outcome.get("ok") and not active.cancel_requested:
            self.counters["succeeded"] += 1
            self._finish(active, store.SUCCEEDED, result=outcome.get("result"), error="", **fields)
        elif active.cancel_requested or outcome.get("cancelled"):
            self.counters["cancelled"] += 1
            if outcome.get("ok"):
                fields["result"] = outcome.get("result")
            error = "cancelled while running" + (
                ""
                if outcome.get("ok") or outcome.get("error") == "cancelled"
                else f": {outcome.get('error')}"
            )
            self._finish(active, store.CANCELLED, error=error, **fields)
        else:
            self._retry_or_fail(active, outcome.get("error") or "failed", fields)

    def _worker_died(self, worker, job_id: str, how: str) -> None:
        active = self.active.get(job_id)
        if active is None:
            return
        self._forget(active)
        fields = {"output": worker.take_output(), "worker": worker.ident}
        reason = worker.kill_reason
        if reason == "shutdown":
            log.info("Job {job_id} interrupted by the shut-down: back in the queue", job_id=job_id)
            self.store.run(
                store.requeue,
                job_id,
                "interrupted by a server shut-down before it finished; it runs again",
                False,
            )
        elif reason == "timeout":
            error = (
                f"timed out after {active.timeout:g} s: its worker process {worker.pid} was "
                f"killed ({how})"
            )
            log.warn("Job {job_id} {error}", job_id=job_id, error=error)
            self._retry_or_fail(active, error, fields)
        elif reason == "cancel" or active.cancel_requested:
            self.counters["cancelled"] += 1
            error = f"cancelled while running: its worker process {worker.pid} was stopped ({how})"
            self._finish(active, store.CANCELLED, error=error, **fields)
        else:
            error = f"the worker died: process {worker.pid} {how} while running the job"
            log.warn("Job {job_id}: {error}", job_id=job_id, error=error)
            self._retry_or_fail(active, error, fields)

    def _forget(self, active: _Active) -> None:
        self.active.pop(active.id, None)
        for timer in active.timers:
            if timer.active():
                timer.cancel()
        if not self.active:
            drained, self._drained = self._drained, []
            for d in drained:
                _fire(d, None)

    def _retry_or_fail(self, active: _Active, error: str, fields: dict) -> None:
        if active.attempts < active.max_attempts and not self.store.closed:
            delay = registry.retry_delay(active.retry_delay, active.attempts)
            run_after = time.time() + delay
            self.counters["retried"] += 1
            log.info(
                "Job {job_id} attempt {n} of {max} failed; retrying in {delay:.1f} s",
                job_id=active.id,
                n=active.attempts,
                max=active.max_attempts,
                delay=delay,
            )
            d = self.store.run(
                store.finish,
                active.id,
                store.QUEUED,
                dict(fields, error=error, run_after=datetime.fromtimestamp(run_after, UTC)),
                False,
            )
            meta = {
                "name": active.name,
                "attempts": active.attempts,
                "max_attempts": active.max_attempts,
                "retry_delay": active.retry_delay,
                "timeout": active.timeout,
                "priority": active.priority,
                "payload": active.payload,
            }

            def queued(_):
                if self.accepting:
                    self._enqueue(active.id, active.priority, time.time(), run_after, meta)
                    self._dispatch()

            d.addCallback(queued)
            d.addErrback(self._unrecorded, active)
        else:
            self.counters["failed"] += 1
            self._finish(active, store.FAILED, error=error, **fields)

    def _finish(self, active: _Active, state: str, **fields) -> None:
        # Read the job back only when someone waits for it; a waiter that
        # comes later reads it after this commit anyway.
        d = self.store.run(store.finish, active.id, state, fields, active.id in self.waiters)
        d.addCallback(lambda info: info and self._notify(info))
        d.addErrback(self._unrecorded, active)

    def _unrecorded(self, failure, active: _Active) -> None:
        """
        The end of an attempt could not be stored (a value the database
        refuses): record the failure alone rather than leave the job C{running}.
        """
        log.failure("Could not record job {job_id}", failure, job_id=active.id)
        if self.store.closed:
            return
        error = f"the outcome of attempt {active.attempts} could not be stored: "
        error += failure.getErrorMessage()
        d = self.store.run(
            store.finish, active.id, store.FAILED, {"error": error}, active.id in self.waiters
        )
        d.addCallback(lambda info: info and self._notify(info))
        d.addErrback(lambda f: log.failure("Could not fail job {job_id}", f, job_id=active.id))


def _not_json(constant: str):
    raise ValueError(f"{constant} is not JSON")


def _fire(d: defer.Deferred, value) -> None:
    if not d.called:
        d.callback(value)


async def _within(reactor, d: defer.Deferred, seconds: float) -> bool:
    """@return: whether C{d} fired within C{seconds} (it is cancelled otherwise)."""
    d.addTimeout(max(seconds, 0.01), reactor)
    try:
        await d
    except defer.TimeoutError:
        return False
    except Exception:
        log.failure("While stopping the job service")
    return True


# -- the AMP front end ---------------------------------------------------------------


class ServiceProtocol(wire.QuietAMP):
    """
    One client connection. With C{secret} set, nothing but C{Challenge}
    and C{Login} is answered before a successful Login; anything else, or
    a wrong digest, gets an error and the connection is closed.
    """

    def __init__(self, service: JobService, secret: bytes | None):
        super().__init__()
        self.service = service
        self.secret = secret
        self.authenticated = secret is None
        self.nonce: bytes | None = None

    def locateResponder(self, name):
        responder = super().locateResponder(name)
        if self.authenticated or name in (b"Challenge", b"Login"):
            return responder

        def refuse(box):
            log.warn(
                "Job client {peer} sent {command} before logging in: disconnected",
                peer=self.transport.getPeer(),
                command=name.decode("ascii", "replace"),
            )
            return defer.fail(
                amp.RemoteAmpError(
                    wire.FATAL_ERRORS[AuthenticationFailed],
                    "this job service requires Login (challenge-response with the shared "
                    "secret) before any other command",
                    fatal=True,
                )
            )

        return refuse

    @wire.Challenge.responder
    def challenge(self):
        self.nonce = wire.new_nonce()
        return {"nonce": self.nonce}

    @wire.Login.responder
    def login(self, digest):
        if self.secret is None:
            return {"ok": True}
        nonce, self.nonce = self.nonce, None
        if nonce is None or not hmac.compare_digest(digest, wire.digest(self.secret, nonce)):
            log.warn(
                "Job client {peer} failed to log in (wrong secret): disconnected",
                peer=self.transport.getPeer(),
            )
            raise AuthenticationFailed("login refused: wrong secret (or no Challenge first)")
        self.authenticated = True
        return {"ok": True}

    @wire.Submit.responder
    def submit(self, name, payload, priority=None, run_after=None, key=None, timeout=None):
        d = _guard(self.service.submit, name, payload, priority, run_after, key, timeout)
        return d.addCallback(lambda job: {"job": job})

    @wire.Status.responder
    def status(self, job_id):
        return _guard(self.service.status, job_id).addCallback(lambda job: {"job": job})

    @wire.Cancel.responder
    def cancel(self, job_id):
        return _guard(self.service.cancel, job_id).addCallback(lambda job: {"job": job})

    @wire.Wait.responder
    def wait(self, job_id, timeout):
        return _guard(self.service.wait, job_id, timeout).addCallback(lambda job: {"job": job})

    @wire.ListJobs.responder
    def list_jobs(self, limit, state=None, name=None):
        return _guard(self.service.list_jobs, state, name, limit).addCallback(
            lambda jobs: {"jobs": jobs}
        )

    @wire.Stats.responder
    def stats(self):
        return _guard(self.service.stats).addCallback(lambda stats: {"stats": stats})


def _guard(fn, *args) -> defer.Deferred:
    """
    Call a service operation; an unexpected error is logged and sent as a
    L{JobError} (an error AMP does not know would close the connection).
    """

    def translate(failure):
        if failure.check(JobError):
            return failure
        log.failure("Job service operation {op} failed", failure, op=fn.__name__)
        raise JobError(f"internal error in the job service: {failure.getErrorMessage()}")

    return defer.maybeDeferred(fn, *args).addErrback(translate)


class ServiceFactory(protocol.Factory):
    """Builds a L{ServiceProtocol} per connection; C{secret} C{None} means trusted (UNIX socket)."""

    noisy = False

    def __init__(self, service: JobService, secret: bytes | None):
        self.service = service
        self.secret = secret

    def buildProtocol(self, addr):
        return ServiceProtocol(self.service, self.secret)
