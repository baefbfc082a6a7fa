"""A job store in memory for the eager test mode: the store operations, on a dict of rows."""

from __future__ import annotations

import collections
import uuid
from types import SimpleNamespace

from twisted.internet import defer

from twistedlrp.jobs.errors import InvalidArguments, UnknownJob
from twistedlrp.jobs.states import CANCELLED, FINISHED, QUEUED, RUNNING, UNFINISHED
from twistedlrp.jobs.store import operations as ops

#: The jobs it remembers (the oldest are forgotten first).
MAX_KEPT = 10_000


# The columns of a new job beside those its submission gives.
_BLANK = {
    **dict.fromkeys(("progress_total", "started_at", "finished_at", "result")),
    **dict.fromkeys(("progress_message", "error", "worker", "output"), ""),
    **dict.fromkeys(("attempts", "progress_current"), 0),
    "cancel_requested": False,
}


class MemoryStore:
    """The jobs of one process, as the store's operations see them (see the module)."""

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
        described = ops.job_dict(SimpleNamespace(**job), full, arguments)
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
            names = ("attempts", "name", "timeout", "max_attempts", "retry_delay", "priority")
            claimed.update({name: job[name] for name in names}, payload=payload)
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
        if job["state"] == QUEUED:
            error = "cancelled while queued"
            job.update(state=CANCELLED, cancel_requested=True, finished_at=ops.now(), error=error)
        elif job["state"] == RUNNING:
            job["cancel_requested"] = True
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
        states = collections.Counter(self._described(job)["state"] for job in self.jobs.values())
        return dict(states)
