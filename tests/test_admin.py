"""
The admin of jobs and schedules, with Django's test client (in a process of
its own, settings testsite.admin_settings) on the database of a real server
whose job service its actions reach: times to the second, durations,
read-only change pages, "run again", no delete of an unfinished job.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime

import pytest
from jobsupport import api, rows, start_server, wait_job

from support import HERE, TESTSITE, postgres, wait_for

DJANGO_ADMIN = str(os.path.join(os.path.dirname(sys.executable), "django-admin"))


def admin_env(db, state_dir=None) -> dict:
    env = dict(os.environ, LRP_TEST_DB=str(db), DJANGO_SETTINGS_MODULE="testsite.admin_settings")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTSITE), env.get("PYTHONPATH")]))
    if state_dir:
        env["LRP_STATE_DIR"] = str(state_dir)
    return env


def db_time(value) -> datetime:
    if isinstance(value, datetime):
        return value.astimezone(UTC)
    return datetime.fromisoformat(value).replace(tzinfo=UTC)


@pytest.mark.skipif(bool(postgres()), reason="the admin's test runs on SQLite")
def test_the_admin_of_jobs_and_schedules(tmp_path):
    db = tmp_path / "s" / "db.sqlite3"
    db.parent.mkdir()
    # The admin's tables too (sessions, admin log), migrated with its settings.
    subprocess.run(
        [DJANGO_ADMIN, "migrate", "-v0"], env=admin_env(db), cwd=TESTSITE, check=True, timeout=120
    )
    marks = tmp_path / "marks"
    marks.mkdir()
    schedule = {"yearly": {"job": "testapp.jobs.add", "cron": "0 0 1 1 *", "args": [1, 2]}}
    server = start_server(
        db, tmp_path / "s", "--workers", "2", env={"LRP_TEST_SCHEDULE": json.dumps(schedule)}
    )
    try:
        finished = api(server, "submit", name="testapp.jobs.add", args=[2, 3])["job"]["id"]
        wait_job(server, finished)
        running = api(server, "submit", name="testapp.jobs.gated_steps", args=[str(marks), 1])
        running = running["job"]["id"]
        wait_for(lambda: (marks / "gated-started").exists(), 20, message="the running job")
        # Read before the admin deletes it.
        [(created, started, ended)] = rows(
            db,
            "select created_at, started_at, finished_at from twistedlrp_job where id = ?",
            finished.replace("-", ""),
        )
        created_text = db_time(created).strftime("%Y-%m-%d %H:%M:%S")
        done = subprocess.run(
            [sys.executable, str(HERE / "programs" / "admin_client.py"), finished, running],
            env=admin_env(db, tmp_path / "s" / "state"),
            cwd=TESTSITE,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr + done.stdout
        out = json.loads(done.stdout.strip().splitlines()[-1])

        # The list: times to the second, a duration column.
        listing = out["list"]
        assert listing["status"] == 200
        assert created_text in listing["html"]
        assert "column-duration" in listing["html"]
        seconds = (db_time(ended) - db_time(started)).total_seconds()
        assert f"{seconds:.2f} s" in listing["html"]
        assert "so far" in listing["html"]  # the running job's duration
        assert "Run the selected jobs again" in listing["html"]

        # Change pages: read-only, no Save buttons; a running job has no Delete link.
        for name in ("change_finished", "change_running"):
            page = out[name]
            assert page["status"] == 200, page
            assert 'name="_save"' not in page["html"] and 'name="_continue"' not in page["html"]
            assert 'type="text"' not in page["html"] and "<textarea" not in page["html"]
        assert created_text in out["change_finished"]["html"]
        assert "/delete/" in out["change_finished"]["html"]
        assert f"{running}/delete/" not in out["change_running"]["html"]

        # No delete of an unfinished job: the page is refused, the action deletes nothing.
        assert out["delete_running_page"]["status"] == 403
        assert out["delete_running"]["status"] == 302
        assert any("cancel them first" in m for m in out["delete_running"]["messages"])
        assert out["after_refused_delete"] == sorted([finished, running])

        # Run again: a new job of the same name and arguments, which runs.
        [new] = out["new_jobs"]
        assert (new["name"], new["args"]) == ("testapp.jobs.add", [2, 3])
        assert wait_job(server, new["id"])["result"] == 5
        assert any(new["id"] in m for m in out["run_again"]["messages"])

        # A finished job is deleted after Django's confirmation page.
        assert out["delete_confirm"]["status"] == 200
        assert "Are you sure" in out["delete_confirm"]["html"]
        assert out["delete_finished"]["status"] == 302
        assert out["finished_left"] is False

        # Schedules: name, job, cron, next run to the second.
        schedules = out["schedules"]
        assert schedules["status"] == 200
        for text in ("yearly", "testapp.jobs.add", "0 0 1 1 *"):
            assert text in schedules["html"]
        assert f"{datetime.now(UTC).year + 1}-01-01 00:00:00" in schedules["html"]
    finally:
        (marks / "go-1").write_text("")
        server.stop()
