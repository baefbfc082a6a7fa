"""
Submissions that join the caller's database transaction (docs/jobs.md, "Jobs and
transactions"), stored through the caller's own connection; the service learns of
them at the commit (C{NOTIFY} on PostgreSQL, an C{Announce} or its sweep on SQLite).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from datetime import UTC, datetime

from twistedlrp.jobs import registry
from twistedlrp.jobs.errors import JobError, JobServiceUnavailable
from twistedlrp.jobs.protocol.arguments import (
    canonical_job_id,
    check_payload,
    check_submitted,
    default_max_payload,
    submission_fields,
)
from twistedlrp.jobs.states import QUEUED

# Stdlib logging, not Twisted's: worker processes import this module and no Twisted.
log = logging.getLogger(__name__)

#: Seconds the word to the job service after a commit may take (its sweep finds the job anyway).
ANNOUNCE_TIMEOUT = 2.0
#: Job ids one Announce carries (an AMP value holds 64 KiB).
ANNOUNCE_BATCH = 500
# Ids waiting for their commit, per thread: a rolled-back transaction's stay until
# the next commit sends them too (the service ignores them), so the list is capped.
_MAX_PENDING = 10_000


class _Local(threading.local):
    outside = 0  # depth of outside_transaction() blocks

    def __init__(self):
        self.pending: list[str] = []  # ids committed, not announced yet


_local = _Local()
_max_payload: int | None = None  # the option's default until the server or its child says


def limit_payload(limit: int) -> None:
    """Set this process's C{--max-job-payload} (the server and its children know it)."""
    global _max_payload
    _max_payload = int(limit)


@contextlib.contextmanager
def outside_transaction():
    """
    Within this block, submissions (and cancellations) from this thread go to the job
    service, whatever becomes of the caller's transaction (on SQLite, L{detached}).
    """
    depth = _local.outside
    _local.outside = depth + 1
    try:
        yield
    finally:
        _local.outside = depth


def in_transaction(op: str, kw: dict) -> dict | None:
    """
    @return: the answer to a submit or cancel made inside this thread's C{atomic()}
        (part of it, or on SQLite apart from it), or C{None}: outside one, send it.
    """
    from django.db import connection

    if not connection.in_atomic_block:
        return None
    if not _local.outside:
        # Part of the transaction (the job service would wait for the caller's SQLite lock).
        return submit(kw) if op == "submit" else cancel(kw)
    return detached(op, kw) if connection.vendor == "sqlite" else None


def submit(kw: dict) -> dict:
    """
    Store a job through the caller's connection, inside its transaction.
    @return: the job's wire description (an existing one's if C{id} or C{key} names one).
    @raise JobError: nothing is stored, the transaction is unharmed.
    """
    from django.db import IntegrityError, connection, transaction

    from twistedlrp.jobs.store import operations as ops

    definition, checked, args, kwargs = _checked(kw)
    fields = submission_fields(definition, args, kwargs, checked)
    postgres = connection.vendor == "postgresql"

    def create():
        # A savepoint: a refused insert leaves the caller's transaction usable.
        with transaction.atomic():
            return ops.create(fields, checked["job_id"], notify=postgres, announce=not postgres)

    try:
        created, info = create()
    except IntegrityError:
        # Another transaction committed a job with this key (or id) meanwhile: seen now.
        created, info = create()
    if created:
        if postgres:
            from twistedlrp.jobs.service import metrics as job_metrics

            transaction.on_commit(lambda: job_metrics.count("submitted", definition.name))
        else:
            _local.pending.append(info["id"])
            del _local.pending[:-_MAX_PENDING]
            transaction.on_commit(_announce_pending)
    return info


def cancel(kw: dict) -> dict:
    """Cancel a job in the caller's transaction. @return: its wire description. @raise UnknownJob."""
    from django.db import connection, transaction

    from twistedlrp.jobs.store import operations as ops

    job_id = canonical_job_id(kw["job_id"])
    postgres = connection.vendor == "postgresql"
    with transaction.atomic():
        info = ops.mark_cancel(job_id, notify=postgres)
    if not postgres:
        transaction.on_commit(lambda: _tell("cancel", job_id=info["id"]))
    return info


def _checked(kw: dict) -> tuple[registry.JobDefinition, dict, list, dict]:
    checked = check_submitted(kw)
    definition = registry.find(kw["name"])
    limit = default_max_payload() if _max_payload is None else _max_payload
    return (definition, checked, *check_payload(kw["name"], kw["payload"], limit, "the limit"))


def _announce_pending() -> None:
    ids, _local.pending = _local.pending, []
    for start in range(0, len(ids), ANNOUNCE_BATCH):
        if not _tell("announce", job_ids=ids[start : start + ANNOUNCE_BATCH]):
            return


def _tell(op: str, **kw) -> bool:
    """@return: whether the job service was told (within L{ANNOUNCE_TIMEOUT}), else a warning."""
    from twistedlrp.jobs.client import calls as client

    try:
        with outside_transaction():
            client.call(op, call_timeout=ANNOUNCE_TIMEOUT, **kw)
    except (JobError, TimeoutError) as e:
        log.warning("The job service was not told of a commit (%s %s): %s", op, kw, e)
        return False
    return True


#: Seconds a detached change keeps trying a job service that waits for the caller's lock.
DETACHED_DEADLINE = 120.0


def detached(op: str, kw: dict) -> dict:
    """
    Submit or cancel a job apart from the caller's SQLite transaction: a thread
    of its own hands it to the job service, again (same id) until it is stored.
    @return: the job's wire description (a submission's as it will be stored).
    """
    if op == "cancel":
        from twistedlrp.jobs.store import operations as ops

        kw = dict(kw, job_id=canonical_job_id(kw["job_id"]))
        answer = ops.get(kw["job_id"], full=False)
    else:
        definition, checked, _, _ = _checked(kw)
        kw = dict(kw, id=checked["job_id"] or str(uuid.uuid4()))
        answer = {
            "id": kw["id"],
            "name": definition.name,
            "state": QUEUED,
            "attempts": 0,
            "max_attempts": definition.retries + 1,
            "priority": definition.priority if checked["priority"] is None else checked["priority"],
            "created_at": datetime.now(UTC).isoformat(),
        }
    threading.Thread(
        target=_hand_over, args=(op, kw), name=f"twistedlrp-detached-{op}", daemon=True
    ).start()
    return answer


def _hand_over(op: str, kw: dict) -> None:
    from twistedlrp.jobs.client import calls as client

    which = kw.get("id") or kw.get("job_id")
    deadline = time.monotonic() + DETACHED_DEADLINE
    while True:
        try:
            with outside_transaction():
                client.call(op, **kw)
            return
        except (JobError, TimeoutError) as e:
            # The service's store waiting for the lock answers late, or fails its
            # batch ("database is locked"): both pass once the caller's transaction ends.
            late = not isinstance(e, JobError) or isinstance(e, JobServiceUnavailable)
            if not late and "locked" not in str(e):
                log.error("Job %s: %s was refused: %s", which, op, e)
                return
            if time.monotonic() >= deadline:
                log.error("Job %s: %s failed for %g s: %s", which, op, DETACHED_DEADLINE, e)
                return
            time.sleep(0.5)
