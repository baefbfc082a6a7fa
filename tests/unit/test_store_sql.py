"""
The job store's SQLite fast path (jobs/store/sql.py) adapts values exactly
as Django does, and its statements run on the DB-API connection inside
Django's transaction. Django is set up in a child process of its own, so
that this pytest process keeps no settings.
"""

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
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


def test_sqlite_fast_path_adapts_like_django_and_writes_rows():
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "checked 12" in done.stdout
