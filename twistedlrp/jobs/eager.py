"""
The eager test mode (docs/jobs.md, "Testing your jobs"): with
C{settings.LRP_JOBS_EAGER} true, every job call of the process is answered
here, and C{submit} runs the job in the calling thread before it returns, by
the job service's own operations and dispatcher over a store in memory (as
dramatiq's C{StubBroker} reuses its worker).
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import threading
import time
import types
import uuid

from twisted.internet import defer
from twisted.python.failure import Failure

from twistedlrp.jobs import registry
from twistedlrp.jobs.errors import InvalidArguments, JobCancelled, JobError, UnknownJob
from twistedlrp.jobs.protocol import wire
from twistedlrp.jobs.protocol.arguments import default_max_payload
from twistedlrp.jobs.service.dispatch import Dispatcher
from twistedlrp.jobs.service.handlers import JobOperations
from twistedlrp.jobs.states import FAILED, FINISHED, QUEUED, RUNNING, UNFINISHED
from twistedlrp.jobs.store import operations as ops
from twistedlrp.jobs.workers import context as _context

log = logging.getLogger(__name__)

__all__ = ["MAX_KEPT", "call", "enabled", "reset"]

# Every change to the service happens under it; jobs run outside it.
_lock = threading.Condition()


class _Local(threading.local):
    def __init__(self):
        self.started: list = []  # (worker, name, payload, Deferred) of jobs this thread runs


_local = _Local()
_service: EagerService | None = None

#: The jobs the store in memory remembers (the oldest are forgotten first).
MAX_KEPT = 10_000


# The columns of a new job beside those its submission gives.
_BLANK = {
    **dict.fromkeys(("progress_total", "started_at", "finished_at", "result")),
    **dict.fromkeys(("progress_message", "error", "worker", "output"), ""),
    **dict.fromkeys(("attempts", "progress_current"), 0),
    "cancel_requested": False,
}


class MemoryStore:
    """The jobs of one process, as the store's operations see them, on a dict of rows."""

    closed = False
    away = None

    def __init__(self):
        self.jobs: collections.OrderedDict[str, dict] = collections.OrderedDict()
        # Running for the dispatcher, not begun in their thread yet: shown queued.
        self.starting: set[str] = set()
        self.batches = self.operations = 0

    def run(self, operation, *args, within=None) -> defer.Deferred:
        """@return: a Deferred, already fired, of the answer of this store's method of that name."""
        self.batches += 1
        self.operations += 1
        return defer.maybeDeferred(getattr(self, operation.__name__), *args)

    read = run

    def set_progress(self, job_id: str, current, total, message) -> None:
        self.jobs[job_id].update(
            progress_current=current, progress_total=total, progress_message=message
        )

    def _described(self, job: dict, full=True, arguments=False, shown=True) -> dict:
        described = ops.job_dict(types.SimpleNamespace(**job), full, arguments)
        if shown and job["id"] in self.starting:
            described["state"] = QUEUED
        return described

    def begin(self, job_id: str) -> None:
        """The job, claimed, begins in its thread: it is shown running from now."""
        self.starting.discard(job_id)

    def create(self, fields: dict, job_id=None, notify=False, start=None):
        existing = self.jobs.get(job_id) if job_id else None
        if existing is not None:
            if existing["name"] != fields["name"]:
                raise InvalidArguments(
                    f"id: {job_id} is the id of a job of another name ({existing['name']})"
                )
            return False, self._described(existing, shown=False)
        key = fields.get("key")
        for job in self.jobs.values() if key else ():
            if job["key"] == key and job["state"] in UNFINISHED:
                return False, self._described(job, shown=False)
        now = ops.now()
        new_id = start["id"] if start else job_id or str(uuid.uuid4())
        job = {**fields, **_BLANK, "id": new_id, "state": QUEUED, "created_at": now}
        if start:
            job.update(state=RUNNING, attempts=1, started_at=now, worker=start["worker"])
            self.starting.add(new_id)
        self.jobs[new_id] = job
        while len(self.jobs) > MAX_KEPT:
            self.jobs.popitem(last=False)
        return True, self._described(job, shown=False)

    def get(self, job_id: str, full: bool = True) -> dict:
        job = self.jobs.get(job_id)
        if job is None:
            raise UnknownJob(f"no job has the id {job_id!r}")
        return self._described(job, full, arguments=full)

    def claim(self, job_id: str, worker: str, load: bool = True, node: str = ""):
        job = self.jobs.get(job_id)
        if job is None or job["state"] != QUEUED:
            return None
        job.update(state=RUNNING, attempts=job["attempts"] + 1, started_at=ops.now(), worker=worker)
        self.starting.add(job_id)
        claimed = {"started_at": ops.iso(job["started_at"])}
        if load:
            payload = ops.payload_of(job["args"], job["kwargs"])
            claimed.update({name: job[name] for name in ops.SETTINGS}, payload=payload)
        return claimed

    def finish(self, job_id: str, state: str, fields: dict, describe: bool = True, node=None):
        job = self.jobs[job_id]
        job.update(fields, state=state)
        self.starting.discard(job_id)
        if state in FINISHED:
            job["finished_at"] = fields.get("finished_at") or ops.now()
        return self.get(job_id) if describe else None

    def requeue(self, job_id: str, error: str, count_attempt: bool, node=None) -> None:
        job = self.jobs[job_id]
        self.starting.discard(job_id)
        attempts = job["attempts"] - (0 if count_attempt else 1)
        job.update(state=QUEUED, worker="", error=error, attempts=max(attempts, 0))

    def mark_cancel(self, job_id: str, notify: bool = False) -> dict:
        self.get(job_id)
        job = self.jobs[job_id]
        job.update(ops.cancel_fields(job["state"]))
        return self.get(job_id)

    def list_jobs(self, state, name, limit: int) -> list[dict]:
        described = (self._described(job, full=False) for job in reversed(self.jobs.values()))
        found = [
            job
            for job in described
            if (not state or job["state"] == state) and (not name or job["name"] == name)
        ]
        return found[: max(limit, 0)]

    def counts(self) -> dict:
        return dict(collections.Counter(self._described(j)["state"] for j in self.jobs.values()))


def enabled() -> bool:
    """@return: whether C{settings.LRP_JOBS_EAGER} is true (read at each call)."""
    from django.conf import settings

    return settings.configured and bool(getattr(settings, "LRP_JOBS_EAGER", False))


def reset() -> None:
    """Forget every eager job of this process (between tests)."""
    global _service
    with _lock:
        _service = None


def call(op: str, kw: dict):
    """Answer one job operation as the job service would (@raise JobError), its jobs run first."""
    operation = wire.OPERATIONS.get(op)
    if operation is None or not operation.public:
        raise JobError(f"the eager job mode has no operation {op!r}")
    arguments = operation.arguments(kw)
    if op == "submit":
        with contextlib.suppress(JobError):  # the service says so
            registry.find(arguments["name"])  # the site's job modules, imported once needed
    global _service
    with _lock:
        if _service is None:
            _service = EagerService()
        service = _service
        d = defer.maybeDeferred(operation.call, service.operations, arguments)
        _lock.notify_all()
    service.run_started()
    outcome = service.outcome_of(d)
    if op == "submit":
        # Finished now (unless another thread runs it): as it is now.
        with _lock:
            outcome = service.outcome_of(service.operations.status(outcome["id"]))
        outcome.pop("args", None)
        outcome.pop("kwargs", None)
    return outcome


class _Call(threading.Timer):
    """The service's C{callLater}: an C{IDelayedCall} made by a timer thread, under the lock."""

    def __init__(self, delay, fn, *args, **kwargs):
        super().__init__(max(delay, 0), fn, args, kwargs)
        self.daemon = True
        self.time = time.time() + delay
        self.start()

    def run(self) -> None:
        self.finished.wait(self.interval)
        with _lock:
            # finished: cancelled (cancel()), or from now on called.
            if not self.finished.is_set():
                self.finished.set()
                self.function(*self.args, **self.kwargs)
                _lock.notify_all()

    def getTime(self) -> float:
        return self.time

    def active(self) -> bool:
        return not self.finished.is_set()


class EagerWorker:
    """A worker whose job the thread that dispatched it runs (L{EagerService.run_started})."""

    pid = os.getpid()
    kill_reason = None

    def __init__(self):
        self.ident = f"eager:{threading.current_thread().name}"
        self.state = "idle"
        self.job_id: str | None = None
        self.cancel_event = threading.Event()

    def run(self, job_id: str, name: str, payload: bytes, attempt: int) -> defer.Deferred:
        self.state, self.job_id = "busy", job_id
        d = defer.Deferred()
        _local.started.append((self, name, payload, d))
        return d

    def cancel(self, job_id: str) -> None:
        if job_id == self.job_id:
            self.cancel_event.set()

    def signal(self, name: str, reason: str) -> None:
        """A thread cannot be killed: the job's timeout and a cancel's grace are not kept."""

    def take_output(self) -> str:
        return ""

    def gone(self, failure) -> bool:
        return False


class _EagerPool:
    """As many workers as the threads that submit jobs (one made for each job)."""

    size = started = forked = 0
    workers: list = []

    def idle(self) -> list[EagerWorker]:
        return [EagerWorker()]

    def job_done(self, worker, max_jobs, max_memory) -> bool:
        worker.state = "dead"
        return False

    describe = staticmethod(list)
    describe_template = stop_idle = staticmethod(lambda: None)


class _EagerOperations(JobOperations):
    def _overlay(self, info: dict) -> dict:
        # Not running yet where the caller can tell (see MemoryStore.starting).
        return info if info["id"] in self.store.starting else super()._overlay(info)


def _about() -> dict:
    node = {"name": "eager", "shared": False, "queues": None, "lease": None}
    retention = {"keep": None, "passes": 0, "deleted": 0}
    return {"unavailable": None, "node": node, "retention": retention, "eager": True}


class EagerService:
    """The job service's operations and dispatcher, over a store in memory."""

    def __init__(self):
        self.reactor = types.SimpleNamespace(seconds=time.time, callLater=_Call)
        self.store = MemoryStore()
        self.max_payload = default_max_payload()
        options = {"max-jobs-per-worker": 0, "max-worker-memory": 0}
        self.dispatcher = Dispatcher(
            self.reactor, self.store, options, {}, 0.0, node="eager", pool=_EagerPool()
        )
        self.dispatcher.accepting = True
        self.operations = _EagerOperations(
            self.dispatcher, self.max_payload, None, unavailable=lambda: None, about=_about
        )

    def run_started(self) -> None:
        """Run the jobs this thread's calls started, and those they start, retries at once."""
        while True:
            with _lock:
                # Delayed jobs (run_after, retries) are not waited for.
                self.dispatcher.queue.release_all()
                self.dispatcher.dispatch()
            started, _local.started = _local.started, []
            if not started:
                return
            for worker, name, payload, d in started:
                with _lock:
                    self.store.begin(worker.job_id)
                outcome = self._attempt(worker, name, payload)
                with _lock:
                    d.callback(outcome)
                    job = self.store.jobs.get(worker.job_id) or {}
                    if job.get("state") == FAILED:
                        # As the job service logs it, where a site's tests see it.
                        error = (job["error"] or FAILED).splitlines()[0]
                        attempts = job["attempts"], job["max_attempts"]
                        message = "Job %s (%s) failed, attempt %d of %d: %s"
                        log.warning(message, job["id"], name, *attempts, error)
                    _lock.notify_all()

    def outcome_of(self, d: defer.Deferred):
        """@return: the result of C{d}, once it has one (another thread may give it)."""
        outcome: list = []
        d.addBoth(outcome.append)
        with _lock:
            _lock.wait_for(lambda: outcome)
        if isinstance(outcome[0], Failure):
            outcome[0].raiseException()
        return outcome[0]

    def _attempt(self, worker: EagerWorker, name: str, payload: bytes) -> dict:
        """@return: the outcome of one attempt, as a worker child sends it."""
        from twistedlrp.jobs.workers.main import call_job, describe_error

        def report(current, total, message):
            with _lock:
                self.dispatcher.progress(worker.job_id, current, total, message)

        previous = _context.begin_local(worker.job_id, report, worker.cancel_event)
        try:
            outcome = call_job(registry.find(name).function, payload, self.max_payload)
            if outcome["ok"]:
                # As it would come back from a worker: through JSON.
                outcome["result"] = json.loads(json.dumps(outcome["result"]))
        except JobCancelled:
            outcome = {"ok": False, "error": "cancelled", "cancelled": True}
        except (Exception, SystemExit) as e:
            # KeyboardInterrupt still stops the tests; anything else fails the attempt.
            cancelled = worker.cancel_event.is_set()
            outcome = {"ok": False, "error": describe_error(e), "cancelled": cancelled}
        finally:
            _context.end_local(previous)
        return outcome
