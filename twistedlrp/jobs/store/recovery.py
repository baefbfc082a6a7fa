"""What dead processes leave behind, and the node table with its leases (in the store thread)."""

from __future__ import annotations

import os
from datetime import datetime, timedelta
from pathlib import Path

from twistedlrp.jobs.states import CANCELLED, FAILED, QUEUED, RUNNING
from twistedlrp.jobs.store.operations import notify_nodes, now, queue_of


def recover(node: str, queues: list[str] | None, shared: bool) -> tuple[list[dict], list[str]]:
    """
    End the jobs a dead server left C{running} (if C{shared}, this node's
    only). @return: C{(queued, failed)}: unless C{shared}, the queued jobs
    of C{queues}, oldest first; the ids of the jobs failed for lack of attempts.
    """
    from twistedlrp.models import Announcement, Job

    failed = []
    running = Job.objects.filter(state=RUNNING)
    for job in running.filter(node=node) if shared else running:
        if _died(job, "the job service stopped (crash or kill)", shared)[0] == FAILED:
            failed.append(str(job.id))
    if shared:
        return [], failed
    # Every queued job is listed below: the announced ones too (same transaction).
    Announcement.objects.all().delete()
    mine = {} if queues is None else {"queue__in": queues}
    rows = Job.objects.filter(state=QUEUED, **mine).order_by("created_at")
    rows = rows.values("id", "priority", "created_at", "run_after", "queue")
    return [dict(row, id=str(row["id"])) for row in rows], failed


def _end(job, error: str) -> str:
    """@return: the new state of a job C{running} with no worker, retried, failed or cancelled."""
    from twistedlrp.models import Job

    if job.cancel_requested or job.attempts >= job.max_attempts:
        state = CANCELLED if job.cancel_requested else FAILED
        fields = {"finished_at": now(), "error": error}
    else:
        state, fields = QUEUED, {"error": error + "; retried", "worker": ""}
    Job.objects.filter(id=job.id, state=RUNNING).update(state=state, **fields)
    return state


def _died(job, why: str, notify: bool = True) -> tuple[str, str]:
    """L{_end} a job whose worker died because C{why}. @return: its new state and the reason."""
    worker = job.worker or "a worker"
    reason = f"the worker died: {why} while attempt {job.attempts} ran on {worker}"
    state = _end(job, reason)
    if notify:
        notify_nodes(f"queued:{job.queue}" if state == QUEUED else f"finished:{job.id}")
    return state, reason


def running_on(worker_prefix: str, started_before, node: str | None = None) -> list[dict]:
    """
    @return: C{{"id", "worker", "attempts"}} of the jobs C{running} since before
        C{started_before} on this machine's workers (C{worker_prefix}), or on C{node}.
    """
    from django.db.models import Q

    from twistedlrp.models import Job

    here = Q(worker__startswith=worker_prefix) | Q(worker="")
    rows = Job.objects.filter(here if node is None else Q(node=node), state=RUNNING)
    rows = rows.filter(started_at__lt=started_before).values("id", "worker", "attempts")
    return [dict(row, id=str(row["id"])) for row in rows]


def end_orphan(job_id: str, reason: str, node: str | None = None) -> dict | None:
    """L{_end} a job found without a worker. @return: C{None} if no longer running (on C{node})."""
    job = _running(job_id, node).first()
    if job is None:
        return None
    return {"state": _end(job, reason), "priority": job.priority, "created_at": job.created_at}


def requeue(job_id: str, error: str, count_attempt: bool, node: str | None = None) -> None:
    """Put back in the queue a job a shut-down interrupted (if C{node} still holds it)."""
    from django.db.models import F

    fields = {"state": QUEUED, "worker": "", "error": error}
    if not count_attempt:
        fields["attempts"] = F("attempts") - 1
    if _running(job_id, node).update(**fields) and node is not None:
        notify_nodes(f"queued:{queue_of(job_id)}")


def _running(job_id: str, node: str | None):
    """@return: the job C{job_id} if it is running (on C{node}, if given), as a query."""
    from twistedlrp.models import Job

    mine = {} if node is None else {"node": node}
    return Job.objects.filter(id=job_id, state=RUNNING, **mine)


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
    """@return: whether C{pid} here exists, is no zombie, and runs Python (where /proc tells)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        pass  # Another user's process: it exists.
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True  # No /proc (not Linux), or it ended meanwhile: assume alive.
    # The state follows the command name in parentheses, which may hold spaces.
    state = stat[stat.rfind(b")") + 2 :][:1]
    return state not in (b"Z", b"X") and (b"python" in command or b"twistd" in command)


def _enter(name: str, host: str, pid: int, queues: list[str] | None, stamp: datetime) -> None:
    from twistedlrp.models import Node

    fields = {"host": host, "pid": pid, "queues": ",".join(queues or ()), "started_at": stamp}
    Node.objects.update_or_create(name=name, defaults=dict(fields, heartbeat_at=stamp))


def register_node(
    name: str, host: str, pid: int, queues: list[str] | None, lease: float, shared: bool
) -> None:
    """Enter this node with a fresh heartbeat. @raise NodeConflict: a live one is in the way."""
    from django.db import connection

    from twistedlrp.models import Node

    stamp = db_now()
    cutoff = stamp - timedelta(seconds=lease)

    def alive(other) -> bool:
        # On this machine a dead process is known at once.
        return other.heartbeat_at >= cutoff and (
            other.host != host or (other.pid != pid and _pid_alive(other.pid))
        )

    for other in () if shared else Node.objects.exclude(name=name):
        if alive(other):
            age = (stamp - other.heartbeat_at).total_seconds()
            vendor = {"sqlite": "SQLite"}.get(connection.vendor, connection.vendor)
            raise NodeConflict(
                f"another job node, {other.name} (pid {other.pid} on {other.host}, last "
                f"heartbeat {age:.1f} s ago), uses this {vendor} database: it "
                "supports one job node only; use PostgreSQL to run several job nodes"
            )
    same = Node.objects.filter(name=name).first()
    if same is not None and alive(same) and (same.host, same.pid) != (host, pid):
        raise NodeConflict(
            f"a job node named {name} already runs (pid {same.pid} on {same.host}): give "
            "each job node a name of its own (--node-name, or another --state-dir)"
        )
    _enter(name, host, pid, queues, stamp)


def heartbeat(name: str, host: str, pid: int, queues: list[str] | None, fenced, why: str) -> dict:
    """
    Renew this node's lease; the C{fenced} jobs (stopped when it could not)
    still running on it end because C{why}. @return: C{{"held", "ended"}}.
    """
    from twistedlrp.models import Job, Node

    stamp = db_now()
    held = bool(Node.objects.filter(name=name).update(heartbeat_at=stamp))
    if not held:
        _enter(name, host, pid, queues, stamp)
    jobs = Job.objects.filter(id__in=fenced, state=RUNNING, node=name) if fenced else ()
    ended = [{"id": str(job.id), "state": _died(job, why)[0]} for job in jobs]
    return {"held": held, "ended": ended}


def lease_fresh(node: str, within: float) -> bool:
    """
    @return: whether C{node} renewed its lease less than C{within} s ago (database
        clock). PostgreSQL only: a lease is checked only where several nodes share it.
    """
    from django.db import connection

    from twistedlrp.models import Node

    table = connection.ops.quote_name(Node._meta.db_table)
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT 1 FROM {table} WHERE name = %s "
            "AND heartbeat_at >= statement_timestamp() - %s * interval '1 second'",
            [node, within],
        )
        return cursor.fetchone() is not None


def leave_node(name: str, pid: int) -> None:
    """This node stops: its row goes (unless a successor of the same name took it)."""
    from twistedlrp.models import Node

    Node.objects.filter(name=name, pid=pid).delete()


def expire_nodes(node: str, lease: float, started_before: datetime) -> dict:
    """
    End the running jobs of the other nodes that are dead (lease expired, or
    not in the table), and delete their rows, skipping rows another node
    holds. PostgreSQL only. @return: C{{"nodes": [(name, age)], "jobs": [...]}}.
    """
    from django.db.models import Q

    from twistedlrp.models import Job, Node

    stamp = db_now()
    cutoff = stamp - timedelta(seconds=lease)
    nodes = Node.objects.select_for_update(skip_locked=True)
    dead = list(nodes.filter(heartbeat_at__lt=cutoff).exclude(name=node))
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
        state, reason = _died(job, why)
        ended.append({"id": str(job.id), "state": state, "node": job.node, "reason": reason})
    Node.objects.filter(name__in=list(ages), heartbeat_at__lt=cutoff).delete()
    return {"nodes": sorted(ages.items()), "jobs": ended}
