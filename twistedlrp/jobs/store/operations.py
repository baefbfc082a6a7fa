"""The store's operations, each run in the store thread inside a transaction; plain dicts out."""

from __future__ import annotations

import contextlib
import json
import uuid
from datetime import UTC, datetime
from types import SimpleNamespace

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


# A job's wire description, in this order ("progress" and the times adapted).
_DESCRIBED = (
    "id", "name", "state", "priority", "queue", "attempts", "max_attempts", "progress", "error",
    "worker", "key", "timeout", "run_after", "created_at", "started_at", "finished_at",
    "cancel_requested",
)  # fmt: skip
_TIMES = ("run_after", "created_at", "started_at", "finished_at")
#: What a claim answers of the job, beside its payload.
SETTINGS = ("name", "attempts", "max_attempts", "retry_delay", "timeout", "priority")


def job_dict(job, full: bool = True, arguments: bool = False) -> dict:
    """@return: a C{Job} row's wire description (result, output: C{full}; args: C{arguments})."""
    names = _DESCRIBED + (("result", "output") if full else ())
    data = {
        name: getattr(job, name, None) for name in names + (("args", "kwargs") if arguments else ())
    }
    data.update({name: iso(data[name]) for name in _TIMES}, id=str(job.id))
    data["progress"] = [job.progress_current, job.progress_total, job.progress_message]
    return data


def payload_of(args, kwargs) -> bytes:
    """@return: the payload (JSON) of a job of arguments C{args} and C{kwargs}, as submitted."""
    return json.dumps({"args": args, "kwargs": kwargs}, separators=(",", ":")).encode()


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
    """@return: C{None} when the job table is ready, else a sentence saying why not."""
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
    return None


def create(
    fields: dict,
    job_id: str | None = None,
    notify: bool = False,
    start: dict | None = None,
    announce: bool = False,
) -> dict:
    """
    Insert a job, unless C{fields["key"]} names an unfinished job or the job
    C{job_id} exists (a submission retried). Also runs in a site's transaction.
    @param start: C{{"id", "worker", "node"}}: store it running on that worker,
        without a claim; with C{"lease"}, only if the node's lease is fresh.
    @return: C{(created, job dict)}. @raise InvalidArguments: a value the store cannot hold.
    """
    sql = statements()
    key = fields.get("key")
    if sql.nul_free and holds_nul([fields["args"], fields["kwargs"]]):
        raise InvalidArguments(
            f"the arguments of {fields['name']} contain a NUL character (\\u0000), "
            "which PostgreSQL cannot store"
        )
    if sql.nul_free and key:
        key = sql.prep("key", key)
        fields = dict(fields, key=key)
    existing = sql.read(job_id) if job_id is not None else None
    if existing is not None and existing.name != fields["name"]:
        raise InvalidArguments(f"id: {job_id} is the id of a job of another name ({existing.name})")
    if existing is None and key:
        existing = sql.read(key=key, state=UNFINISHED)
    if existing is not None:
        return False, job_dict(existing)
    if start is not None:
        new_id = uuid.UUID(start["id"])
        if start.get("lease") is not None:
            from twistedlrp.jobs.store.recovery import lease_fresh

            if not lease_fresh(start["node"], start["lease"]):
                start = None
    else:
        new_id = uuid.UUID(job_id) if job_id is not None else uuid.uuid4()
    created_at = now()
    row = dict(sql.defaults, id=new_id, created_at=created_at, state=QUEUED, **fields)
    if start is not None:
        row.update(state=RUNNING, attempts=1, started_at=created_at, worker=start["worker"])
        row["node"] = start["node"]
    sql.execute(sql.insert, [sql.prep(name, row.get(name)) for name in sql.insert_names])
    if notify and start is None:
        notify_nodes(f"queued:{fields['queue']}")
    if announce:
        from twistedlrp.models import Announcement

        Announcement.objects.create(job=new_id)
    return True, job_dict(SimpleNamespace(**row))


def get(job_id: str, full: bool = True) -> dict:
    """@return: the job's wire description (with its arguments when C{full}). @raise UnknownJob."""
    try:
        key = uuid.UUID(str(job_id))
    except ValueError:
        raise UnknownJob(f"no job has the id {job_id!r}") from None
    # A row that cannot be read is an internal error, not an unknown job.
    job = statements().read(key)
    if job is None:
        raise UnknownJob(f"no job has the id {job_id!r}")
    return job_dict(job, full, arguments=full)


def claim(job_id: str, worker: str, load: bool = True, node: str = "") -> dict | None:
    """
    Mark a queued job running. @return: C{None} if it is no longer queued, else
    C{{"started_at"}} (with C{load}, also C{payload} and the job's settings).
    """
    sql = statements()
    started = now()
    when, key = sql.prep("started_at", started), sql.prep("id", as_uuid(job_id))
    if not sql.execute(sql.claim, [RUNNING, when, worker, node, key, QUEUED]):
        return None
    if not load:
        return {"started_at": iso(started)}
    job = sql.read(job_id)
    row = {name: getattr(job, name) for name in SETTINGS}
    return dict(row, payload=payload_of(job.args, job.kwargs), started_at=iso(started))


def claim_next(
    queues: list[str] | None, node: str, workers: list[str], lease: float | None = None
) -> dict:
    """
    Claim up to one due job per worker from C{queues} (C{None}: all), with
    C{FOR UPDATE SKIP LOCKED}: nodes sharing PostgreSQL never wait for each
    other. Nothing unless the node's lease is fresh within C{lease} s.
    @return: C{{"claimed": [rows], "next_due": Unix time or None}} (or C{"no_lease"}).
    """
    from django.db import connection

    if lease is not None:
        from twistedlrp.jobs.store.recovery import lease_fresh

        if not lease_fresh(node, lease):
            return {"claimed": [], "next_due": None, "no_lease": True}

    sql = statements()
    c = sql.column
    when = sql.prep("started_at", now())
    mine = f" AND {c['queue']} = ANY(%s)" if queues is not None else ""
    params: list = [QUEUED, when] + ([list(queues)] if mine else [])
    select = (
        f"SELECT {c['id']} FROM {sql.table} WHERE {c['state']} = %s AND ({c['run_after']} IS NULL "
        f"OR {c['run_after']} <= %s){mine} ORDER BY {c['priority']} DESC, {c['created_at']} "
        "LIMIT %s FOR UPDATE SKIP LOCKED"
    )
    update = (
        f"{sql.claim} RETURNING "
        f"json_build_object('args', {c['args']}, 'kwargs', {c['kwargs']})::text, "
        f"{', '.join(c[name] for name in SETTINGS)}, {c['cancel_requested']}"
    )
    claimed = []
    with connection.cursor() as cursor:
        cursor.execute(select, [*params, len(workers)])
        ids = [row[0] for row in cursor.fetchall()]
        for job_id, worker in zip(ids, workers, strict=False):
            cursor.execute(update, [RUNNING, when, worker, node, job_id, QUEUED])
            payload, *values, cancel = cursor.fetchone()
            row = dict(zip(SETTINGS, values, strict=True), cancel_requested=cancel)
            claimed.append(dict(row, id=str(job_id), worker=worker, payload=payload.encode()))
        next_due = None
        if len(claimed) < len(workers):
            cursor.execute(
                f"SELECT min({c['run_after']}) FROM {sql.table} "
                f"WHERE {c['state']} = %s AND {c['run_after']} > %s{mine}",
                params,
            )
            first = cursor.fetchone()[0]
            next_due = first.timestamp() if first is not None else None
    return {"claimed": claimed, "next_due": next_due}


NOTIFY_CHANNEL = "twistedlrp_jobs"


def notify_nodes(payload: str) -> None:
    """Tell the job nodes listening on the database (PostgreSQL), with the commit."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_notify(%s, %s)", [NOTIFY_CHANNEL, payload])


def finish(
    job_id: str, state: str, fields: dict, describe: bool = True, node: str | None = None
) -> dict | None:
    """
    End an attempt in C{state} (C{queued}: a retry); with C{node}, only if it
    still holds the job, and the other nodes are notified.
    @return: the job's description if C{describe}; C{{"lost": True}} if C{node} lost it.
    """
    sql = statements()
    fields = dict(fields, state=state)
    if sql.nul_free and state == SUCCEEDED and holds_nul(fields.get("result")):
        error = "the job's result contains a NUL character (\\u0000), which PostgreSQL cannot store"
        fields.update(state=FAILED, result=None, error=error)
    if state in FINISHED:
        fields.setdefault("finished_at", now())
    if node is None:
        sql.update(job_id, fields)
    elif not sql.update(job_id, fields, only_state=RUNNING, only_node=node):
        return {"lost": True}
    else:
        notify_nodes(f"finished:{job_id}" if state in FINISHED else f"queued:{queue_of(job_id)}")
    return get(job_id) if describe else None


def queue_of(job_id: str) -> str:
    return statements().read(job_id).queue


def cancel_fields(state: str) -> dict:
    """@return: the fields a cancel changes in a job in C{state} (a running one is flagged)."""
    if state == QUEUED:
        error = "cancelled while queued"
        return {"state": CANCELLED, "cancel_requested": True, "finished_at": now(), "error": error}
    return {"cancel_requested": True} if state == RUNNING else {}


def mark_cancel(job_id: str, notify: bool = False) -> dict:
    """Cancel a queued job, or flag a running one. @return: its description. @raise UnknownJob."""
    from twistedlrp.models import Job

    state = get(job_id, full=False)["state"]
    if state in UNFINISHED:
        Job.objects.filter(id=job_id, state=state).update(**cancel_fields(state))
        if notify:
            # A running job's node may be another one.
            notify_nodes(f"finished:{job_id}" if state == QUEUED else f"cancel:{job_id}")
    return get(job_id)


def list_jobs(state: str | None, name: str | None, limit: int) -> list[dict]:
    from twistedlrp.models import Job

    wanted = {field: value for field, value in (("state", state), ("name", name)) if value}
    query = Job.objects.filter(**wanted).order_by("-created_at")
    return [job_dict(job, full=False) for job in query[: max(limit, 0)]]


def counts() -> dict:
    """@return: C{{state: number of jobs}} (the states that have jobs)."""
    sql = statements()
    state = sql.column["state"]
    # COUNT(*), not COUNT(id): SQLite then reads only an index that starts with the state.
    statement = f"SELECT {state}, COUNT(*) FROM {sql.table} GROUP BY {state}"
    return dict(sql.run(statement, [], lambda cursor: cursor.fetchall()))


# Jobs a site's own transaction stored on SQLite, announced for the job service to take.
#: The most announced jobs one take reads (the next take reads the rest).
TAKE_ANNOUNCED = 500
_TAKEN = (
    "id", "priority", "created_at", "run_after", "queue", "name", "max_attempts", "retry_delay",
    "timeout", "args", "kwargs",
)  # fmt: skip


def announced() -> bool:
    """@return: whether any job waits in the announcement table (read outside a transaction)."""
    from twistedlrp.models import Announcement

    return Announcement.objects.exists()


def take_announced(job_ids: list[str] | None = None) -> list[dict]:
    """@return: the queued jobs among C{job_ids} (C{None}: any), taken out, oldest first."""
    from twistedlrp.models import Announcement, Job

    notices = Announcement.objects.all()
    if job_ids is not None:
        valid = []
        for job_id in job_ids:
            with contextlib.suppress(ValueError):
                valid.append(uuid.UUID(str(job_id)))
        notices = notices.filter(job__in=valid)
    taken = list(notices.values_list("job", flat=True)[:TAKE_ANNOUNCED])
    Announcement.objects.filter(job__in=taken).delete()
    queued = Job.objects.filter(id__in=taken, state=QUEUED).order_by("created_at")
    rows = list(queued.values(*_TAKEN))
    for row in rows:
        row.update(id=str(row["id"]), payload=payload_of(row.pop("args"), row.pop("kwargs")))
    return rows
