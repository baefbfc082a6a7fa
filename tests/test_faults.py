"""
Hostile and unlucky inputs against a real server: nothing stored by a bad
submission, nothing left running without a worker, nothing retried twice
by accident, and a clear error for each (issue: nothing stuck, nothing
exhausted). The limits of the HTTP and job listeners and the worker process
trees have modules of their own (test_faults_http, test_faults_listeners,
test_faults_workers).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sqlite3
import struct
import time
import uuid

import pytest
import pytest_twisted
from jobsupport import (
    AMPClient,
    api,
    count_jobs,
    rows,
    start_server,
    stored_id,
    wait_job,
)
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


@pytest.mark.alone  # stops the PostgreSQL server that the other tests use
@pytest.mark.skipif(not postgres(), reason="stops and starts the PostgreSQL test server")
def test_a_database_restart_is_an_outage_not_a_failure(template, tmp_path):
    """
    PostgreSQL stopped (fast) for 6 s and started again, with one server
    (web and job service in one process) submitting and running jobs:
    submissions wait for the store up to their deadline (80 % of the
    clients' 3 s here) and then fail with JobServiceUnavailable, saying
    nothing was stored; the jobs that ended meanwhile are recorded once it
    is back, none failed for it; health says degraded throughout; the log
    has one WARNING each way and no traceback.
    """
    import threading

    from support import PostgresControl

    cluster = PostgresControl()
    if not cluster.available:
        pytest.skip(cluster.why)
    marks = tmp_path / "marks"
    marks.mkdir()
    server = start_server(
        template, tmp_path / "server", "--workers", "2", env={"LRP_TEST_JOBS_TIMEOUT": "3"}
    )
    results, health = [], []
    stop = threading.Event()

    def submitter():
        while not stop.is_set():
            started = time.monotonic()
            try:
                response = request(
                    server.port,
                    "/jobs/api",
                    method="POST",
                    body=json.dumps(
                        {"op": "submit", "name": "testapp.jobs.add", "args": [1, 2]}
                    ).encode(),
                    timeout=10,
                )
                results.append(
                    (started, time.monotonic() - started, response.status, response.json())
                )
            except Exception as e:  # noqa: BLE001 - recorded, asserted below
                results.append((started, time.monotonic() - started, None, repr(e)))

    def health_poller():
        while not stop.is_set():
            try:
                response = request(server.port, "/-/health", timeout=5)
                health.append((time.monotonic(), response.status, response.json()))
            except Exception as e:  # noqa: BLE001
                health.append((time.monotonic(), None, repr(e)))
            stop.wait(0.1)

    threads = [threading.Thread(target=submitter), threading.Thread(target=health_poller)]
    try:
        sleepers = [
            api(server, "submit", name="testapp.jobs.sleeper", args=[str(marks), 3, f"s{i}"])[
                "job"
            ]["id"]
            for i in range(2)
        ]
        wait_for(
            lambda: all((marks / f"s{i}-started").exists() for i in range(2)),
            20,
            message="both sleepers running",
        )
        for thread in threads:
            thread.start()
        wait_for(lambda: len(results) >= 5, 20, message="submissions before the restart")
        cluster.stop()
        stopped = time.monotonic()
        # Long enough for the sleepers to end, and for submissions to reach their deadline.
        wait_for(
            lambda: (
                time.monotonic() - stopped >= 6
                and all((marks / f"s{i}-done").exists() for i in range(2))
            ),
            30,
            message="the outage",
        )
        cluster.start()
        started = time.monotonic()
        wait_for(
            lambda: any(r[0] > started and r[2] == 200 for r in results),
            30,
            message="a submission after the restart",
        )
        wait_for(lambda: health and health[-1][1] == 200, 30, message="healthy again")
    finally:
        stop.set()
        for thread in threads:
            if thread.is_alive() or thread.ident is not None:
                thread.join(30)
        if not cluster.running():
            cluster.start()
    try:
        # Every submission succeeded, or failed with JobServiceUnavailable within its deadline.
        ok = [r for r in results if r[2] == 200]
        refused = [r for r in results if r[2] != 200]
        assert ok and refused, results
        for _, took, status, body in refused:
            assert status == 400 and body["error"] == "JobServiceUnavailable", body
            assert "the job store cannot be reached" in body["message"], body
            assert took < 3.0, (took, body)
        # One never stored says so (it waited in the job service up to 2.4 s).
        assert any("the job was not stored" in r[3]["message"] for r in refused), refused
        # ... and was not stored: the table holds exactly the jobs answered.
        ids = {r[3]["job"]["id"] for r in ok}
        maybe = sum("may or may not" in r[3]["message"] for r in refused)
        stored = {
            str(r[0])
            for r in rows(
                db_of(server), "select id from twistedlrp_job where name = ?", "testapp.jobs.add"
            )
        }
        assert ids <= stored and len(stored) - len(ids) <= maybe, (len(ids), len(stored), maybe)
        for job_id in ids:
            assert wait_job(server, job_id)["state"] == "succeeded"
        # The sleepers ended during the outage: recorded once it was back, not failed.
        for job_id in sleepers:
            info = wait_job(server, job_id)
            assert (info["state"], info["attempts"]) == ("succeeded", 1), info
        for i in range(2):
            assert len((marks / f"s{i}-started").read_text().splitlines()) == 1
        # Health: degraded during the outage (the reason says why), 200 before and after.
        degraded = [h for h in health if h[1] == 503]
        assert degraded, health
        for _, _status, body in degraded:
            assert body["status"] == "degraded", body
            assert "the job store cannot be reached" in body["jobs"]["reason"], body
        assert health[0][1] == 200 and health[-1][1] == 200, health
        output = server.output()
        assert output.count("The job store cannot be reached") == 1, output
        assert output.count("The job store can be reached again") == 1, output
        assert "Traceback" not in output and "#critical" not in output, output
    finally:
        server.kill()


def db_of(server):
    from pathlib import Path

    return Path(server.env["LRP_TEST_DB"])


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
        # Its health says so, and stays 200 (no --health-requires-jobs).
        health = request(web.port, "/-/health")
        assert health.status == 200, health.text
        link = health.json()["job_link"]
        assert (link["state"], link["node"]) == ("down", None), link
        assert "its socket does not exist" in link["nodes"][0]["error"]
        node = start_server(
            template,
            tmp_path / "node",
            "--jobs-only",
            f"--state-dir={state}",
            listen=False,
            wait=False,
        )
        wait_for(lambda: (state / "jobs.sock").exists(), 30, message="the job node's socket")
        # Back within the client's back-off (5 s at most) once the node listens.
        wait_for(
            lambda: request(web.port, "/-/health").json()["job_link"]["state"] == "up",
            30,
            message="the job link up",
        )
        job = api(web, "submit", name="testapp.jobs.add", args=[1, 2])["job"]
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


# -- malformed arguments, job ids, internal errors ---------------------------------


def _gated_job(server, marker_dir) -> str:
    """@return: the id of a job that runs until the file marker_dir/go-1 exists."""
    return api(server, "submit", name="testapp.jobs.gated_steps", args=[str(marker_dir), 1])["job"][
        "id"
    ]


def _amp_box(**values) -> bytes:
    data = b""
    for key, value in values.items():
        key = key.replace("__", ".").encode()
        value = value if isinstance(value, bytes) else str(value).encode()
        data += struct.pack("!H", len(key)) + key + struct.pack("!H", len(value)) + value
    return data + b"\x00\x00"


def test_malformed_amp_arguments_are_answered_invalid_arguments(server, tmp_path):
    job_id = _gated_job(server, tmp_path)
    submit = {"name": "testapp.jobs.add"}
    cases = [
        ("Submit", {**submit, "payload": b"1", "payload.0": b"[" * 30_000}, "nested too deeply"),
        ("Submit", {**submit, "payload": b"abc"}, "payload: cannot be read (expected a count"),
        ("Submit", {**submit, "payload": b"99999"}, "count of pieces from 1 to 2000"),
        ("Submit", {**submit, "payload": b"3", "payload.0": b"{}"}, "piece 1 of 3 is missing"),
        ("Submit", {"payload": b"1", "payload.0": b"{}"}, "name: missing"),
        ("Wait", {"job_id": job_id, "timeout": b"nan"}, "timeout: must be a finite number"),
        ("Wait", {"job_id": job_id, "timeout": b"inf"}, "timeout: must be a finite number"),
        ("Wait", {"job_id": job_id, "timeout": b"1e308"}, "a Wait waits from 0 to 3600 seconds"),
        ("Wait", {"job_id": job_id, "timeout": b"3600.5"}, "a Wait waits from 0 to 3600 seconds"),
        ("Wait", {"job_id": job_id, "timeout": b"-1"}, "a Wait waits from 0 to 3600 seconds"),
        ("Wait", {"job_id": job_id, "timeout": b"soon"}, "timeout: cannot be read"),
        ("Wait", {"job_id": job_id}, "timeout: missing"),
        ("Wait", {"job_id": job_id, "timeout": b"1", "seen": b"s" * 100}, "seen: expected"),
        ("ListJobs", {"limit": b"1000000000"}, "limit: expected a whole number from 0 to 1000"),
        ("ListJobs", {"limit": b"1001"}, "limit: expected a whole number from 0 to 1000"),
        ("ListJobs", {"limit": b"-1"}, "limit: expected a whole number from 0 to 1000"),
        ("ListJobs", {"limit": b"1e9"}, "limit: cannot be read"),
        ("ListJobs", {"limit": b"10", "state": b"done"}, "state: expected one of queued,"),
        ("Status", {"job_id": b"\xff\xfe"}, "job_id: cannot be read"),
        ("Cancel", {}, "job_id: missing"),
        ("Announce", {"job_ids": b"\x00\x02\xff\xfe"}, "job_ids: cannot be read"),
    ]
    client = _amp_login(server)
    try:
        for command, arguments, said in cases:
            answer = client.call(command, **arguments)
            assert answer.get(b"_error_code") == b"INVALID_ARGUMENTS", (command, arguments, answer)
            assert said.encode() in answer[b"_error_description"], (command, answer)
        # The connection is still usable, the job untouched.
        answer = client.call("Status", job_id=job_id)
        assert json.loads(answer[b"job.0"])["state"] in ("queued", "running"), answer
        assert json.loads(client.call("ListJobs", limit=1000)[b"jobs.0"])["jobs"]
        assert json.loads(client.call("ListJobs", limit=0)[b"jobs.0"]) == {"jobs": []}
    finally:
        client.close()
        (tmp_path / "go-1").touch()
    assert wait_job(server, job_id)["state"] == "succeeded"
    _no_internal_errors(server)
    assert "Traceback" not in server.output()


def test_boxes_that_are_not_commands_close_the_connection_without_a_traceback(server):
    for box in (_amp_box(x=b"y"), _amp_box(_answer=b"99"), _amp_box(_command=b"Stats")):
        sock = socket.create_connection(("127.0.0.1", server.amp_port), timeout=10)
        try:
            sock.sendall(box)
            assert sock.recv(65536) == b""  # closed, without an answer
        finally:
            sock.close()
    wait_for(
        lambda: "sent a box that is not a command: disconnected" in server.output(),
        10,
        message="the warning",
    )
    assert "Job client 127.0.0.1:" in server.output()
    assert "Traceback" not in server.output()


@pytest_twisted.ensureDeferred
async def test_malformed_pb_calls_are_answered_invalid_arguments(server, tmp_path):
    job_id = _gated_job(server, tmp_path)
    cases = [
        (("wait", job_id, float("nan")), "timeout: must be a finite number"),
        (("wait", job_id, 1e308), "a Wait waits from 0 to 3600 seconds"),
        (("wait", job_id, -1), "a Wait waits from 0 to 3600 seconds"),
        (("wait", job_id, "soon"), "timeout: expected a number"),
        (("wait",), "wait: missing a required argument: 'job_id'"),
        (("wait", job_id, 1, 2), "wait: too many positional arguments"),
        (("list_jobs", None, None, 10**9), "limit: expected a whole number from 0 to 1000"),
        (("list_jobs", None, None, -1), "limit: expected a whole number from 0 to 1000"),
        (("list_jobs", None, None, "ten"), "limit: expected a whole number from 0 to 1000"),
        (("list_jobs", "done"), "state: expected one of"),
        (("list_jobs", None, ["a"]), "name: expected a job name"),
        (("status", [1]), "job_id: expected a job id (a UUID), got [1]"),
        (("cancel", 12), "job_id: expected a job id (a UUID), got 12"),
        (("submit", "testapp.jobs.add", [1, 2], None, 10**30), "priority: must be between"),
        (("submit", "x" * 300, [1, 2]), "name: a job name has at most 255 characters"),
        (("nope",), "the job service has no operation 'nope'"),
    ]
    connection = Connection(server.pb_port)
    try:
        avatar = await connection.login(SECRET)
        for call, said in cases:
            failure = await _failure_of(avatar.callRemote(*call))
            assert failure.check("twistedlrp.jobs.pb.InvalidArgumentsError"), (call, failure)
            assert said in failure.getErrorMessage(), (call, failure.getErrorMessage())
        # Still usable.
        job = await avatar.callRemote("status", job_id)
        assert job["state"] in ("queued", "running")
        assert len(await avatar.callRemote("list_jobs", None, None, 1000)) >= 1
    finally:
        connection.close()
        (tmp_path / "go-1").touch()
    assert wait_job(server, job_id)["state"] == "succeeded"
    _no_internal_errors(server)
    assert "Traceback" not in server.output()


def _banana_string(value: bytes) -> bytes:
    return _b128(len(value)) + b"\x82" + value


def _b128(number: int) -> bytes:
    from twisted.spread import banana

    pieces = []
    banana.int2b128(number, pieces.append)
    return b"".join(pieces)


def _banana_list(*encoded: bytes) -> bytes:
    return _b128(len(encoded)) + b"\x80" + b"".join(encoded)


def test_pb_calls_that_cannot_be_read_before_login_are_refused_without_tracebacks(server):
    def login_call(*arguments: bytes) -> bytes:
        # ["message", request id, "root", "login", answer required, args, kwargs] (jelly)
        return _banana_list(
            _banana_string(b"message"),
            _b128(1) + b"\x81",
            _banana_string(b"root"),
            _banana_string(b"login"),
            _b128(1) + b"\x81",
            _banana_list(_banana_string(b"tuple"), *arguments),
            _banana_list(_banana_string(b"dictionary")),
        )

    deep = _b128(1) + b"\x81"
    for _ in range(450):  # a list in a list ...: jelly reads it recursively
        deep = _banana_list(_banana_string(b"list"), deep)
    messages = {
        "no user name": login_call(),
        "nested too deeply": login_call(deep),
        "not a list": _b128(7) + b"\x81",
    }
    for what, message in messages.items():
        assert len(message) < 4000, what
        sock = socket.create_connection(("127.0.0.1", server.pb_port), timeout=10)
        try:
            # The dialect ("none": no abbreviations), then the message.
            sock.sendall(_banana_string(b"none") + message)
            received = b""
            while chunk := sock.recv(65536):
                received += chunk
                if what != "not a list" and b"InvalidArgumentsError" in received:
                    break
            if what == "not a list":
                assert b"InvalidArgumentsError" not in received  # closed
            else:
                assert b"the call cannot be made" in received, (what, received)
        finally:
            sock.close()
    output = server.output()
    wait_for(
        lambda: "sent what Perspective Broker cannot read" in server.output(),
        10,
        message="the warning",
    )
    assert "made a call that cannot be made ('login': " in output
    assert "Traceback" not in server.output()


def test_job_ids_have_one_canonical_form(server, tmp_path):
    job_id = _gated_job(server, tmp_path)
    client = _amp_login(server)
    waiter = _amp_login(server)
    try:
        spellings = [job_id.upper(), job_id.replace("-", ""), "{" + job_id + "}", job_id]
        for spelling in spellings:
            answer = client.call("Status", job_id=spelling)
            assert json.loads(answer[b"job.0"])["id"] == job_id, (spelling, answer)
        assert api(server, "get", id=job_id.upper())["job"]["id"] == job_id
        # A Wait under another spelling is answered when the job ends, not at its timeout.
        started = time.monotonic()
        waiter.sock.sendall(_amp_box(_command="Wait", _ask="w", job_id=job_id.upper(), timeout=60))
        # A round trip on another connection: the Wait has been read by now.
        state = json.loads(client.call("Status", job_id=job_id)[b"job.0"])["state"]
        assert state in ("queued", "running")
        (tmp_path / "go-1").touch()
        answer = waiter.read_box()
        assert json.loads(answer[b"job.0"])["state"] == "succeeded", answer
        assert time.monotonic() - started < 30
        # A submission's chosen id, in capitals: stored and answered in the canonical form.
        chosen = str(uuid.uuid4())
        payload = {"payload": b"1", "payload.0": b'{"args":[1,2],"kwargs":{}}'}
        answer = client.call("Submit", name="testapp.jobs.add", id=chosen.upper(), **payload)
        assert json.loads(answer[b"job.0"])["id"] == chosen, answer
        again = api(server, "submit", name="testapp.jobs.add", args=[1, 2], id=chosen)["job"]
        assert again["id"] == chosen
        assert (
            rows(
                server.db,
                "select count(*) from twistedlrp_job where id = ?",
                stored_id(chosen),
            )[0][0]
            == 1
        )
        # Not a UUID at all: no job has it.
        answer = client.call("Status", job_id="no-such-job")
        assert answer[b"_error_code"] == b"UNKNOWN_JOB", answer
    finally:
        client.close()
        waiter.close()


@pytest.mark.skipif(bool(postgres()), reason="writes the SQLite store directly")
def test_an_internal_error_is_logged_once_per_cause_not_once_per_call(template, tmp_path):
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET)
    secret.chmod(0o600)
    amp_port = free_port()
    node = start_server(
        template,
        tmp_path / "node",
        "--jobs-listen",
        f"tcp:{amp_port}:interface=127.0.0.1",
        "--jobs-secret-file",
        str(secret),
        "--workers",
        "0",
    )
    try:
        node.amp_port = amp_port
        # A row the store cannot read (as a bug or a hand edit could leave): its
        # result is valid JSON, a number longer than Python converts to an int.
        broken = _insert_job(tmp_path / "node" / "db.sqlite3", state="succeeded", result="1" * 5000)
        client = _amp_login(node)
        try:
            for _ in range(20):
                answer = client.call("Status", job_id=broken)
                assert answer.get(b"_error_code") == b"JOB_ERROR", answer
                assert b"internal error in the job service" in answer[b"_error_description"]
            # The service is fine otherwise.
            assert b"stats" in client.call("Stats")
        finally:
            client.close()
        wait_for(
            lambda: "Job service operation status failed" in node.output(),
            10,
            message="the traceback",
        )
        output = node.output()
        assert output.count("Job service operation status failed") == 1, output
        assert output.count("Traceback") == 1, output
    finally:
        node.kill()
