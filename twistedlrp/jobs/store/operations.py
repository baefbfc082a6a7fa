"""
The job store's operations: each runs in the store thread
(L{twistedlrp.jobs.store.Store}), inside the batch's transaction, and
returns plain dicts (the wire descriptions of jobs).
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime

from twistedlrp.jobs.errors import InvalidArguments, UnknownJob
from twistedlrp.jobs.states import (
    CANCELLED,
    FAILED,
    FINISHED,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    UNFINISHED,
)
from twistedlrp.jobs.store.sql import as_uuid, holds_nul, statements


def now() -> datetime:
    return datetime.now(UTC)


def iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def job_dict(job, full: bool = True, arguments: bool = False) -> dict:
    """
    @return: the wire description of a C{Job} row (without result and
        output unless C{full}, without args and kwargs unless C{arguments}).
    """
    data = {
        "id": str(job.id),
        "name": job.name,
        "state": job.state,
        "priority": job.priority,
        "queue": job.queue,
        "attempts": job.attempts,
        "max_attempts": job.max_attempts,
        "progress": [job.progress_current, job.progress_total, job.progress_message],
        "error": job.error,
        "worker": job.worker,
        "key": job.key,
        "timeout": job.timeout,
        "run_after": iso(job.run_after),
        "created_at": iso(job.created_at),
        "started_at": iso(job.started_at),
        "finished_at": iso(job.finished_at),
        "cancel_requested": job.cancel_requested,
    }
    if full:
        data["result"] = job.result
        data["output"] = job.output
    if arguments:
        data["args"] = job.args
        data["kwargs"] = job.kwargs
    return data


def write_progress(progress: dict) -> None:
    """Write coalesced progress reports C{{job_id: (current, total, message)}} of running jobs."""
    sql = statements()
    for job_id, (current, total, message) in progress.items():
        sql.update(
            job_id,
            {"progress_current": current, "progress_total": total, "progress_message": message},
            only_state=RUNNING,
        )


def prepare():
    """
    @return: C{None} when the job table is ready, else a sentence saying why not.
    """
    from django.db import DEFAULT_DB_ALIAS, connection
    from django.db.migrations.executor import MigrationExecutor

    executor = MigrationExecutor(connection)
    targets = [n for n in executor.loader.graph.leaf_nodes() if n[0] == "twistedlrp"]
    if executor.migration_plan(targets):
        alias = "" if connection.alias == DEFAULT_DB_ALIAS else f" --database {connection.alias}"
        return (
            "the job store's tables do not exist yet: the twistedlrp migrations are not "
            f"applied; run 'python manage.py migrate{alias}'"
        )
    if connection.vendor == "sqlite":
        with connection.cursor() as cursor:
            cursor.execute("PRAGMA journal_mode=WAL")
            # Durable against process crashes; a power loss may lose the last commits.
            cursor.execute("PRAGMA synchronous=NORMAL")
    return None


def create(fields: dict, job_id: str | None = None) -> dict:
    """
    Insert a job, unless C{fields["key"]} names an unfinished job or a job
    with the id C{job_id} exists (a submission retried with the id it chose).

    @return: C{(created, job dict)}.
    @raise InvalidArguments: a value the store cannot hold, or C{job_id} is
        the id of a job of another name.
    """
    from django.db import connection

    from twistedlrp.models import Job

    sql = statements()
    key = fields.get("key")
    if key and len(key) > sql.key_length:
        raise InvalidArguments(
            f"a job key has at most {sql.key_length} characters, this one has {len(key)}"
        )
    if sql.nul_free:
        if holds_nul([fields["args"], fields["kwargs"]]):
            raise InvalidArguments(
                f"the arguments of {fields['name']} contain a NUL character (\\u0000), "
                "which PostgreSQL cannot store"
            )
        if key:
            key = sql.prep("key", key)
            fields = dict(fields, key=key)
    if job_id is not None:
        existing = Job.objects.filter(id=job_id).first()
        if existing is not None:
            if existing.name != fields["name"]:
                raise InvalidArguments(
                    f"id: {job_id} is the id of a job of another name ({existing.name})"
                )
            return False, job_dict(existing)
    if key:
        existing = Job.objects.filter(key=key, state__in=UNFINISHED).first()
        if existing is not None:
            return False, job_dict(existing)
    new_id = uuid.UUID(job_id) if job_id is not None else uuid.uuid4()
    row = dict(sql.defaults, id=new_id, created_at=now(), state=QUEUED, **fields)
    params = [sql.prep(name, row.get(name)) for name in sql.insert_names]
    with connection.cursor() as cursor:
        cursor.execute(sql.insert, params)
    return True, job_dict(_Row(row))


class _Row:
    """Attribute access to a dict, for L{job_dict}."""

    def __init__(self, values: dict):
        self.__dict__.update(values)


def get(job_id: str, full: bool = True) -> dict:
    """
    @return: the job's wire description (with its arguments when C{full}).
    @raise UnknownJob: no such job.
    """
    from django.core.exceptions import ValidationError

    from twistedlrp.models import Job

    try:
        return job_dict(Job.objects.get(id=job_id), full, arguments=full)
    except (Job.DoesNotExist, ValidationError, ValueError):
        raise UnknownJob(f"no job has the id {job_id!r}") from None


def claim(job_id: str, worker: str, load: bool = True) -> dict | None:
    """
    Mark a queued job running (one more attempt).

    The conditional update is what makes a claim exclusive: on a database
    shared by several job services only one of them gets the row.

    @param load: also read what the service does not hold in memory (the
        payload and the job's settings).
    @return: C{None} if the job is no longer queued; else C{{"started_at": ...}},
        with C{payload}, C{attempts}, C{name}, C{timeout}, C{max_attempts},
        C{retry_delay} when C{load}.
    """
    from django.db import connection

    from twistedlrp.models import Job

    sql = statements()
    started = now()
    with connection.cursor() as cursor:
        cursor.execute(
            sql.claim,
            [
                RUNNING,
                sql.prep("started_at", started),
                worker,
                sql.prep("id", as_uuid(job_id)),
                QUEUED,
            ],
        )
        updated = cursor.rowcount
    if not updated:
        return None
    if not load:
        return {"started_at": iso(started)}
    row = Job.objects.values(
        "args", "kwargs", "attempts", "name", "timeout", "max_attempts", "retry_delay", "priority"
    ).get(id=job_id)
    row["payload"] = json.dumps({"args": row.pop("args"), "kwargs": row.pop("kwargs")}).encode()
    row["started_at"] = iso(started)
    return row


def claim_next_postgresql(queue_name: str, worker: str):
    """
    Claim the next due job on PostgreSQL when several job services share
    the database: C{SELECT ... FOR UPDATE SKIP LOCKED} lets each take a
    different row without waiting for the others.

    @return: the claimed job's id, or C{None}.
    """
    from django.db.models import Q

    from twistedlrp.models import Job

    row = (
        Job.objects.select_for_update(skip_locked=True)
        .filter(state=QUEUED, queue=queue_name)
        .filter(Q(run_after__isnull=True) | Q(run_after__lte=now()))
        .order_by("-priority", "created_at")
        .values_list("id", flat=True)
        .first()
    )
    if row is None:
        return None
    claimed = claim(str(row), worker)
    return str(row) if claimed else None


def finish(job_id: str, state: str, fields: dict, describe: bool = True) -> dict | None:
    """
    End an attempt: C{state} is final, or C{queued} for a retry (then
    C{run_after} may be set). Output, error and result are in C{fields}.

    @param describe: read the job back (someone waits for it).
    @return: the job's wire description, or C{None} when not C{describe}.
    """

    sql = statements()
    fields = dict(fields, state=state)
    if sql.nul_free and state == SUCCEEDED and holds_nul(fields.get("result")):
        fields.update(
            state=FAILED,
            result=None,
            error="the job's result contains a NUL character (\\u0000), which PostgreSQL "
            "cannot store",
        )
    if state in FINISHED:
        fields.setdefault("finished_at", now())
    sql.update(job_id, fields)
    return get(job_id) if describe else None


def mark_cancel(job_id: str) -> dict:
    """
    Cancel a queued job at once, or flag a running one.

    @return: the job's wire description after the change.
    @raise UnknownJob: no such job.
    """
    from twistedlrp.models import Job

    job = get(job_id, full=False)
    if job["state"] == QUEUED:
        Job.objects.filter(id=job_id, state=QUEUED).update(
            state=CANCELLED,
            cancel_requested=True,
            finished_at=now(),
            error="cancelled while queued",
        )
    elif job["state"] == RUNNING:
        Job.objects.filter(id=job_id).update(cancel_requested=True)
    return get(job_id)


def recover() -> tuple[list[dict], list[str]]:
    """
    Deal with jobs left C{running} by a server that died, then list the queued jobs.

    @return: C{(queued, failed)}: the queued jobs (light descriptions,
        oldest first) and the jobs just failed because no attempts remained.
    """
    from twistedlrp.models import Job

    failed = []
    for job in Job.objects.filter(state=RUNNING):
        reason = (
            f"the worker died: the job service stopped (crash or kill) while attempt "
            f"{job.attempts} ran on {job.worker or 'a worker'}"
        )
        if _end_orphan(job, reason) == FAILED:
            failed.append(str(job.id))
    queued = list(
        Job.objects.filter(state=QUEUED)
        .order_by("created_at")
        .values("id", "priority", "created_at", "run_after", "queue")
    )
    for row in queued:
        row["id"] = str(row["id"])
    return queued, failed


def _end_orphan(job, reason: str) -> str:
    """Retry or end a job that is C{running} with no worker; @return: its new state."""
    from twistedlrp.models import Job

    running = Job.objects.filter(id=job.id, state=RUNNING)
    if job.cancel_requested:
        running.update(state=CANCELLED, finished_at=now(), error=reason)
        return CANCELLED
    if job.attempts < job.max_attempts:
        running.update(state=QUEUED, error=reason + "; retried", worker="")
        return QUEUED
    running.update(state=FAILED, finished_at=now(), error=reason)
    return FAILED


def running_on(worker_prefix: str, started_before) -> list[dict]:
    """
    @return: the jobs C{running} on workers whose id starts with
        C{worker_prefix} (this machine's), started before C{started_before}:
        C{{"id", "worker", "attempts"}}.
    """
    from django.db.models import Q

    from twistedlrp.models import Job

    rows = Job.objects.filter(state=RUNNING, started_at__lt=started_before).filter(
        Q(worker__startswith=worker_prefix) | Q(worker="")
    )
    return [
        {"id": str(row["id"]), "worker": row["worker"], "attempts": row["attempts"]}
        for row in rows.values("id", "worker", "attempts")
    ]


def end_orphan(job_id: str, reason: str) -> dict | None:
    """
    Retry or end a job found C{running} without a worker that holds it, by
    its retry policy (a cancelled one ends cancelled).

    @return: C{{"state": ..., "priority", "created_at"}} after the change, or
        C{None} when it is no longer running.
    """
    from twistedlrp.models import Job

    job = Job.objects.filter(id=job_id, state=RUNNING).first()
    if job is None:
        return None
    state = _end_orphan(job, reason)
    return {"state": state, "priority": job.priority, "created_at": job.created_at}


def requeue(job_id: str, error: str, count_attempt: bool) -> None:
    """Put an interrupted job back in the queue (a graceful shut-down did not let it finish)."""
    from django.db.models import F

    from twistedlrp.models import Job

    fields = {"state": QUEUED, "worker": "", "error": error}
    if not count_attempt:
        fields["attempts"] = F("attempts") - 1
    Job.objects.filter(id=job_id, state=RUNNING).update(**fields)


def list_jobs(state: str | None, name: str | None, limit: int) -> list[dict]:
    from twistedlrp.models import Job

    query = Job.objects.all()
    if state:
        query = query.filter(state=state)
    if name:
        query = query.filter(name=name)
    return [job_dict(job, full=False) for job in query.order_by("-created_at")[: max(limit, 0)]]


def counts() -> dict:
    from django.db.models import Count

    from twistedlrp.models import Job

    return dict(Job.objects.values_list("state").annotate(n=Count("id")).order_by())
