"""
The job store's SQLite fast path (jobs/store/sql.py) adapts values exactly
as Django does, and its statements run on the DB-API connection inside
Django's transaction; a job read in plain SQL is described exactly as the
ORM's model instance is, on SQLite and on PostgreSQL. Django is set up in a
child process of its own, so that this pytest process keeps no settings.
"""

import os
import subprocess
import sys
import textwrap

import pytest

from support import PG_DJANGO_CHILD, pg_ensure, pg_name, postgres

# Jobs of every shape read by operations.get (plain SQL) and through the
# ORM: the same dicts, the same types; the same errors for unknown ids.
READS = textwrap.dedent(
    """
    import datetime as dt, uuid
    from django.db import transaction
    from twistedlrp.jobs.errors import InvalidArguments, UnknownJob
    from twistedlrp.jobs.store import operations
    from twistedlrp.models import Job

    def fields(**extra):
        return dict({"name": "n", "args": [1, "é", {"a": None}], "kwargs": {"k": [2.5]},
                     "priority": 0, "queue": "default", "max_attempts": 1, "retry_delay": 1.0,
                     "timeout": None, "key": None, "run_after": None}, **extra)

    ids = []
    with transaction.atomic():
        ids.append(operations.create(fields())[1]["id"])
        later = dt.datetime(2031, 5, 6, 7, 8, 9, 123456, tzinfo=dt.UTC)
        ids.append(operations.create(fields(key="k1", timeout=2.5, priority=-3, run_after=later,
                                            max_attempts=3, args=[], kwargs={}))[1]["id"])
        chosen = str(uuid.uuid4())
        ids.append(operations.create(fields(), job_id=chosen)[1]["id"])
        assert ids[-1] == chosen
        done = operations.create(fields(name="m"))[1]["id"]
        assert operations.claim(done, "w1", node="n1") is not None
        operations.write_progress({done: (3, 10, "half")})
        operations.finish(done, "succeeded", {"result": {"r": [1, None, "x"]}, "output": "o"},
                          describe=False)
        ids.append(done)
        failed = operations.create(fields(name="f"))[1]["id"]
        operations.claim(failed, "w2", load=False)
        operations.finish(failed, "failed", {"error": "boom", "result": None}, describe=False)
        ids.append(failed)
        scalar = operations.create(fields(name="s"))[1]["id"]
        operations.claim(scalar, "w2", load=False)
        operations.finish(scalar, "succeeded", {"result": 0}, describe=False)
        ids.append(scalar)
        ids.append(operations.mark_cancel(operations.create(fields())[1]["id"])["id"])
        running = operations.create(fields(name="r"))[1]["id"]
        operations.claim(running, "w3", load=False)
        ids.append(operations.mark_cancel(running)["id"])
    compared = 0
    for job_id in ids:
        for full in (True, False):
            read = operations.get(job_id, full)
            orm = operations.job_dict(Job.objects.get(id=job_id), full, arguments=full)
            assert list(read) == list(orm), (read, orm)
            for name in orm:
                assert (type(read[name]), read[name]) == (type(orm[name]), orm[name]), (name, read, orm)
            compared += 1
        again = operations.create(fields(name=orm["name"]), job_id=job_id)
        assert again == (False, operations.job_dict(Job.objects.get(id=job_id))), again
        try:
            operations.create(fields(name="other"), job_id=job_id)
        except InvalidArguments as e:
            assert "another name" in str(e), e
        else:
            raise AssertionError("a job of another name under a taken id")
    from django.db.models import Count

    orm_counts = dict(Job.objects.values_list("state").annotate(n=Count("*")).order_by())
    assert operations.counts() == orm_counts, (operations.counts(), orm_counts)
    assert sum(orm_counts.values()) == Job.objects.count() and len(orm_counts) == 5, orm_counts
    # The unfinished job of a key is found; a finished one's key is free again.
    keyed = Job.objects.get(key="k1")
    assert operations.create(fields(key="k1"))[1]["id"] == str(keyed.id)
    with transaction.atomic():
        queued = operations.create(fields(key="k2", priority=4, timeout=1.5))[1]["id"]
        claimed = operations.claim(queued, "w9", node="n")
    orm = Job.objects.values(
        "args", "kwargs", "attempts", "name", "timeout", "max_attempts", "retry_delay", "priority"
    ).get(id=queued)
    orm["payload"] = operations.payload_of(orm.pop("args"), orm.pop("kwargs"))
    assert {k: v for k, v in claimed.items() if k != "started_at"} == orm, (claimed, orm)
    assert operations.queue_of(queued) == "default"
    operations.finish(queued, "succeeded", {"result": None}, describe=False)
    assert operations.create(fields(key="k2"))[0] is True
    for unknown in (str(uuid.uuid4()), "not-a-uuid", ""):
        try:
            operations.get(unknown)
        except UnknownJob as e:
            assert repr(unknown) in str(e), e
        else:
            raise AssertionError(f"no UnknownJob for {unknown!r}")
    print("compared", compared)
    """
)

SCRIPT = (
    textwrap.dedent(
        """
    import datetime as dt, uuid, zoneinfo
    import django
    from django.conf import settings

    settings.configure(
        INSTALLED_APPS=["django.contrib.contenttypes", "django.contrib.auth", "twistedlrp"],
        DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}},
        USE_TZ=True,
        TIME_ZONE="Europe/Paris",
        DEFAULT_AUTO_FIELD="django.db.models.BigAutoField",
    )
    django.setup()
    from django.core.management import call_command
    from django.db import connection, transaction

    from twistedlrp.jobs.store import operations
    from twistedlrp.jobs.store.sql import statements
    from twistedlrp.models import Job

    call_command("migrate", "twistedlrp", verbosity=0)
    sql = statements()
    assert sql.direct
    paris = zoneinfo.ZoneInfo("Europe/Paris")
    values = {
        "created_at": [
            dt.datetime(2026, 3, 29, 1, 30, 5, 123456, tzinfo=dt.UTC),
            dt.datetime(2026, 3, 29, 3, 30, tzinfo=paris),
            dt.datetime(2026, 12, 1, 10, 0, 0),  # naive: Django's current-zone path
        ],
        "id": [uuid.uuid4(), str(uuid.uuid4())],
        "args": [[1, "é", None, {"a": [True, 2.5]}], [], "\\u2603"],
        "result": [{"x": 1}, 0, False, "text"],
    }
    checked = 0
    for name, samples in values.items():
        field = sql.fields[name]
        for value in samples:
            assert sql.prep(name, value) == field.get_db_prep_save(value, connection), (name, value)
            checked += 1
    with transaction.atomic():
        info = operations.create(
            {"name": "n", "args": [1], "kwargs": {}, "priority": 0, "queue": "default",
             "max_attempts": 1, "retry_delay": 1.0, "timeout": None, "key": None,
             "run_after": None}
        )[1]
        assert operations.claim(info["id"], "w1", load=False) is not None
        assert operations.claim(info["id"], "w2", load=False) is None
    job = Job.objects.get(id=info["id"])
    assert (job.state, job.worker, job.attempts, job.args) == ("running", "w1", 1, [1]), job
    assert abs((job.started_at - job.created_at).total_seconds()) < 5
    from django.db import OperationalError

    try:
        sql.execute("UPDATE no_such_table SET x = %s", [1])
    except OperationalError:
        pass  # Django's class, as its own cursors raise it
    else:
        raise AssertionError("no error for a missing table")
    print("checked", checked)
    """
    )
    + READS
)


def test_sqlite_fast_path_adapts_like_django_and_writes_rows():
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "checked 12" in done.stdout
    assert "compared 16" in done.stdout


@pytest.mark.skipif(not postgres(), reason="needs PostgreSQL (LRP_TEST_POSTGRES)")
def test_postgres_reads_describe_jobs_as_the_orm(tmp_path):
    pg_ensure(tmp_path / "db")
    script = (
        PG_DJANGO_CHILD
        + textwrap.dedent(
            """
        from django.core.management import call_command
        call_command("migrate", "twistedlrp", verbosity=0)
        """
        )
        + READS
    )
    env = dict(os.environ, DB=pg_name(tmp_path / "db"))
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env
    )
    assert done.returncode == 0, done.stderr
    assert "compared 16" in done.stdout
