"""
Retention: a real server deletes finished jobs past their keep
(LRP_JOBS_KEEP, @job(keep=...)) and nothing else; manage.py lrp_prune does
it by hand without a server; a bad LRP_JOBS_KEEP stops the server at start.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from jobsupport import api, make_template_db, rows, start_server, stored_id, wait_job

from support import TESTSITE, pg_connect, pg_ensure, postgres, wait_for

LONG_AGO = "2000-01-01 00:00:00+00:00"


def execute(db: Path, sql: str, *params) -> None:
    """Run one writing statement (C{?} placeholders) on the server's database."""
    if postgres():
        with pg_connect(db) as con:
            con.execute(sql.replace("?", "%s"), params)
        return
    con = sqlite3.connect(db, timeout=20)
    try:
        with con:
            con.execute(sql, params)
    finally:
        con.close()


def age(db: Path, job_id: str, finished: bool = True) -> None:
    """Make a job look created (and finished) long ago."""
    columns = "created_at = ?, finished_at = ?" if finished else "created_at = ?"
    params = [LONG_AGO, LONG_AGO] if finished else [LONG_AGO]
    execute(db, f"update twistedlrp_job set {columns} where id = ?", *params, stored_id(job_id))


def exists(db: Path, job_id: str) -> bool:
    return bool(rows(db, "select 1 from twistedlrp_job where id = ?", stored_id(job_id)))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("retention")
    template = make_template_db(tmp)
    # A keep of 20 s by default; testapp.jobs.short_lived keeps 2 s, so the
    # pruner passes every second.
    server = start_server(
        template, tmp / "server", "--workers", "2", env={"LRP_TEST_JOBS_KEEP": "20s"}
    )
    yield server, tmp / "server" / "db.sqlite3", template, tmp
    server.kill()


def submit(server, name, *args, **fields) -> str:
    return api(server, "submit", name=name, args=list(args), **fields)["job"]["id"]


def test_old_finished_jobs_are_deleted_and_unfinished_or_recent_ones_kept(env):
    server, db, _, tmp = env
    succeeded = submit(server, "testapp.jobs.add", 1, 2)
    failed = submit(server, "testapp.jobs.fail")
    assert wait_job(server, succeeded)["state"] == "succeeded"
    assert wait_job(server, failed)["state"] == "failed"
    running = submit(server, "testapp.jobs.sleeper", str(tmp), 60)
    wait_job(server, running, states=("running",))
    queued = submit(server, "testapp.jobs.add", 3, 4, run_after=time.time() + 3600)
    recent = submit(server, "testapp.jobs.add", 5, 6)
    assert wait_job(server, recent)["state"] == "succeeded"

    for job_id in (succeeded, failed):
        age(db, job_id)
    for job_id in (running, queued):
        age(db, job_id, finished=False)
    wait_for(
        lambda: not exists(db, succeeded) and not exists(db, failed),
        30,
        interval=0.1,
        message="the old finished jobs deleted",
    )
    for job_id in (running, queued, recent):
        assert exists(db, job_id), job_id
    assert api(server, "get", id=running)["job"]["state"] == "running"
    assert api(server, "get", id=succeeded, expect_error=True)["error"] == "UnknownJob"
    assert "Retention: deleted 2 finished job(s) older than 20s" in server.output()
    retention = api(server, "stats")["stats"]["retention"]
    assert retention["keep"] == 20 and retention["deleted"] >= 2 and retention["passes"] >= 1
    api(server, "cancel", id=running)
    api(server, "cancel", id=queued)


def test_a_job_keeps_its_own_time(env):
    server, db, _, _ = env
    short = submit(server, "testapp.jobs.short_lived", 1)
    forever = submit(server, "testapp.jobs.kept_forever", 2)
    default = submit(server, "testapp.jobs.add", 1, 1)
    for job_id in (short, forever, default):
        assert wait_job(server, job_id)["state"] == "succeeded"
    age(db, forever)
    # keep=2: gone within seconds, though nothing aged it.
    wait_for(lambda: not exists(db, short), 10, interval=0.1, message="short_lived deleted")
    # Finished at the same moment, but under the default keep of 20 s.
    assert exists(db, default)
    # keep="forever": kept however old.
    assert exists(db, forever)
    # Logged once the deletion committed, which the query above may see first.
    wait_for(
        lambda: "older than 2s (testapp.jobs.short_lived)" in server.output(),
        10,
        message="the deletion's log line",
    )


def test_a_bad_keep_stops_the_server_at_start(env, tmp_path):
    _, _, template, _ = env
    server = start_server(template, tmp_path, env={"LRP_TEST_JOBS_KEEP": "soon"}, wait=False)
    try:
        assert server.proc.wait(timeout=60) == 1
    finally:
        server.kill()
    assert (
        "twistd lrp: error: LRP_JOBS_KEEP: expected a number with an optional unit s, m, h, d "
        "or w (as in 30m or 2d), got 'soon'" in server.output()
    )


# -- manage.py lrp_prune, without a server ----------------------------------------

SEED = """
import datetime as dt, uuid
import django
django.setup()
from twistedlrp.models import Job
now = dt.datetime.now(dt.UTC)
for tag, name, state, days in [
    ("a1", "testapp.jobs.add", "succeeded", 3),
    ("a2", "testapp.jobs.fail", "failed", 10),
    ("a3", "testapp.jobs.add", "cancelled", 1),
    ("r1", "testapp.jobs.sleeper", "running", 10),
    ("q1", "testapp.jobs.add", "queued", 10),
    ("k1", "testapp.jobs.kept_forever", "succeeded", 30),
    ("s1", "testapp.jobs.short_lived", "succeeded", 1 / 24),
]:
    when = now - dt.timedelta(days=days)
    finished = when if state in ("succeeded", "failed", "cancelled") else None
    Job.objects.create(name=name, state=state, created_at=when, finished_at=finished, key=tag)
"""


# `django-admin lrp_prune`, run with the test site's Python (see manage_env).
PRUNE = [str(Path(sys.executable).with_name("django-admin")), "lrp_prune"]


def manage_env(db: Path) -> dict:
    """@return: the environment of a command of the test site on C{db}."""
    env = dict(os.environ, LRP_TEST_DB=str(db), DJANGO_SETTINGS_MODULE="testsite.settings")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTSITE), env.get("PYTHONPATH")]))
    return env


def manage(db: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args],
        env=manage_env(db),
        cwd=TESTSITE,
        capture_output=True,
        text=True,
        timeout=60,
    )


def seeded_db(template: Path, tmp_path: Path, seed: str) -> Path:
    """@return: a fresh copy of C{template} in which the script C{seed} ran."""
    db = tmp_path / "db.sqlite3"
    if postgres():
        pg_ensure(db, template=template)
    else:
        db.write_bytes(template.read_bytes())
    seeded = manage(db, "-c", seed)
    assert seeded.returncode == 0, seeded.stderr
    return db


def remaining(db: Path) -> list[str]:
    return sorted(key for (key,) in rows(db, "select key from twistedlrp_job"))


def test_lrp_prune_deletes_by_hand(env, tmp_path):
    _, _, template, _ = env
    db = seeded_db(template, tmp_path, SEED)

    bad = manage(db, *PRUNE, "--older-than", "2x")
    assert bad.returncode == 1
    assert "--older-than: expected a number with an optional unit" in bad.stderr
    assert manage(db, *PRUNE, "--older-than", "0").returncode == 1
    bad = manage(db, *PRUNE, "--batch-size", "0")
    assert bad.returncode == 1 and "--batch-size: must be between 1 and 10000, got 0" in bad.stderr

    # The server's keeps: 7 days, short_lived 2 s, kept_forever for ever.
    done = manage(db, *PRUNE)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "2 finished job(s) deleted"
    assert remaining(db) == ["a1", "a3", "k1", "q1", "r1"]

    dry = manage(db, *PRUNE, "--older-than", "2d", "--dry-run")
    assert dry.stdout.strip() == "2 finished job(s) would be deleted (dry run)"
    assert remaining(db) == ["a1", "a3", "k1", "q1", "r1"]

    # --older-than applies to every job (kept_forever too), of one name or all, in batches.
    done = manage(db, *PRUNE, "--older-than", "2d", "--name", "testapp.jobs.kept_forever")
    assert done.stdout.strip() == "1 finished job(s) deleted", done.stderr
    assert remaining(db) == ["a1", "a3", "q1", "r1"]
    done = manage(db, *PRUNE, "--older-than", "2d", "--batch-size", "1")
    assert done.stdout.strip() == "1 finished job(s) deleted", done.stderr
    assert remaining(db) == ["a3", "q1", "r1"]


MANY = """
import datetime as dt
import django
django.setup()
from twistedlrp.models import Job
old = dt.datetime.now(dt.UTC) - dt.timedelta(days=30)
Job.objects.bulk_create(
    Job(name="testapp.jobs.add", state="succeeded", created_at=old, finished_at=old)
    for _ in range(1000)
)
"""


def test_two_prunes_at_once_delete_each_job_once(env, tmp_path):
    """As two job nodes pruning one database do (SKIP LOCKED on PostgreSQL)."""
    _, _, template, _ = env
    db = seeded_db(template, tmp_path, MANY)
    command = [sys.executable, *PRUNE, "--older-than", "1d", "--batch-size", "50"]
    procs = [
        subprocess.Popen(
            command, env=manage_env(db), cwd=TESTSITE, stdout=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    counts = [int(out.split()[0]) for out in outputs]
    assert sum(counts) == 1000, outputs
    assert rows(db, "select count(*) from twistedlrp_job")[0][0] == 0
