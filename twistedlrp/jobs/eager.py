"""
The eager test mode: with C{settings.LRP_JOBS_EAGER} true, every job call
of the process (C{submit}, C{fn.submit}, C{get}, C{cancel}, C{wait},
C{list_jobs}, C{stats}, and the C{django.tasks} backend, which makes the
same calls) is answered here, and C{submit} runs the job in the calling
thread before it returns its finished C{JobInfo}. No job service is
reached, no database row is written: the jobs are kept in this process's
memory (the last L{MAX_KEPT}; L{reset} forgets them), so a site's own tests
need neither a server nor database access for them.

What a worker does is done the same way: the arguments are checked (JSON,
C{--max-job-payload}'s default of 1 MiB) and round-tripped through JSON,
as is the result; C{progress()} and C{cancelled()} work inside the job
(also in jobs that submit jobs, and in several threads at once); an
exception fails the job with the worker's error text; C{retries} are
honoured at once, without their delays. Not honoured: C{timeout} (a thread
cannot be killed), C{run_after}, C{priority}, C{queue} and C{key} (every
job runs at once), and the job's output is not captured.
"""

from __future__ import annotations

import collections
import json
import logging
import sys
import threading
import uuid
from datetime import UTC, datetime

from twistedlrp.jobs import _context, registry, wire
from twistedlrp.jobs.arguments import canonical_job_id, check_listing, check_wait_timeout
from twistedlrp.jobs.errors import (
    InvalidArguments,
    JobCancelled,
    JobError,
    UnknownJob,
)
from twistedlrp.jobs.outcomes import Outcome
from twistedlrp.jobs.states import FAILED, FINISHED, QUEUED, RUNNING

log = logging.getLogger(__name__)

#: The eager jobs a process remembers (the oldest are forgotten first).
MAX_KEPT = 10_000

_lock = threading.Condition()
_jobs: collections.OrderedDict[str, dict] = collections.OrderedDict()
_cancels: dict[str, threading.Event] = {}


def enabled() -> bool:
    """@return: whether C{settings.LRP_JOBS_EAGER} is true (read at each call)."""
    from django.conf import settings

    return settings.configured and bool(getattr(settings, "LRP_JOBS_EAGER", False))


def reset() -> None:
    """Forget every eager job of this process (between tests)."""
    with _lock:
        _jobs.clear()


def call(op: str, kw: dict):
    """
    Answer one job operation as the job service would (the same dicts), by
    the function of this module of the operation's name.

    @return: the operation's answer.
    @raise JobError: a subclass says why, as the job service's would.
    """
    operation = wire.OPERATIONS.get(op)
    if operation is None or not operation.public:
        raise JobError(f"the eager job mode has no operation {op!r}")
    return operation.call(sys.modules[__name__], operation.arguments(kw))


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _copy(job: dict, full: bool = True, arguments: bool = True) -> dict:
    data = dict(job, progress=list(job["progress"]))
    if not full:
        data.pop("result", None)
        data.pop("output", None)
    if not arguments:
        data.pop("args", None)
        data.pop("kwargs", None)
    return data


def submit(
    name, payload, priority=None, run_after=None, key=None, timeout=None, id=None, wait=None
):
    from twistedlrp.jobs.arguments import DEFAULT_MAX_PAYLOAD, check_payload, check_submission

    checked = check_submission(name, priority, run_after, key, timeout, id)
    id, priority, timeout = checked["job_id"], checked["priority"], checked["timeout"]
    definition = registry.find(name)
    args, kwargs = check_payload(name, payload, DEFAULT_MAX_PAYLOAD)
    with _lock:
        existing = _jobs.get(id) if id else None
        if existing is not None:
            if existing["name"] != name:
                raise InvalidArguments(f"id: {id} is the id of a job of another name")
            return _copy(existing, arguments=False)
        job = {
            "id": id or str(uuid.uuid4()),
            "name": name,
            "state": QUEUED,
            "priority": definition.priority if priority is None else priority,
            "queue": definition.queue,
            "attempts": 0,
            "max_attempts": definition.retries + 1,
            "progress": [0, None, ""],
            "error": "",
            "worker": f"eager:{threading.current_thread().name}",
            "key": key,
            "timeout": definition.timeout if timeout is None else timeout,
            "run_after": None,
            "created_at": _now(),
            "started_at": None,
            "finished_at": None,
            "cancel_requested": False,
            "result": None,
            "output": "",
            "args": args,
            "kwargs": kwargs,
        }
        _jobs[job["id"]] = job
        while len(_jobs) > MAX_KEPT:
            _jobs.popitem(last=False)
        cancel = _cancels[job["id"]] = threading.Event()
    try:
        _run(job, definition, payload, cancel)
    finally:
        with _lock:
            _cancels.pop(job["id"], None)
            _lock.notify_all()
    return _copy(job, arguments=False)


def _run(job: dict, definition, payload: bytes, cancel: threading.Event) -> None:
    """Run C{job}'s attempts in this thread; it ends in a final state."""
    while True:
        with _lock:
            job.update(state=RUNNING, attempts=job["attempts"] + 1, started_at=_now())
        outcome = _attempt(job, definition, payload, cancel)
        with _lock:
            # What the job service decides (L{Outcome.final_state}), but retried at once.
            state, error = outcome.final_state(job["cancel_requested"])
            if state is not None:
                result = outcome.result if outcome.ok else None
                job.update(state=state, result=result, error=error)
            elif job["attempts"] < job["max_attempts"]:
                job.update(state=QUEUED, error=error)
                log.info(
                    "Job %s (%s) failed, attempt %d of %d: retried at once (eager mode)",
                    job["id"],
                    job["name"],
                    job["attempts"],
                    job["max_attempts"],
                )
                continue
            else:
                job.update(state=FAILED, error=error)
                log.warning(
                    "Job %s (%s) failed, attempt %d of %d: %s",
                    job["id"],
                    job["name"],
                    job["attempts"],
                    job["max_attempts"],
                    error.splitlines()[0],
                )
            job["finished_at"] = _now()
            return


def _attempt(job: dict, definition, payload: bytes, cancel: threading.Event) -> Outcome:
    """@return: the outcome of one attempt, as a worker child would send it."""
    from twistedlrp.jobs.arguments import DEFAULT_MAX_PAYLOAD
    from twistedlrp.jobs.child import call_job, describe_error

    def report(current, total, message):
        with _lock:
            job["progress"] = [current, total, message]

    previous = _context.begin_local(job["id"], report, cancel)
    try:
        outcome = Outcome.read(call_job(definition.function, payload, DEFAULT_MAX_PAYLOAD))
        if outcome.ok:
            # As it would come back from a worker: through JSON.
            return Outcome(True, json.loads(json.dumps(outcome.result)))
        return outcome
    except JobCancelled:
        return Outcome(False, error="cancelled", cancelled=True)
    except (Exception, SystemExit) as e:
        # KeyboardInterrupt still stops the tests; anything else fails the job.
        return Outcome(False, error=describe_error(e), cancelled=cancel.is_set())
    finally:
        _context.end_local(previous)


def _get(job_id: str) -> dict:
    job = _jobs.get(canonical_job_id(job_id))
    if job is None:
        raise UnknownJob(f"no job has the id {job_id!r}")
    return job


def status(job_id):
    with _lock:
        return _copy(_get(job_id))


def cancel(job_id):
    """A running job (in another thread) sees C{cancelled()} turn true; a finished one stays."""
    with _lock:
        job = _get(job_id)
        if job["state"] not in FINISHED:
            job["cancel_requested"] = True
            event = _cancels.get(job["id"])
            if event is not None:
                event.set()
        return _copy(job)


def wait(job_id, timeout=60.0, seen=None):
    """@return: the job, once finished or after C{timeout} seconds (for one in another thread)."""
    timeout = check_wait_timeout(timeout)
    with _lock:
        _lock.wait_for(lambda: _get(job_id)["state"] in FINISHED, timeout)
        return _copy(_get(job_id))


def list_jobs(state=None, name=None, limit=100):
    listing = check_listing(state, name, limit)
    state, name, limit = listing["state"], listing["name"], listing["limit"]
    with _lock:
        found = [
            _copy(job, full=False, arguments=False)
            for job in reversed(_jobs.values())
            if (not state or job["state"] == state) and (not name or job["name"] == name)
        ]
    return {"jobs": found[:limit]}


def stats():
    with _lock:
        counts = collections.Counter(job["state"] for job in _jobs.values())
    return {"jobs": dict(counts), "eager": True, "workers": [], "running": counts[RUNNING]}
