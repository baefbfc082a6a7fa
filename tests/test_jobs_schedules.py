"""
Periodic jobs through a real server: a schedule of @job(schedule=...) and
one of LRP_SCHEDULE, both every second, run once per due time (the job ids
are derived from the due times); a schedule missed while the server was
down runs once at start-up; bad schedules stop the start with a clear error.
"""

from __future__ import annotations

import json
import signal
from datetime import UTC, datetime, timedelta

import pytest
from jobsupport import rows, shared_db, start_server

from support import LRPProcess, postgres, run_to_exit, wait_for
from twistedlrp.jobs.service.schedules import job_id

EVERY_SECOND = "* * * * * *"


def lines(path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def hexid(value) -> str:
    """@return: a job id as 32 hex digits (SQLite stores it so, PostgreSQL as a uuid)."""
    return str(value).replace("-", "")


def due_times(ids, name: str, start: datetime, end: datetime) -> list[datetime]:
    """@return: the due time of each job id of schedule C{name} (ids of no due time fail)."""
    by_id = {}
    t = start.replace(microsecond=0)
    while t <= end:
        by_id[hexid(job_id(name, t))] = t
        t += timedelta(seconds=1)
    unknown = [i for i in ids if i not in by_id]
    assert not unknown, f"jobs of {name} whose id is no due time's: {unknown}"
    return sorted(by_id[i] for i in ids)


def parse_db_time(value) -> datetime:
    if isinstance(value, datetime):
        return value.astimezone(UTC)
    return datetime.fromisoformat(value).replace(tzinfo=UTC)


def test_schedules_every_second_run_once_per_due_time(template, tmp_path):
    marks = tmp_path / "marks"
    marks.mkdir()
    schedule = {
        "records": {
            "job": "testapp.jobs.record",
            "cron": EVERY_SECOND,
            "args": [str(marks), "sched"],
        }
    }
    env = {"LRP_TEST_TICK_DIR": str(marks), "LRP_TEST_SCHEDULE": json.dumps(schedule)}
    start = datetime.now(UTC) - timedelta(seconds=1)
    # Two web processes: only the main process's job service runs schedules.
    server = start_server(template, tmp_path / "s", "--web-workers", "2", env=env)
    db = tmp_path / "s" / "db.sqlite3"
    try:
        wait_for(
            lambda: len(lines(marks / "tick")) >= 3 and len(lines(marks / "run-sched")) >= 3,
            20,
            message="three runs of each schedule",
        )
        output = server.output()
        assert (
            "Schedule records: job testapp.jobs.record, cron '* * * * * *' (UTC), next run"
            in output
        )
        assert "Schedule testapp.jobs.tick: job testapp.jobs.tick" in output
    finally:
        server.signal(signal.SIGTERM)
        assert server.wait_exit(30) == 0, server.output()
    end = datetime.now(UTC) + timedelta(seconds=1)
    for name, job, marker in (
        ("records", "testapp.jobs.record", "run-sched"),
        ("testapp.jobs.tick", "testapp.jobs.tick", "tick"),
    ):
        jobs = rows(db, "select id, state from twistedlrp_job where name = ?", job)
        ids = [hexid(r[0]) for r in jobs]
        dues = due_times(ids, name, start, end)
        assert len(set(dues)) == len(dues) >= 3
        # Every job that ran ran once (a job the stop put back in the queue did not run).
        succeeded = [r for r in jobs if r[1] == "succeeded"]
        assert len(lines(marks / marker)) == len(succeeded) >= 3, jobs
        [(last_job, next_due, last_run_at)] = rows(
            db,
            "select last_job, next_due, last_run_at from twistedlrp_schedule where name = ?",
            name,
        )
        assert hexid(last_job) in ids
        assert parse_db_time(next_due) > max(dues)
        assert last_run_at is not None


def test_a_schedule_missed_while_down_runs_once_at_start(template, tmp_path):
    marks = tmp_path / "marks"
    marks.mkdir()
    # Once a year: it runs in this test only because it was missed.
    schedule = {
        "yearly": {"job": "testapp.jobs.record", "cron": "0 0 1 1 *", "args": [str(marks), "y"]}
    }
    env = {"LRP_TEST_SCHEDULE": json.dumps(schedule)}
    server = start_server(template, tmp_path / "s", env=env)
    db = tmp_path / "s" / "db.sqlite3"
    server.stop()
    assert not lines(marks / "run-y")
    # Three years of missed due times, as if the server had been down since.
    missed = datetime(datetime.now(UTC).year - 3, 1, 1, tzinfo=UTC)
    if postgres():
        from support import pg_connect

        with pg_connect(db) as con:
            con.execute("update twistedlrp_schedule set next_due = %s", (missed,))
    else:
        import sqlite3

        con = sqlite3.connect(db)
        with con:
            con.execute(
                "update twistedlrp_schedule set next_due = ?",
                (missed.strftime("%Y-%m-%d %H:%M:%S"),),
            )
        con.close()
    server = start_server(template, tmp_path / "s", env=env)
    try:
        wait_for(lambda: lines(marks / "run-y"), 20, message="the missed run")
        jobs = wait_for(
            lambda: (
                (
                    r := rows(
                        db,
                        "select id, state from twistedlrp_job where name = 'testapp.jobs.record'",
                    )
                )
                and r[0][1] == "succeeded"
                and r
            ),
            20,
            message="the missed run's job succeeded",
        )
        # Once, for the first missed due time; the next is next year's.
        assert len(jobs) == 1, jobs
        assert hexid(jobs[0][0]) == hexid(job_id("yearly", missed))
        [(next_due,)] = rows(db, "select next_due from twistedlrp_schedule")
        assert parse_db_time(next_due) == datetime(datetime.now(UTC).year + 1, 1, 1, tzinfo=UTC)
        assert len(lines(marks / "run-y")) == 1
    finally:
        server.stop()


@pytest.mark.parametrize(
    "schedule, message",
    [
        (
            {"bad": {"job": "testapp.jobs.add", "cron": "every minute"}},
            "LRP_SCHEDULE['bad']: 'every minute' is not a valid cron expression",
        ),
        (
            {"lost": {"job": "testapp.jobs.nothing_here", "cron": "* * * * *"}},
            "LRP_SCHEDULE['lost']: no job is registered under the name 'testapp.jobs.nothing_here'",
        ),
        (
            {"odd": {"job": "testapp.jobs.add", "cron": "* * * * *", "when": "now"}},
            "LRP_SCHEDULE['odd']: unknown keys when",
        ),
        (
            {"args": {"job": "testapp.jobs.add", "cron": "* * * * *", "args": "1, 2"}},
            "LRP_SCHEDULE['args']: args must be a list and kwargs a dict",
        ),
    ],
)
def test_a_bad_schedule_stops_the_start(tmp_path, schedule, message):
    code, output = run_to_exit(env={"LRP_TEST_SCHEDULE": json.dumps(schedule)})
    assert code != 0
    assert message in output, output


@pytest.mark.skipif(not postgres(), reason="several job nodes need PostgreSQL (LRP_TEST_POSTGRES)")
def test_two_job_nodes_run_each_due_time_once(template, tmp_path):
    marks = tmp_path / "marks"
    marks.mkdir()
    schedule = {
        "records": {"job": "testapp.jobs.record", "cron": EVERY_SECOND, "args": [str(marks), "n"]}
    }
    db = shared_db(template, tmp_path)
    start = datetime.now(UTC) - timedelta(seconds=1)
    nodes = []
    for name in ("node-a", "node-b"):
        node = LRPProcess(
            "--jobs-only",
            "--node-name",
            name,
            listen=False,
            tmp=tmp_path / name,
            env={
                "LRP_TEST_DB": str(db),
                "LRP_TEST_NO_URLCONF": "1",
                "LRP_TEST_SCHEDULE": json.dumps(schedule),
            },
        )
        (tmp_path / name).mkdir()
        nodes.append(node.start(wait=False))
    try:
        for node in nodes:
            wait_for(
                lambda node=node: (
                    "Job service ready" in node.output() or node.proc.poll() is not None
                ),
                30,
                message="a job node",
            )
            assert node.proc.poll() is None, node.output()
        wait_for(lambda: len(lines(marks / "run-n")) >= 5, 30, message="five runs")
    finally:
        for node in nodes:
            node.signal(signal.SIGTERM)
        for node in nodes:
            assert node.wait_exit(30) == 0, node.output()
    end = datetime.now(UTC) + timedelta(seconds=1)
    jobs = rows(db, "select id, state, node from twistedlrp_job where name = 'testapp.jobs.record'")
    dues = due_times([hexid(r[0]) for r in jobs], "records", start, end)
    assert len(set(dues)) == len(dues) >= 5
    # Each due time was claimed by one node: as many "submitted" lines as jobs.
    claimed = [n.output().count(" submitted for ") for n in nodes]
    assert sum(claimed) == len(jobs), (claimed, len(jobs))
    succeeded = [r for r in jobs if r[1] == "succeeded"]
    assert len(lines(marks / "run-n")) == len(succeeded) >= 5


def test_a_node_runs_only_the_schedules_of_its_queues(template, tmp_path):
    marks = tmp_path / "marks"
    marks.mkdir()
    schedule = {
        "records": {"job": "testapp.jobs.record", "cron": EVERY_SECOND, "args": [str(marks), "q"]}
    }
    env = {"LRP_TEST_SCHEDULE": json.dumps(schedule)}
    server = start_server(template, tmp_path / "s", "--queues", "reports", env=env)
    db = tmp_path / "s" / "db.sqlite3"
    try:
        assert "not on this node: its queue 'default' is not in --queues" in server.output()
        [(first_due,)] = rows(db, "select next_due from twistedlrp_schedule")
        # Two due times later, nobody ran it: the row is still at its first due time.
        wait_for(
            lambda: datetime.now(UTC) > parse_db_time(first_due) + timedelta(seconds=2),
            10,
            message="two due times passed",
        )
        assert rows(db, "select next_due from twistedlrp_schedule") == [(first_due,)]
        assert rows(db, "select count(*) from twistedlrp_job")[0][0] == 0
    finally:
        server.stop()
