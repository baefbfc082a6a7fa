"""
The job service across process boundaries: a server killed with SIGKILL
and restarted, a graceful stop with a job still running, a job node and a
web node talking over TCP with a shared secret, and refusals at start-up.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import signal
import time

import psutil
from jobsupport import (
    AMPClient,
    alive,
    api,
    read_pid,
    rows,
    start_server,
    wait_job,
)

from support import LRPProcess, free_port, port_open, request, run_to_exit, wait_for


def job_row(db, job_id):
    (row,) = rows(
        db,
        "select state, attempts, error from twistedlrp_job where id = ?",
        job_id.replace("-", ""),
    )
    return row


def test_kill_9_server_then_restart(template, tmp_path):
    home = tmp_path / "server"
    markers = tmp_path / "markers"
    markers.mkdir()
    server = start_server(template, home, "--workers", "2")
    try:
        retried = api(server, "submit", name="testapp.jobs.crash_with_retry", args=[str(markers)])
        victim = api(server, "submit", name="testapp.jobs.sleeper", args=[str(markers), 120, "v"])
        worker_pids = [
            read_pid(markers / "crash_with_retry-attempts"),
            read_pid(markers / "v-started"),
        ]
        queued = [
            api(server, "submit", name="testapp.jobs.record", args=[str(markers), n])["job"]["id"]
            for n in range(3)
        ]
        # Only the server's own pid: its workers must notice (end of file) and exit.
        os.kill(server.proc.pid, signal.SIGKILL)
        server.proc.wait(10)
        for pid in worker_pids:
            wait_for(lambda pid=pid: not alive(pid), 10, message=f"worker {pid} gone")
    finally:
        server.kill()

    restarted = start_server(template, home, "--workers", "2")
    try:
        for job_id in queued:
            assert wait_job(restarted, job_id)["state"] == "succeeded"
        info = wait_job(restarted, retried["job"]["id"])
        assert info["state"] == "succeeded", info
        assert info["attempts"] == 2
        info = wait_job(restarted, victim["job"]["id"])
        assert info["state"] == "failed"
        assert "worker died" in info["error"] and "job service stopped" in info["error"]
        for n in range(3):
            assert len((markers / f"run-{n}").read_text().splitlines()) == 1
    finally:
        restarted.kill()


def test_sigterm_puts_an_unfinished_job_back_in_the_queue(template, tmp_path):
    home = tmp_path / "server"
    markers = tmp_path / "markers"
    markers.mkdir()
    server = start_server(template, home, "--workers", "2", "--graceful-timeout", "2.5")
    db = home / "db.sqlite3"
    try:
        long = api(server, "submit", name="testapp.jobs.crash_without_retry", args=[str(markers)])
        short = api(server, "submit", name="testapp.jobs.sleeper", args=[str(markers), 1.0, "s"])
        job_id = long["job"]["id"]
        pid = read_pid(markers / "crash_without_retry-attempts")
        read_pid(markers / "s-started")
        waiting = api(server, "submit", name="testapp.jobs.record", args=[str(markers), "w"])
        started = time.monotonic()
        server.signal(signal.SIGTERM)
        code = server.wait_exit(15)
        took = time.monotonic() - started
    finally:
        server.kill()
    assert code == 0, server.output()
    assert took < 5, took
    assert not alive(pid)
    # The short job finished during the graceful stop; no new job started.
    assert job_row(db, short["job"]["id"])[0] == "succeeded"
    assert job_row(db, waiting["job"]["id"])[0] == "queued"
    assert not (markers / "run-w").exists()
    # The long one is back in the queue, its attempt not used up.
    state, attempts, error = job_row(db, job_id)
    assert (state, attempts) == ("queued", 0), (state, attempts, error)
    assert "shut-down" in error

    restarted = start_server(template, home, "--workers", "1")
    try:
        info = wait_job(restarted, job_id)
        assert info["state"] == "succeeded"
        assert info["attempts"] == 1
        assert wait_job(restarted, waiting["job"]["id"])["state"] == "succeeded"
    finally:
        restarted.kill()


def test_jobs_only_node_and_web_node_over_tcp_with_secret(template, tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("correct horse battery staple\n")
    secret.chmod(0o600)  # a secret file others can read is refused
    port = free_port()
    node = start_server(
        template,
        tmp_path / "node",
        "--jobs-only",
        "--workers",
        "2",
        "--jobs-listen",
        f"tcp:{port}:interface=127.0.0.1",
        "--jobs-secret-file",
        str(secret),
        listen=False,
        wait=False,
        # A job node serves no URLs: it must not need a URLconf.
        env={"LRP_TEST_NO_URLCONF": "1"},
    )
    web = None
    try:
        wait_for(lambda: port_open(port) or node.proc.poll() is not None, 30, message="job node")
        assert node.proc.poll() is None, node.output()
        web = start_server(
            template,
            tmp_path / "web",
            "--no-jobs",
            "--jobs-connect",
            f"tcp:host=127.0.0.1:port={port}",
            "--jobs-secret-file",
            str(secret),
        )
        body = api(web, "submit", name="testapp.jobs.whoami")
        info = api(web, "wait", id=body["job"]["id"], timeout=20)["job"]
        assert info["state"] == "succeeded"
        worker = info["result"]["pid"]
        assert psutil.Process(worker).ppid() == node.proc.pid
        assert body["pid"] == web.proc.pid
        # A job that submits a job reaches the node over TCP with the secret.
        body = api(web, "submit", name="testapp.jobs.submit_and_wait", args=[20, 22])
        info = api(web, "wait", id=body["job"]["id"], timeout=30)["job"]
        assert info["state"] == "succeeded", info["error"]
        assert info["result"]["result"] == 42
        # The web node runs no workers of its own.
        assert not [
            p for p in psutil.Process(web.proc.pid).children() if "child" in " ".join(p.cmdline())
        ]

        # Raw AMP, from outside: commands before Login are refused and disconnected.
        client = AMPClient("127.0.0.1", port)
        answer = client.call("Stats")
        assert answer[b"_error_code"] == b"AUTHENTICATION_FAILED"
        assert client.closed_by_server()
        client.close()
        # A wrong secret: refused and disconnected.
        client = AMPClient("127.0.0.1", port)
        nonce = client.call("Challenge")[b"nonce"]
        wrong = hmac.new(b"wrong", b"twistedlrp-jobs-login:" + nonce, hashlib.sha256).digest()
        answer = client.call("Login", digest=wrong)
        assert answer[b"_error_code"] == b"AUTHENTICATION_FAILED"
        assert client.closed_by_server()
        client.close()
        # The right one: in, and commands work.
        client = AMPClient("127.0.0.1", port)
        nonce = client.call("Challenge")[b"nonce"]
        right = hmac.new(
            b"correct horse battery staple", b"twistedlrp-jobs-login:" + nonce, hashlib.sha256
        ).digest()
        assert client.call("Login", digest=right)[b"ok"] == b"True"
        answer = client.call("Stats")
        count = int(answer[b"stats"])
        stats = json.loads(b"".join(answer[b"stats.%d" % i] for i in range(count)))
        assert stats["jobs"]["succeeded"] >= 1
        client.close()
    finally:
        node.kill()
        if web is not None:
            web.kill()


def test_tcp_listener_without_secret_refuses_to_start():
    code, output = run_to_exit("--jobs-listen", "tcp:0:interface=127.0.0.1")
    assert code != 0
    assert "requires --jobs-secret-file" in output


def test_unmigrated_store_says_to_migrate(tmp_path):
    server = LRPProcess(tmp=tmp_path)
    server.start(wait=False)
    try:
        # It serves, but says it is degraded: a load balancer looks elsewhere.
        wait_for(lambda: port_open(server.port), 30, message="the port")
        health = request(server.port, "/-/health")
        assert health.status == 503
        assert health.json()["status"] == "degraded"
        assert "manage.py migrate" in health.json()["jobs"]["reason"]
        error = api(server, "submit", expect_error=True, name="testapp.jobs.add", args=[1, 2])
        assert error["error"] == "JobServiceUnavailable"
        assert "manage.py migrate" in error["message"]
    finally:
        server.kill()


def test_workers_are_recycled_after_max_jobs(template, tmp_path):
    server = start_server(
        template, tmp_path / "server", "--workers", "1", "--max-jobs-per-worker", "2"
    )
    try:
        pids = []
        for _ in range(3):
            job = api(server, "submit", name="testapp.jobs.whoami")["job"]
            pids.append(api(server, "wait", id=job["id"])["job"]["result"]["pid"])
        assert pids[0] == pids[1] != pids[2]
        wait_for(lambda: not alive(pids[0]), 10, message="the recycled worker gone")
    finally:
        server.kill()
    # Every worker is above 1 MB: each is replaced after one job.
    server = start_server(
        template, tmp_path / "memory", "--workers", "1", "--max-worker-memory", "1"
    )
    try:
        pids = []
        for _ in range(2):
            job = api(server, "submit", name="testapp.jobs.whoami")["job"]
            pids.append(api(server, "wait", id=job["id"])["job"]["result"]["pid"])
        assert pids[0] != pids[1]
        assert "MB (limit 1 MB): replacing it" in server.output()
    finally:
        server.kill()


def test_workers_that_cannot_start_are_retried_with_back_off(template, tmp_path):
    server = start_server(
        template, tmp_path / "server", "--workers", "1", env={"LRP_TEST_WORKER_BOOT_FAIL": "1"}
    )
    try:
        wait_for(
            lambda: server.output().count("before it was ready; next attempt in") >= 3,
            20,
            message="three failed starts",
        )
        output = server.output()
        assert "this worker fails to start on purpose" in output
        assert "next attempt in 0.5 s" in output and "next attempt in 1.0 s" in output
        health = request(server.port, "/-/health").json()
        assert health["jobs"]["workers"] == 0
        # Soon (not at the first failed start: a worker being replaced is normal) the
        # health endpoint says no worker can take a job.
        degraded = wait_for(
            lambda: (r := request(server.port, "/-/health")).status == 503 and r.json(),
            15,
            message="health to turn 503",
        )
        assert degraded["status"] == "degraded"
        assert "no worker can take a job (0 of 1 usable" in degraded["jobs"]["reason"]
        # Jobs wait in the queue meanwhile; they are not lost or failed.
        job = api(server, "submit", name="testapp.jobs.add", args=[1, 2])["job"]
        assert api(server, "get", id=job["id"])["job"]["state"] == "queued"
    finally:
        server.kill()


def test_job_service_without_its_app_refuses_to_start(tmp_path):
    code, output = run_to_exit(env={"LRP_TEST_WITHOUT_JOBS_APP": "1"})
    assert code == 1
    assert "needs the app 'twistedlrp' in INSTALLED_APPS" in output
    assert "--no-jobs" in output
    # Without the job service, the same site starts.
    server = LRPProcess("--no-jobs", env={"LRP_TEST_WITHOUT_JOBS_APP": "1"}, tmp=tmp_path)
    try:
        server.start()
        assert server.get("/hello").status == 200
    finally:
        server.kill()


def test_no_job_service_to_reach_is_a_clear_error(tmp_path):
    server = LRPProcess("--no-jobs", env={"LRP_TEST_JOBS_TIMEOUT": "1"}, tmp=tmp_path)
    server.start()
    try:
        started = time.monotonic()
        error = api(server, "submit", expect_error=True, name="testapp.jobs.add", args=[1, 2])
        took = time.monotonic() - started
        assert error["error"] == "JobServiceUnavailable"
        # No socket, no service: said at once, not after the client's timeout.
        assert "could not be reached: its socket does not exist" in error["message"]
        assert "jobs.sock" in error["message"]
        assert took < 1
    finally:
        server.kill()
