"""
Worker faults: jobs that start processes of their own (a timeout, a cancel,
a graceful stop and a killed server end the job's whole process tree and
free its worker's slot). Real servers.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
from jobsupport import alive, api, make_template_db, read_pid, rows, start_server, wait_job

from support import wait_for


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    return make_template_db(tmp_path_factory.mktemp("faults-workers"))


@pytest.fixture(scope="module")
def env(template, tmp_path_factory):
    """One server with ONE worker: a lost slot would stop every later job."""
    base = tmp_path_factory.mktemp("faults-workers-server")
    markers = base / "markers"
    markers.mkdir()
    server = start_server(
        template, base / "server", "--workers", "1", env={"LRP_TEST_CANCEL_GRACE": "0.5"}
    )
    yield server, markers
    server.kill()


@pytest.fixture
def leftovers():
    """Pids the test saw (grandchildren, workers): killed at the end if still alive."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        if alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def read_tree(path) -> tuple[int, int]:
    """@return: (the job's subprocess, its worker), from a process_tree marker."""
    read_pid(path)
    grandchild, worker = path.read_text().split()[:2]
    return int(grandchild), int(worker)


def the_slot_works(server) -> None:
    job = api(server, "submit", name="testapp.jobs.add", args=[2, 3])["job"]
    info = wait_job(server, job["id"], timeout=30)
    assert (info["state"], info["result"]) == ("succeeded", 5), info


def test_timeout_ends_the_jobs_process_tree(env, leftovers):
    server, markers = env
    job = api(
        server, "submit", name="testapp.jobs.process_tree_timeout", args=[str(markers), "timeout"]
    )["job"]
    grandchild, worker = read_tree(markers / "timeout-tree")
    leftovers += [grandchild, worker]
    started = time.monotonic()
    info = wait_job(server, job["id"], timeout=10)
    assert info["state"] == "failed", info
    assert "timed out after 1 s" in info["error"]
    assert time.monotonic() - started < 4
    wait_for(lambda: not alive(grandchild), 5, message="the job's subprocess gone")
    wait_for(lambda: not alive(worker), 5, message="the timed-out worker gone")
    wait_for(
        lambda: f"worker {worker} killed: timeout after 1 s" in server.output(),
        5,
        message="the log line",
    )
    the_slot_works(server)


def test_cancel_ends_the_jobs_process_tree(env, leftovers):
    server, markers = env
    # Its subprocess ignores SIGTERM: only the group's SIGKILL ends it.
    job = api(
        server,
        "submit",
        name="testapp.jobs.process_tree",
        args=[str(markers), "cancel"],
        kwargs={"ignore_term": True},
    )["job"]
    grandchild, worker = read_tree(markers / "cancel-tree")
    leftovers += [grandchild, worker]
    started = time.monotonic()
    api(server, "cancel", id=job["id"])
    info = wait_job(server, job["id"], timeout=10)
    assert info["state"] == "cancelled", info
    assert time.monotonic() - started < 4
    wait_for(lambda: not alive(grandchild), 5, message="the job's subprocess gone")
    wait_for(lambda: not alive(worker), 5, message="the cancelled worker gone")
    wait_for(
        lambda: (
            f"worker {worker} killed: cancelled, did not stop within the grace period"
            in server.output()
        ),
        5,
        message="the log line",
    )
    the_slot_works(server)


def test_sigterm_ends_the_process_tree_and_requeues_without_an_attempt(template, tmp_path):
    home = tmp_path / "server"
    markers = tmp_path / "markers"
    markers.mkdir()
    db = home / "db.sqlite3"
    pids: list[int] = []
    server = start_server(template, home, "--workers", "1", "--graceful-timeout", "1")
    try:
        # retries=0: were the interruption an attempt, none would be left.
        job_id = api(server, "submit", name="testapp.jobs.process_tree", args=[str(markers), "t"])[
            "job"
        ]["id"]
        grandchild, worker = read_tree(markers / "t-tree")
        pids += [grandchild, worker]
        started = time.monotonic()
        server.signal(signal.SIGTERM)
        code = server.wait_exit(10)
        took = time.monotonic() - started
        assert code == 0, server.output()
        assert took < 1 + 1.5, took
        wait_for(lambda: not alive(grandchild), 5, message="the job's subprocess gone")
        wait_for(lambda: not alive(worker), 5, message="the worker gone")
        ((state, attempts, error),) = rows(
            db,
            "select state, attempts, error from twistedlrp_job where id = ?",
            job_id.replace("-", ""),
        )
        assert (state, attempts) == ("queued", 0), (state, attempts, error)
        assert "shut-down" in error
    finally:
        server.kill()
        for pid in pids:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)

    restarted = start_server(template, home, "--workers", "1")
    try:
        info = wait_job(restarted, job_id, timeout=30)
        assert (info["state"], info["attempts"], info["result"]) == ("succeeded", 1, "second run")
    finally:
        restarted.kill()


def test_a_killed_server_leaves_no_subprocess_of_a_job(template, tmp_path, leftovers):
    markers = tmp_path / "markers"
    markers.mkdir()
    server = start_server(template, tmp_path / "server", "--workers", "1")
    try:
        api(
            server,
            "submit",
            name="testapp.jobs.process_tree",
            args=[str(markers), "k"],
            kwargs={"ignore_term": True},
        )
        grandchild, worker = read_tree(markers / "k-tree")
        leftovers += [grandchild, worker]
        # The worker leads its own group: killing the server's group spares it...
        assert os.getpgid(worker) == worker != os.getpgid(server.proc.pid)
        assert os.getpgid(grandchild) == worker
        # ...so it must notice (end of file) and end its group itself.
        os.killpg(server.proc.pid, signal.SIGKILL)
        server.proc.wait(10)
        wait_for(lambda: not alive(worker), 5, message="the worker gone")
        wait_for(lambda: not alive(grandchild), 5, message="the job's subprocess gone")
    finally:
        server.kill()
