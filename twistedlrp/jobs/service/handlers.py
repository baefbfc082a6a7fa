"""
The operations clients call on the job service, from every front end: a method per
L{wire.OPERATIONS}, returning a Deferred of its JSON-ready answer, after its commit.
"""

from __future__ import annotations

import uuid

from twisted.internet import defer
from twisted.logger import Logger

from twistedlrp.jobs import registry
from twistedlrp.jobs.errors import InvalidArguments, JobServiceUnavailable, unsure
from twistedlrp.jobs.protocol import wire
from twistedlrp.jobs.protocol.arguments import (
    canonical_job_id,
    check_listing,
    check_payload,
    check_seen,
    check_submission,
    check_wait_timeout,
    submission_fields,
)
from twistedlrp.jobs.service.outcomes import fire
from twistedlrp.jobs.service.queue import JobRecord, kept
from twistedlrp.jobs.states import FINISHED, RUNNING
from twistedlrp.jobs.store import StoreUnavailable
from twistedlrp.jobs.store import operations as ops
from twistedlrp.ordered_service import cancel_call

log = Logger()


class JobOperations:
    """
    While the store cannot be reached, an operation waits for it up to
    C{store_wait} seconds, then fails with L{JobServiceUnavailable} saying
    so (and whether its change was made).
    @param unavailable: C{()}: why the service takes no work now, or C{None}.
    @param about: C{()}: the service's own part of L{stats}.
    """

    def __init__(self, dispatcher, max_payload: int, store_wait: float | None, unavailable, about):
        self.reactor, self.store, self.dispatcher = dispatcher.reactor, dispatcher.store, dispatcher
        self.node, self.shared, self.queues = dispatcher.node, dispatcher.shared, dispatcher.queues
        self.max_payload, self.store_wait = max_payload, store_wait
        self.unavailable, self.about = unavailable, about
        self.waiters = dispatcher.outcomes.waiters

    def submit(
        self,
        name: str,
        payload: bytes,
        priority: int | None = None,
        run_after: float | None = None,
        key: str | None = None,
        timeout: float | None = None,
        job_id: str | None = None,
        wait: float | None = None,
    ) -> defer.Deferred:
        """
        Store and queue a job (C{payload}: the JSON of C{{"args", "kwargs"}});
        C{wait}: the client's time left, if less than C{store_wait}.
        @return: a Deferred firing after the commit with the job's description
            (an existing one's when C{job_id} names one, or C{key} an unfinished
            one), or failing with L{NotRegistered}, L{PayloadTooLarge},
            L{InvalidArguments} or L{JobServiceUnavailable} (nothing stored).
        """
        args = (name, payload, priority, run_after, key, timeout, job_id, wait)
        return defer.maybeDeferred(self._submit, *args)

    def _submit(self, name, payload, priority, run_after, key, timeout, job_id, wait):
        # Plain callbacks, no coroutine: this runs once per job.
        if unavailable := self.unavailable():
            raise JobServiceUnavailable(unavailable)
        checked = check_submission(name, priority, run_after, key, timeout, job_id)
        run_after, job_id = checked["run_after"], checked["job_id"]
        definition = registry.require(name)
        args, kwargs = check_payload(name, payload, self.max_payload)
        fields = submission_fields(definition, args, kwargs, checked)
        ours = self.queues is None or definition.queue in self.queues
        held = kept(payload)
        # A job that would start at once is stored running on a worker reserved
        # now: one transaction instead of a submission and a claim.
        reserved = start = None
        if ours and held is not None and not run_after:
            reserved = self.dispatcher.reserve(job_id or str(uuid.uuid4()))
        if reserved is not None:
            start = {"id": reserved.job_id, "worker": reserved.worker.ident, "node": self.node}
            if self.shared:
                # Stored running only while this node's lease is fresh.
                start["lease"] = self.dispatcher.claims.lease_check
        within = self.store_wait
        if wait is not None and wait == wait and (within is None or wait < within):
            within = max(float(wait), 0.05)
        d = self.store.run(ops.create, fields, job_id, self.shared, start, within=within)

        def stored(outcome):
            created, info = outcome
            started = reserved is not None and created and info["state"] == RUNNING
            if reserved is not None and not started:
                self.dispatcher.release(reserved)
            if created and ours:
                self.dispatcher.count("submitted", name)
                record = JobRecord.from_row(
                    {**fields, "id": info["id"]},
                    created=self.reactor.seconds(),
                    name=name,
                    payload=held,
                )
                if started:
                    self.dispatcher.start_reserved(reserved, record)
                else:
                    self.dispatcher.enqueue(record, run_after)
            return self._overlay(info)

        def not_stored(failure):
            if reserved is not None:
                self.dispatcher.release(reserved)
            chosen = job_id or (reserved.job_id if reserved is not None else None)
            return _store_failure(failure, "submit", chosen)

        return d.addCallbacks(stored, not_stored)

    def announce(self, job_ids: list[str]) -> defer.Deferred:
        """
        A process committed these jobs in its own transaction: queue them (several
        job nodes: the commit notified them). @return: a Deferred of C{True}.
        @raise InvalidArguments: C{job_ids} is not a list.
        """
        if not isinstance(job_ids, list | tuple):
            raise InvalidArguments(f"job_ids: expected a list of job ids, got {type(job_ids)}")
        if not self.shared and self.dispatcher.accepting and job_ids:
            # Ids that are not UUIDs name no job: ignored, as unknown ones are.
            d = self.take_announced([str(i) for i in job_ids[: ops.TAKE_ANNOUNCED]])
            # They stay announced: the next sweep queues them.
            message = "Could not queue announced jobs yet: {error}"
            d.addErrback(lambda f: log.warn(message, error=f.getErrorMessage()))
        return defer.succeed(True)

    def take_announced(self, job_ids: list[str] | None = None) -> defer.Deferred:
        """Queue the announced jobs C{job_ids} (C{None}: any, for the sweep)."""
        d = self.store.run(ops.take_announced, job_ids)

        def queue(rows):
            for row in rows:
                if self.queues is not None and row["queue"] not in self.queues:
                    continue
                self.dispatcher.count("submitted", row["name"])
                record = JobRecord.from_row(row, payload=kept(row["payload"]))
                run_after = row["run_after"].timestamp() if row["run_after"] else None
                self.dispatcher.enqueue(record, run_after)
            return len(rows)

        return d.addCallback(queue)

    def status(self, job_id: str) -> defer.Deferred:
        """
        @return: a Deferred of the job's description (with live progress), or
            failing with L{UnknownJob}. @raise InvalidArguments: not a string.
        """
        return self._read(ops.get, canonical_job_id(job_id)).addCallback(self._overlay)

    def cancel(self, job_id: str) -> defer.Deferred:
        """Cancel a queued job, or ask a running one to stop; @return: a Deferred of its description."""
        return defer.ensureDeferred(self._cancel(canonical_job_id(job_id)))

    async def _cancel(self, job_id: str) -> dict:
        self._check_store()
        # Out of the queue first, before any await: it can no longer be dispatched.
        self.dispatcher.request_cancel(job_id)
        d = self.store.run(ops.mark_cancel, job_id, self.shared, within=self.store_wait)
        info = await d.addErrback(_store_failure, "cancel")
        # A running job's cancellation may have been asked before its claim was read.
        self.dispatcher.request_cancel(job_id)
        if info["state"] in FINISHED:
            self.dispatcher.outcomes.notify(info)
        return self._overlay(info)

    def wait(self, job_id: str, timeout: float, seen: str | None = None) -> defer.Deferred:
        """
        @param seen: the L{wire.seen_mark} of the job as the caller saw it last:
            answer also once the job differs from it.
        @return: a Deferred of the job's description once it is finished (or
            changed), or after C{timeout} seconds; failing with L{InvalidArguments}.
        """
        return defer.ensureDeferred(self._wait(job_id, timeout, seen))

    async def _wait(self, job_id: str, timeout: float, seen: str | None = None) -> dict:
        job_id = canonical_job_id(job_id)
        timeout = check_wait_timeout(timeout)
        seen = check_seen(seen)
        self._check_store()
        finished = defer.Deferred()
        # Registered before reading, so a finish (or change) in between is not missed.
        self.waiters.setdefault(job_id, []).append(finished)
        if seen is not None:
            self.dispatcher.watchers.setdefault(job_id, []).append(finished)
        try:
            info = await self.status(job_id)
            if info["state"] in FINISHED or (seen is not None and wire.seen_mark(info) != seen):
                return info
            call = self.reactor.callLater(timeout, fire, finished, None)
            outcome = await finished
            cancel_call(call)
            return outcome if outcome is not None else await self.status(job_id)
        finally:
            for table in (self.waiters, self.dispatcher.watchers):
                waiters = table.get(job_id)
                if waiters and finished in waiters:
                    waiters.remove(finished)
                    if not waiters:
                        del table[job_id]

    def list_jobs(self, state=None, name=None, limit=100) -> defer.Deferred:
        """@return: a Deferred of C{{"jobs": [descriptions, newest first]}}; @raise InvalidArguments."""
        d = self._read(ops.list_jobs, *check_listing(state, name, limit).values())
        return d.addCallback(lambda jobs: {"jobs": [self._overlay(j) for j in jobs]})

    def stats(self) -> defer.Deferred:
        """@return: a Deferred firing with the service's counters and workers."""
        d = self._read(ops.counts)
        dispatcher, pool = self.dispatcher, self.dispatcher.pool

        def assemble(counts):
            return {
                "jobs": counts,
                "queued_in_memory": len(dispatcher.queue),
                "running": len(dispatcher.running),
                "workers": pool.describe(),
                "workers_started": pool.started,
                "workers_forked": pool.forked,
                "worker_template": pool.describe_template(),
                "counters": dict(dispatcher.counters),
                "store": {"batches": self.store.batches, "operations": self.store.operations},
                **self.about(),
            }

        return d.addCallback(assemble)

    def _read(self, operation, *args) -> defer.Deferred:
        """@return: a Deferred of the store's read; @raise JobServiceUnavailable: no store."""
        self._check_store()
        d = self.store.read(operation, *args, within=self.store_wait)
        return d.addErrback(_store_failure)

    def _check_store(self) -> None:
        unavailable = self.unavailable()
        if self.store.closed or (
            unavailable and not self.dispatcher.accepting and self.store.batches == 0
        ):
            raise JobServiceUnavailable(unavailable or "the job store is closed")

    def _overlay(self, info: dict) -> dict:
        if (record := self.dispatcher.running.get(info["id"])) is not None:
            info["state"] = RUNNING
            info["progress"] = list(record.progress)
        return info


# What was not done when the store could not be reached in time.
_NOT_DONE = {"submit": "the job was not stored", "cancel": "the cancellation was not stored"}


def _store_failure(failure, op: str = "", job_id: str | None = None):
    """An operation the store did not run in time: say whether C{op}'s change was made."""
    if failure.check(StoreUnavailable):
        if failure.value.started:
            raise unsure(str(failure.value), op, job_id)
        what = f"; {_NOT_DONE[op]}" if op in _NOT_DONE else ""
        raise JobServiceUnavailable(str(failure.value) + what)
    return failure
