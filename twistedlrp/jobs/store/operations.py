"""
The job store's operations: each runs in the store thread
(L{twistedlrp.jobs.store.Store}), inside the batch's transaction, and
returns plain dicts (the wire descriptions of jobs).
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta

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


def create(fields: dict, job_id: str | None = None, notify: bool = False) -> dict:
    """
    Insert a job, unless C{fields["key"]} names an unfinished job or a job
    with the id C{job_id} exists (a submission retried with the id it chose).

    @param notify: send the job nodes listening on the database a
        notification, delivered with the commit (PostgreSQL, several nodes).

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
    if notify:
        notify_nodes(f"queued:{fields['queue']}")
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


def claim(job_id: str, worker: str, load: bool = True, node: str = "") -> dict | None:
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
                node,
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


def claim_next(queues: list[str] | None, node: str, workers: list[str]) -> dict:
    """
    Claim up to one due job per worker in C{workers}, the next ones of
    C{queues} (C{None}: every queue) by priority, then age, when several
    job nodes share a PostgreSQL database: C{SELECT ... FOR UPDATE SKIP
    LOCKED} lets each node take different rows without waiting for the
    others. The claim (C{running}, one more attempt, the worker and the
    node) commits before the job is sent to its worker.

    @return: C{{"claimed": [rows], "next_due": Unix time or None}}: each row
        has C{id}, C{worker}, C{payload}, C{name}, C{attempts},
        C{max_attempts}, C{retry_delay}, C{timeout}, C{priority},
        C{cancel_requested}; C{next_due} is when the first delayed job of
        these queues becomes due (read when fewer jobs than workers were
        claimed).
    """
    from django.db import connection

    sql = statements()
    c = sql.column
    started = now()
    where = f"{c['state']} = %s AND ({c['run_after']} IS NULL OR {c['run_after']} <= %s)"
    params: list = [QUEUED, sql.prep("run_after", started)]
    if queues is not None:
        where += f" AND {c['queue']} = ANY(%s)"
        params.append(list(queues))
    select = (
        f"SELECT {c['id']} FROM {sql.table} WHERE {where} "
        f"ORDER BY {c['priority']} DESC, {c['created_at']} LIMIT %s FOR UPDATE SKIP LOCKED"
    )
    update = (
        f"UPDATE {sql.table} SET {c['state']} = %s, {c['attempts']} = {c['attempts']} + 1, "
        f"{c['started_at']} = %s, {c['worker']} = %s, {c['node']} = %s "
        f"WHERE {c['id']} = %s RETURNING "
        f"json_build_object('args', {c['args']}, 'kwargs', {c['kwargs']})::text, "
        f"{c['name']}, {c['attempts']}, {c['max_attempts']}, {c['retry_delay']}, "
        f"{c['timeout']}, {c['priority']}, {c['cancel_requested']}"
    )
    claimed = []
    with connection.cursor() as cursor:
        cursor.execute(select, [*params, len(workers)])
        ids = [row[0] for row in cursor.fetchall()]
        for job_id, worker in zip(ids, workers, strict=False):
            cursor.execute(update, [RUNNING, sql.prep("started_at", started), worker, node, job_id])
            payload, name, attempts, max_attempts, retry_delay, timeout, priority, cancel = (
                cursor.fetchone()
            )
            claimed.append(
                {
                    "id": str(job_id),
                    "worker": worker,
                    "payload": payload.encode(),
                    "name": name,
                    "attempts": attempts,
                    "max_attempts": max_attempts,
                    "retry_delay": retry_delay,
                    "timeout": timeout,
                    "priority": priority,
                    "cancel_requested": cancel,
                }
            )
        next_due = None
        if len(claimed) < len(workers):
            where = f"{c['state']} = %s AND {c['run_after']} > %s"
            params = [QUEUED, sql.prep("run_after", started)]
            if queues is not None:
                where += f" AND {c['queue']} = ANY(%s)"
                params.append(list(queues))
            cursor.execute(f"SELECT min({c['run_after']}) FROM {sql.table} WHERE {where}", params)
            first = cursor.fetchone()[0]
            next_due = first.timestamp() if first is not None else None
    return {"claimed": claimed, "next_due": next_due}


NOTIFY_CHANNEL = "twistedlrp_jobs"


def notify_nodes(payload: str) -> None:
    """
    Tell the job nodes listening on the database (PostgreSQL): sent with
    the commit, once per distinct payload in a transaction.
    """
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_notify(%s, %s)", [NOTIFY_CHANNEL, payload])


def finish(
    job_id: str, state: str, fields: dict, describe: bool = True, node: str | None = None
) -> dict | None:
    """
    End an attempt: C{state} is final, or C{queued} for a retry (then
    C{run_after} may be set). Output, error and result are in C{fields}.

    @param describe: read the job back (someone waits for it).
    @param node: with several job nodes, the node ending the attempt: the
        job changes only if it is still C{running} on that node (not when
        another node took it over after this node's lease expired), and the
        other nodes are notified (a final state for their waiters, a retry
        for their workers).
    @return: the job's wire description, or C{None} when not C{describe}
        (or when C{node} no longer holds the job: C{{"lost": True}}).
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
    if node is None:
        sql.update(job_id, fields)
        return get(job_id) if describe else None
    if not sql.update(job_id, fields, only_state=RUNNING, only_node=node):
        return {"lost": True}
    if state in FINISHED:
        notify_nodes(f"finished:{job_id}")
    else:
        notify_nodes(f"queued:{_queue_of(job_id)}")
    return get(job_id) if describe else None


def _queue_of(job_id: str) -> str:
    from twistedlrp.models import Job

    return Job.objects.values_list("queue", flat=True).get(id=job_id)


def mark_cancel(job_id: str, notify: bool = False) -> dict:
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
        if notify:
            notify_nodes(f"finished:{job_id}")
    elif job["state"] == RUNNING:
        Job.objects.filter(id=job_id).update(cancel_requested=True)
        if notify:
            # The node running it may be another one.
            notify_nodes(f"cancel:{job_id}")
    return get(job_id)


def recover(
    node: str = "", queues: list[str] | None = None, shared: bool = False
) -> tuple[list[dict], list[str]]:
    """
    Deal with jobs left C{running} by a server that died, then list the queued jobs.

    @param node: this job node's name.
    @param queues: the queues this node runs (C{None}: all): only their
        queued jobs are listed.
    @param shared: several job nodes may share the database: only this
        node's running jobs are touched (another node's may be alive; those
        of a dead node are the business of the lease check), and no queued
        job is listed (the nodes claim them from the table).
    @return: C{(queued, failed)}: the queued jobs (light descriptions,
        oldest first) and the jobs just failed because no attempts remained.
    """
    from twistedlrp.models import Job

    failed = []
    running = Job.objects.filter(state=RUNNING)
    if shared:
        running = running.filter(node=node)
    for job in running:
        reason = (
            f"the worker died: the job service stopped (crash or kill) while attempt "
            f"{job.attempts} ran on {job.worker or 'a worker'}"
        )
        state = _end_orphan(job, reason)
        if state == FAILED:
            failed.append(str(job.id))
        if shared:
            notify_nodes(f"queued:{job.queue}" if state == QUEUED else f"finished:{job.id}")
    if shared:
        return [], failed
    queued = Job.objects.filter(state=QUEUED)
    if queues is not None:
        queued = queued.filter(queue__in=queues)
    queued = list(
        queued.order_by("created_at").values("id", "priority", "created_at", "run_after", "queue")
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


def running_on(worker_prefix: str, started_before, node: str | None = None) -> list[dict]:
    """
    @return: the jobs C{running} on workers whose id starts with
        C{worker_prefix} (this machine's), or with several job nodes on
        the node C{node}, started before C{started_before}:
        C{{"id", "worker", "attempts"}}.
    """
    from django.db.models import Q

    from twistedlrp.models import Job

    rows = Job.objects.filter(state=RUNNING, started_at__lt=started_before)
    if node is not None:
        rows = rows.filter(node=node)
    else:
        rows = rows.filter(Q(worker__startswith=worker_prefix) | Q(worker=""))
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


def requeue(job_id: str, error: str, count_attempt: bool, node: str | None = None) -> None:
    """
    Put an interrupted job back in the queue (a graceful shut-down did not let it finish).

    @param node: with several job nodes, the node that ran it (the job is
        put back only if that node still holds it); the other nodes are
        notified.
    """
    from django.db.models import F

    from twistedlrp.models import Job

    fields = {"state": QUEUED, "worker": "", "error": error}
    if not count_attempt:
        fields["attempts"] = F("attempts") - 1
    running = Job.objects.filter(id=job_id, state=RUNNING)
    if node is None:
        running.update(**fields)
    elif running.filter(node=node).update(**fields):
        notify_nodes(f"queued:{_queue_of(job_id)}")


# -- job nodes ------------------------------------------------------------------------


class NodeConflict(Exception):
    """Another live job node stands in the way of this one (its message says which)."""


def db_now() -> datetime:
    """@return: the database's clock (PostgreSQL: shared by every node), else this machine's."""
    from django.db import connection

    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT statement_timestamp()")
            return cursor.fetchone()[0]
    return now()


def _pid_alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        pass
    return True


def register_node(
    name: str, host: str, pid: int, queues: list[str] | None, lease: float, shared: bool
) -> None:
    """
    Enter this job node in the node table, with a fresh heartbeat.

    @param shared: several nodes may share the database (PostgreSQL); if
        not (SQLite), another node with a fresh heartbeat refuses this one.
    @raise NodeConflict: a live node stands in the way: another one on a
        database for one node, or one of the same name elsewhere.
    """
    from twistedlrp.models import Node

    stamp = db_now()
    cutoff = stamp - timedelta(seconds=lease)

    def alive(other) -> bool:
        if other.heartbeat_at < cutoff:
            return False
        # On this machine a dead process is known at once.
        return other.host != host or (other.pid != pid and _pid_alive(other.pid))

    if not shared:
        for other in Node.objects.exclude(name=name):
            if alive(other):
                age = (stamp - other.heartbeat_at).total_seconds()
                raise NodeConflict(
                    f"another job node, {other.name} (pid {other.pid} on {other.host}, last "
                    f"heartbeat {age:.1f} s ago), uses this {_vendor()} database: it "
                    "supports one job node only; use PostgreSQL to run several job nodes"
                )
    same = Node.objects.filter(name=name).first()
    if same is not None and alive(same) and (same.host, same.pid) != (host, pid):
        raise NodeConflict(
            f"a job node named {name} already runs (pid {same.pid} on {same.host}): give "
            "each job node a name of its own (--node-name, or another --state-dir)"
        )
    Node.objects.update_or_create(
        name=name,
        defaults={
            "host": host,
            "pid": pid,
            "queues": ",".join(queues or ()),
            "started_at": stamp,
            "heartbeat_at": stamp,
        },
    )


def _vendor() -> str:
    from django.db import connection

    return {"sqlite": "SQLite"}.get(connection.vendor, connection.vendor)


def heartbeat(name: str, host: str, pid: int, queues: list[str] | None) -> bool:
    """
    Renew this node's lease.

    @return: whether its row was still there (C{False}: another node took
        it for dead and retried or failed its running jobs; the row is
        entered again).
    """
    from twistedlrp.models import Node

    stamp = db_now()
    if Node.objects.filter(name=name).update(heartbeat_at=stamp):
        return True
    Node.objects.create(
        name=name,
        host=host,
        pid=pid,
        queues=",".join(queues or ()),
        started_at=stamp,
        heartbeat_at=stamp,
    )
    return False


def leave_node(name: str, pid: int) -> None:
    """This node stops: its row goes (unless a successor of the same name took it)."""
    from twistedlrp.models import Node

    Node.objects.filter(name=name, pid=pid).delete()


def expire_nodes(node: str, lease: float, started_before: datetime) -> dict:
    """
    Retry or fail (by each job's policy) the running jobs of the job nodes
    whose lease expired (no heartbeat for C{lease} seconds: the node died
    or lost the database), and of nodes that are not in the node table;
    the rows of dead nodes go. Rows another node is dealing with at the
    same moment are skipped (C{FOR UPDATE SKIP LOCKED}). PostgreSQL only.

    @param node: this node (never expired by itself).
    @param started_before: a job without a node counts only if it started before.
    @return: C{{"nodes": [(name, seconds since its heartbeat)], "jobs":
        [{"id", "state", "node", "reason"}]}}.
    """
    from django.db.models import Q

    from twistedlrp.models import Job, Node

    stamp = db_now()
    cutoff = stamp - timedelta(seconds=lease)
    dead = list(
        Node.objects.select_for_update(skip_locked=True)
        .filter(heartbeat_at__lt=cutoff)
        .exclude(name=node)
    )
    ages = {n.name: (stamp - n.heartbeat_at).total_seconds() for n in dead}
    live = Node.objects.filter(heartbeat_at__gte=cutoff).values("name")
    orphans = (
        Job.objects.select_for_update(skip_locked=True)
        .filter(state=RUNNING)
        .filter(~Q(node="") | Q(started_at__lt=started_before))
        .exclude(node=node)
        .exclude(node__in=live)
    )
    ended = []
    for job in orphans:
        if job.node in ages:
            why = (
                f"the job node {job.node} stopped renewing its lease (no heartbeat for "
                f"{ages[job.node]:.0f} s, lease {lease:g} s)"
            )
        else:
            why = f"the job node {job.node or '(none)'} it was running on is not alive"
        reason = (
            f"the worker died: {why} while attempt {job.attempts} ran on {job.worker or 'a worker'}"
        )
        state = _end_orphan(job, reason)
        notify_nodes(f"queued:{job.queue}" if state == QUEUED else f"finished:{job.id}")
        ended.append({"id": str(job.id), "state": state, "node": job.node, "reason": reason})
    if dead:
        Node.objects.filter(name__in=[n.name for n in dead], heartbeat_at__lt=cutoff).delete()
    return {"nodes": sorted(ages.items()), "jobs": ended}


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
