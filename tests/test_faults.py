"""
Hostile and unlucky inputs against a real server: nothing stored by a bad
submission, nothing left running without a worker, nothing retried twice
by accident, and a clear error for each (issue: nothing stuck, nothing
exhausted). The limits of the HTTP and job listeners and the worker process
trees have modules of their own (test_faults_http, test_faults_listeners,
test_faults_workers).
"""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import time
import uuid

import pytest
import pytest_twisted
from jobsupport import AMPClient, api, count_jobs, make_template_db, start_server, wait_job
from test_jobs_pb import Connection, _failure_of

from support import free_port, postgres, request, wait_for

SECRET = b"a long random secret for the fault tests"
HOST = os.uname().nodename

# (field, value as the Python API gets it, value as an AMP string) and what the error says.
BAD_VALUES = [
    ("timeout", -1, b"-1", "timeout: must be more than 0"),
    ("timeout", 0, b"0", "timeout: must be more than 0"),
    ("timeout", float("nan"), b"nan", "timeout: must be a finite number"),
    ("timeout", float("inf"), b"inf", "timeout: must be a finite number"),
    ("run_after", float("inf"), b"inf", "run_after: must be a finite number"),
    ("run_after", float("nan"), b"nan", "run_after: must be a finite number"),
    ("run_after", 1e30, b"1e30", "run_after: expected a Unix time between 1970 and 9999"),
    ("priority", 10**30, b"1" + b"0" * 30, "priority: must be between"),
]


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    return make_template_db(tmp_path_factory.mktemp("faults"))


@pytest.fixture(scope="module")
def server(template, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("faults-server")
    secret = tmp / "secret"
    secret.write_bytes(SECRET)
    secret.chmod(0o600)
    amp_port, pb_port = free_port(), free_port()
    server = start_server(
        template,
        tmp / "server",
        "--jobs-listen",
        f"tcp:{amp_port}:interface=127.0.0.1",
        "--pb-listen",
        f"tcp:{pb_port}:interface=127.0.0.1",
        "--jobs-secret-file",
        str(secret),
    )
    server.amp_port, server.pb_port, server.db = amp_port, pb_port, tmp / "server" / "db.sqlite3"
    yield server
    server.kill()


def _no_internal_errors(server):
    output = server.output()
    assert "internal error" not in output
    assert "CRITICAL" not in output and "Unhandled" not in output


def test_bad_values_from_the_python_api_are_refused_naming_the_field(server):
    before = count_jobs(server.db)
    cases = [(field, value, said) for field, value, _, said in BAD_VALUES] + [
        ("priority", "high", "priority: expected a whole number"),
        ("priority", True, "priority: expected a whole number"),
        ("key", 5, "key: expected a string"),
        ("key", "k" * 256, "key: a job key has at most 255 characters"),
        ("id", "not-a-uuid", "id: expected a UUID"),
    ]
    for field, value, said in cases:
        error = api(
            server,
            "submit",
            expect_error=True,
            name="testapp.jobs.add",
            args=[1, 2],
            **{field: value},
        )
        assert error["error"] == "InvalidArguments", (field, value, error)
        assert said in error["message"], (field, value, error)
    assert count_jobs(server.db) == before
    _no_internal_errors(server)


def _amp_login(server) -> AMPClient:
    import hashlib
    import hmac

    client = AMPClient("127.0.0.1", server.amp_port)
    nonce = client.call("Challenge")[b"nonce"]
    digest = hmac.new(SECRET, b"twistedlrp-jobs-login:" + nonce, hashlib.sha256).digest()
    assert client.call("Login", digest=digest)[b"ok"] == b"True"
    return client


def test_bad_values_over_amp_are_refused_naming_the_field(server):
    before = count_jobs(server.db)
    client = _amp_login(server)
    try:
        payload = b'{"args":[1,2],"kwargs":{}}'
        for field, _, wire_value, said in BAD_VALUES + [("id", None, b"nope", "id: expected")]:
            answer = client.call(
                "Submit",
                name="testapp.jobs.add",
                payload=b"1",
                **{"payload.0": payload, field: wire_value},
            )
            assert answer.get(b"_error_code") == b"INVALID_ARGUMENTS", (field, answer)
            assert said.encode() in answer[b"_error_description"], (field, answer)
        # The connection is still usable after refusals.
        answer = client.call(
            "Submit", name="testapp.jobs.add", payload=b"1", **{"payload.0": payload}
        )
        assert b"job" in answer, answer
    finally:
        client.close()
    assert count_jobs(server.db) == before + 1
    _no_internal_errors(server)


@pytest_twisted.ensureDeferred
async def test_bad_values_over_pb_are_refused_naming_the_field(server):
    before = count_jobs(server.db)
    connection = Connection(server.pb_port)
    try:
        avatar = await connection.login(SECRET)
        cases = [
            ({"timeout": -1}, "timeout: must be more than 0"),
            ({"priority": 10**30}, "priority: must be between"),
            ({"priority": "high"}, "priority: expected a whole number"),
            ({"key": 5}, "key: expected a string"),
            ({"run_after": float("inf")}, "run_after: must be a finite number"),
            ({"id": "nope"}, "id: expected a UUID"),
        ]
        for kwargs, said in cases:
            failure = await _failure_of(
                avatar.callRemote("submit", "testapp.jobs.add", [1, 2], **kwargs)
            )
            assert failure.check("twistedlrp.jobs.pb.InvalidArgumentsError"), (kwargs, failure)
            assert said in failure.getErrorMessage(), (kwargs, failure.getErrorMessage())
    finally:
        connection.close()
    assert count_jobs(server.db) == before
    _no_internal_errors(server)


def test_a_chosen_id_or_key_makes_a_retried_submission_return_the_same_job(server):
    before = count_jobs(server.db)
    chosen = str(uuid.uuid4())
    first = api(server, "submit", name="testapp.jobs.add", args=[1, 2], id=chosen)["job"]
    again = api(server, "submit", name="testapp.jobs.add", args=[1, 2], id=chosen)["job"]
    assert first["id"] == again["id"] == chosen
    assert wait_job(server, chosen)["result"] == 3
    # Once it has finished too.
    assert (
        api(server, "submit", name="testapp.jobs.add", args=[1, 2], id=chosen)["job"]["id"]
        == chosen
    )
    other = api(server, "submit", expect_error=True, name="testapp.jobs.echo", args=[1], id=chosen)
    assert other["error"] == "InvalidArguments" and "another name" in other["message"]
    assert count_jobs(server.db) == before + 1


def test_a_failed_job_logs_one_warning_line(server):
    job = api(server, "submit", name="testapp.jobs.fail")["job"]
    assert wait_job(server, job["id"])["state"] == "failed"
    line = re.compile(
        rf"#warn\] job testapp\.jobs\.fail {job['id']} failed in \d+\.\d{{3}} s "
        r"\(attempt 1 of 1\): ValueError: this job fails on purpose\n"
    )
    wait_for(lambda: line.search(server.output()), 10, message="the failure's log line")
    assert server.output().count(f"job testapp.jobs.fail {job['id']} failed") == 1


def test_a_progress_message_utf8_cannot_carry_is_mended(server):
    job = api(server, "submit", name="testapp.jobs.progress_unencodable")["job"]
    info = wait_job(server, job["id"])
    assert info["state"] == "succeeded", info["error"]
    assert info["progress"] == [1, 2, "file ?.txt"]


def _insert_job(db, **values):
    """Write a job row straight into an SQLite store (as an old version or a bug could have)."""
    row = {
        "id": uuid.uuid4().hex,
        "name": "testapp.jobs.add",
        "args": "[2, 3]",
        "kwargs": "{}",
        "state": "queued",
        "priority": 0,
        "queue": "default",
        "attempts": 0,
        "max_attempts": 1,
        "retry_delay": 0.0,
        "timeout": None,
        "progress_current": 0,
        "progress_message": "",
        "error": "",
        "worker": "",
        "output": "",
        "cancel_requested": 0,
        "created_at": "2026-01-01 00:00:00",
    }
    row.update(values)
    con = sqlite3.connect(db, timeout=20)
    try:
        names = ", ".join(row)
        marks = ", ".join("?" * len(row))
        con.execute(f"insert into twistedlrp_job ({names}) values ({marks})", list(row.values()))
        con.commit()
    finally:
        con.close()
    return str(uuid.UUID(row["id"]))


@pytest.mark.skipif(bool(postgres()), reason="writes the SQLite store directly")
def test_a_stored_job_that_cannot_start_fails_and_frees_its_worker(template, tmp_path):
    home = tmp_path / "server"
    home.mkdir()
    db = home / "db.sqlite3"
    db.write_bytes(template.read_bytes())
    bad = _insert_job(db, timeout=-1.0)
    server = start_server(template, home, "--workers", "1")
    try:
        info = wait_job(server, bad)
        assert info["state"] == "failed"
        assert "could not start: timeout: must be more than 0" in info["error"]
        # The one worker was freed: the next job runs.
        job = api(server, "submit", name="testapp.jobs.add", args=[4, 5])["job"]
        assert wait_job(server, job["id"])["result"] == 9
        _no_internal_errors(server)
    finally:
        server.kill()


@pytest.mark.skipif(bool(postgres()), reason="writes the SQLite store directly")
def test_a_job_running_without_a_worker_is_retried_or_failed_within_seconds(server):
    long_ago = "2026-01-01 00:00:01"
    retried = _insert_job(
        server.db,
        state="running",
        attempts=1,
        max_attempts=2,
        worker=f"{HOST}:999999",
        started_at=long_ago,
    )
    failed = _insert_job(
        server.db,
        state="running",
        attempts=1,
        max_attempts=1,
        worker=f"{HOST}:999998",
        started_at=long_ago,
    )
    # Another machine's job is that machine's business.
    foreign = _insert_job(
        server.db, state="running", attempts=1, worker="elsewhere:1", started_at=long_ago
    )
    started = time.monotonic()
    assert wait_job(server, retried, timeout=20)["result"] == 5
    info = wait_job(server, failed, timeout=20)
    assert info["state"] == "failed" and "which does not hold it" in info["error"]
    assert time.monotonic() - started < 15
    assert "does not hold it" in server.output()
    assert api(server, "get", id=foreign)["job"]["state"] == "running"


@pytest.mark.skipif(not postgres(), reason="stops a PostgreSQL database from taking connections")
def test_health_is_degraded_while_the_store_cannot_be_reached(template, tmp_path):
    from support import pg_connect, pg_name

    server = start_server(template, tmp_path / "server", "--workers", "1")
    name = pg_name(tmp_path / "server" / "db.sqlite3")
    try:
        with pg_connect(autocommit=True) as con:
            con.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
            con.execute(
                "select pg_terminate_backend(pid) from pg_stat_activity where datname = %s",
                (name,),
            )
        degraded = wait_for(
            lambda: (r := request(server.port, "/-/health")).status == 503 and r.json(),
            20,
            message="health to say the store cannot be reached",
        )
        assert degraded["status"] == "degraded"
        assert "the job store cannot be reached" in degraded["jobs"]["reason"]
        with pg_connect(autocommit=True) as con:
            con.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        wait_for(lambda: request(server.port, "/-/health").status == 200, 20, message="healthy")
        job = api(server, "submit", name="testapp.jobs.add", args=[1, 1])["job"]
        assert wait_job(server, job["id"])["result"] == 2
    finally:
        with pg_connect(autocommit=True) as con:
            con.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        server.kill()


def test_a_web_node_without_its_job_node_warns_once_and_reconnects(template, tmp_path):
    state = tmp_path / "state"
    web = start_server(
        template,
        tmp_path / "web",
        "--no-jobs",
        f"--state-dir={state}",
        env={"LRP_TEST_JOBS_TIMEOUT": "2"},
    )
    node = None
    try:
        for _ in range(3):
            started = time.monotonic()
            error = api(web, "submit", expect_error=True, name="testapp.jobs.add", args=[1, 2])
            assert error["error"] == "JobServiceUnavailable"
            assert "its socket does not exist" in error["message"]
            assert time.monotonic() - started < 1
        node = start_server(
            template,
            tmp_path / "node",
            "--jobs-only",
            f"--state-dir={state}",
            listen=False,
            wait=False,
        )
        wait_for(lambda: (state / "jobs.sock").exists(), 30, message="the job node's socket")
        job = wait_for(
            lambda: (
                api(web, "submit", name="testapp.jobs.add", args=[1, 2])["job"]
                if request(web.port, "/-/health").status == 200
                else None
            ),
            30,
            message="a submission through the job node",
        )
        assert wait_job(web, job["id"])["result"] == 3
        output = web.output()
        assert output.count("Cannot reach the job service") == 1, output
        assert "Connected to the job service at" in output
        assert "Scheduling retry" not in output
    finally:
        web.kill()
        if node is not None:
            node.kill()


def test_a_submit_whose_answer_is_lost_says_so_and_a_retry_with_its_id_is_safe(template, tmp_path):
    state = tmp_path / "state"
    node = start_server(
        template,
        tmp_path / "node",
        "--jobs-only",
        f"--state-dir={state}",
        listen=False,
        wait=False,
    )
    web = None
    try:
        wait_for(lambda: (state / "jobs.sock").exists(), 30, message="the job node's socket")
        web = start_server(
            template,
            tmp_path / "web",
            "--no-jobs",
            f"--state-dir={state}",
            env={"LRP_TEST_JOBS_TIMEOUT": "1"},
        )
        warm = api(web, "submit", name="testapp.jobs.add", args=[0, 0])["job"]
        assert wait_job(web, warm["id"])["result"] == 0
        chosen = str(uuid.uuid4())
        node.proc.send_signal(signal.SIGSTOP)
        try:
            error = api(
                web, "submit", expect_error=True, name="testapp.jobs.add", args=[2, 2], id=chosen
            )
        finally:
            node.proc.send_signal(signal.SIGCONT)
        assert error["error"] == "JobServiceUnavailable"
        assert "may or may not have been stored" in error["message"]
        again = wait_for(
            lambda: api(web, "submit", name="testapp.jobs.add", args=[2, 2], id=chosen)["job"],
            20,
            message="the retried submission",
        )
        assert again["id"] == chosen
        assert wait_job(web, chosen)["result"] == 4
        # One job, not two: the retry found the first.
        listed = api(web, "list", name="testapp.jobs.add", limit=10)["jobs"]
        assert [job_id for job_id, _, _ in listed].count(chosen) == 1
        assert len(listed) == 2  # the warm-up job and this one
    finally:
        node.kill()
        if web is not None:
            web.kill()
