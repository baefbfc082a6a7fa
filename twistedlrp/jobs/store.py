"""
The job store: every database access of the job service, in one dedicated
thread, with group commit.

The reactor never touches the database. It calls L{Store.run} with a
function; the store thread takes every operation queued so far, runs them
all in one transaction (each in its own savepoint, so one failure does not
undo the others), commits once, and hands each result back to the reactor
as the firing of its Deferred. Under load, many submissions share one
commit; an idle store costs nothing (it blocks on its queue, it does not
poll). A Deferred fires only after the commit that made its change durable.

Progress reports are coalesced: only the latest one per job is written, in
the next batch.

On SQLite the store switches the database to WAL mode and opens its write
transactions with C{BEGIN IMMEDIATE}, so that it waits for (rather than
fails on) the locks of job code writing from worker processes.

On PostgreSQL, text and jsonb columns cannot hold the NUL character: in a
job's output, error or progress message it is stored as U+FFFD; arguments
holding one are refused at submission, a result holding one fails the job.
"""

from __future__ import annotations

import queue
import threading
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from twistedlrp.jobs import CANCELLED, FAILED, QUEUED, RUNNING, SUCCEEDED
from twistedlrp.jobs.errors import InvalidArguments, JobServiceUnavailable, UnknownJob

log = Logger()

FINISHED = (SUCCEEDED, FAILED, CANCELLED)
UNFINISHED = (QUEUED, RUNNING)
_STOP = object()
_WAKE = object()


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


class Store:
    """The store thread and the operations the job service needs."""

    def __init__(self, reactor):
        self.reactor = reactor
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._progress: dict[str, tuple] = {}
        self._progress_lock = threading.Lock()
        self._stopped = defer.Deferred()
        self.batches = 0
        self.operations = 0
        self.closed = False

    # -- the thread ----------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="twistedlrp-job-store", daemon=True)
        self._thread.start()

    def run(self, fn: Callable[..., Any], *args: Any) -> defer.Deferred:
        """
        Run C{fn(*args)} in the store thread, inside a transaction.

        @return: a Deferred that fires, in the reactor, with C{fn}'s result
            once the transaction is committed, or fails with its exception.
        """
        if self.closed:
            return defer.fail(JobServiceUnavailable("the job store is closed"))
        d = defer.Deferred()
        self._queue.put((fn, args, d, False))
        return d

    def run_alone(self, fn: Callable[..., Any], *args: Any) -> defer.Deferred:
        """Like L{run}, but outside any transaction (for PRAGMAs and checks)."""
        if self.closed:
            return defer.fail(JobServiceUnavailable("the job store is closed"))
        d = defer.Deferred()
        self._queue.put((fn, args, d, True))
        return d

    def stop(self) -> defer.Deferred:
        """
        Finish the queued operations, then end the thread.

        @return: a Deferred that fires when the thread has ended.
        """
        if not self.closed:
            self.closed = True
            self._queue.put(_STOP)
        return self._stopped

    def _loop(self) -> None:
        from django.db import connection

        try:
            while True:
                items = [self._queue.get()]
                while True:
                    try:
                        items.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
                stopping = _STOP in items
                ops = [item for item in items if item is not _STOP and item is not _WAKE]
                for op in [op for op in ops if op[3]]:
                    self._run_alone(op)
                ops = [op for op in ops if not op[3]]
                if ops or self._progress:
                    self._run_batch(ops)
                if stopping:
                    break
        finally:
            connection.close()
            self.reactor.callFromThread(self._stopped.callback, None)

    def _run_alone(self, op) -> None:
        fn, args, d, _ = op
        try:
            outcome, failed = fn(*args), False
        except Exception:
            outcome, failed = Failure(), True
        self.reactor.callFromThread(_deliver, [(d, outcome, failed)])

    def _run_batch(self, ops: list) -> None:
        from django.db import connection, transaction

        with self._progress_lock:
            progress, self._progress = self._progress, {}
        if connection.vendor == "sqlite":
            connection.ensure_connection()
            # Wait for locks held by job code in workers instead of failing.
            connection.transaction_mode = "IMMEDIATE"
        try:
            # The common case: every operation succeeds, one commit for all.
            with transaction.atomic():
                results = [(fn(*args), False) for fn, args, _, _ in ops]
                if progress:
                    _write_progress(progress)
        except Exception:
            # One of them failed (an unknown job id, a broken row): the batch
            # was rolled back; run each alone so the others still succeed.
            results = []
            for fn, args, _, _ in ops:
                try:
                    with transaction.atomic():
                        results.append((fn(*args), False))
                except Exception:
                    results.append((Failure(), True))
            if progress:
                try:
                    with transaction.atomic():
                        _write_progress(progress)
                except Exception:
                    log.failure("The job store could not record progress")
        self.batches += 1
        self.operations += len(ops)
        if ops:
            self.reactor.callFromThread(
                _deliver, [(d, r, f) for (_, _, d, _), (r, f) in zip(ops, results, strict=False)]
            )

    def set_progress(self, job_id: str, current: int, total, message: str) -> None:
        """Record a progress report; only the latest per job is written, in the next batch."""
        with self._progress_lock:
            first = not self._progress
            self._progress[job_id] = (current, total, message)
        if first:
            self._queue.put(_WAKE)

    # -- operations (all run in the store thread) --------------------------------

    def prepare(self) -> defer.Deferred:
        """@return: a Deferred firing with C{None} or a reason the store cannot be used."""
        return self.run_alone(_prepare)


def _deliver(items) -> None:
    for d, result, failed in items:
        if failed:
            d.errback(result)
        else:
            d.callback(result)


def _write_progress(progress: dict) -> None:
    sql = _statements()
    for job_id, (current, total, message) in progress.items():
        sql.update(
            job_id,
            {"progress_current": current, "progress_total": total, "progress_message": message},
            only_state=RUNNING,
        )


def _prepare():
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


# -- the hot path in plain SQL ---------------------------------------------------------
#
# Submitting, claiming, finishing and progress run once or more per job; the
# ORM's query building costs about ten times the SQL itself there. These few
# statements are written out once; values still go through each field's own
# get_db_prep_save, so every database backend Django supports adapts them.


class _SQL:
    """The job table's statements and field adapters (built once)."""

    def __init__(self):
        from django.db import connection
        from django.db.models import NOT_PROVIDED

        from twistedlrp.models import Job

        quote = connection.ops.quote_name
        self.fields = {f.name: f for f in Job._meta.concrete_fields}
        self.table = quote(Job._meta.db_table)
        self.column = {name: quote(f.column) for name, f in self.fields.items()}
        # Callable defaults (the id, the JSON arguments) are always given.
        self.defaults = {
            name: f.get_default()
            for name, f in self.fields.items()
            if f.default is NOT_PROVIDED or not callable(f.default)
        }
        # Only these need the backend's adaptation; strings and numbers go as they are.
        self.adapted = {
            name
            for name, f in self.fields.items()
            if f.get_internal_type() in ("JSONField", "UUIDField", "DateTimeField")
        }
        # PostgreSQL's text columns refuse NUL; job output, errors and progress
        # messages may hold one (SQLite stores it as it is).
        self.nul_free = connection.vendor == "postgresql"
        self.text = (
            {
                n
                for n, f in self.fields.items()
                if f.get_internal_type() in ("CharField", "TextField")
            }
            if self.nul_free
            else set()
        )
        self.key_length = self.fields["key"].max_length
        names = list(self.fields)
        self.insert_names = names
        self.insert = (
            f"INSERT INTO {self.table} ({', '.join(self.column[n] for n in names)}) "
            f"VALUES ({', '.join(['%s'] * len(names))})"
        )
        self.claim = (
            f"UPDATE {self.table} SET {self.column['state']} = %s, "
            f"{self.column['attempts']} = {self.column['attempts']} + 1, "
            f"{self.column['started_at']} = %s, {self.column['worker']} = %s "
            f"WHERE {self.column['id']} = %s AND {self.column['state']} = %s"
        )

    def prep(self, name: str, value):
        if value is None:
            return value
        if name in self.adapted:
            from django.db import connection

            return self.fields[name].get_db_prep_save(value, connection)
        if name in self.text and "\x00" in value:
            return value.replace("\x00", "\ufffd")
        return value

    def update(self, job_id, values: dict, only_state: str | None = None) -> int:
        """@return: the number of rows changed (0 or 1)."""
        from django.db import connection

        sets = ", ".join(f"{self.column[name]} = %s" for name in values)
        params = [self.prep(name, value) for name, value in values.items()]
        sql = f"UPDATE {self.table} SET {sets} WHERE {self.column['id']} = %s"
        params.append(self.prep("id", _uuid(job_id)))
        if only_state is not None:
            sql += f" AND {self.column['state']} = %s"
            params.append(only_state)
        with connection.cursor() as cursor:
            cursor.execute(sql, params)
            return cursor.rowcount


_sql: _SQL | None = None


def _statements() -> _SQL:
    global _sql
    if _sql is None:
        _sql = _SQL()
    return _sql


def _holds_nul(value) -> bool:
    """@return: whether a JSON value holds a NUL character (which jsonb refuses)."""
    import json

    if value is None:
        return False
    text = json.dumps(value)
    # Fast and usually final; an escaped backslash before "u0000" is no NUL.
    return "\\u0000" in text and _nul_in(value)


def _nul_in(value) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_nul_in(k) or _nul_in(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return any(_nul_in(v) for v in value)
    return False


def _uuid(value) -> uuid.UUID:
    return value if isinstance(value, uuid.UUID) else uuid.UUID(str(value))


def create(fields: dict) -> dict:
    """
    Insert a job, unless C{fields["key"]} names an unfinished job.

    @return: C{(created, job dict)}.
    """
    from django.db import connection

    from twistedlrp.models import Job

    sql = _statements()
    key = fields.get("key")
    if key and len(key) > sql.key_length:
        raise InvalidArguments(
            f"a job key has at most {sql.key_length} characters, this one has {len(key)}"
        )
    if sql.nul_free:
        if _holds_nul([fields["args"], fields["kwargs"]]):
            raise InvalidArguments(
                f"the arguments of {fields['name']} contain a NUL character (\\u0000), "
                "which PostgreSQL cannot store"
            )
        if key:
            key = sql.prep("key", key)
            fields = dict(fields, key=key)
    if key:
        existing = Job.objects.filter(key=key, state__in=UNFINISHED).first()
        if existing is not None:
            return False, job_dict(existing)
    row = dict(sql.defaults, id=uuid.uuid4(), created_at=now(), state=QUEUED, **fields)
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
    import json

    from django.db import connection

    from twistedlrp.models import Job

    sql = _statements()
    started = now()
    with connection.cursor() as cursor:
        cursor.execute(
            sql.claim,
            [
                RUNNING,
                sql.prep("started_at", started),
                worker,
                sql.prep("id", _uuid(job_id)),
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

    sql = _statements()
    fields = dict(fields, state=state)
    if sql.nul_free and state == SUCCEEDED and _holds_nul(fields.get("result")):
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
        if job.cancel_requested:
            Job.objects.filter(id=job.id).update(state=CANCELLED, finished_at=now(), error=reason)
        elif job.attempts < job.max_attempts:
            Job.objects.filter(id=job.id).update(
                state=QUEUED, error=reason + "; retried", worker=""
            )
        else:
            Job.objects.filter(id=job.id).update(state=FAILED, finished_at=now(), error=reason)
            failed.append(str(job.id))
    queued = list(
        Job.objects.filter(state=QUEUED)
        .order_by("created_at")
        .values("id", "priority", "created_at", "run_after", "queue")
    )
    for row in queued:
        row["id"] = str(row["id"])
    return queued, failed


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
