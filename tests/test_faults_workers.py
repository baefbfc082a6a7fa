"""
Worker faults: jobs that start processes of their own (a timeout, a cancel
and a graceful stop end the job's whole process tree and free its worker's
slot), errors and results too large to send back, and a worker answer that
cannot be read. Real servers, except the last tests (the dispatcher with a
fake store, and the error text cut in the child).
"""

from __future__ import annotations

import os
import signal
import struct
import time

import psutil
import pytest
from jobsupport import (
    alive,
    api,
    read_tree,
    rows,
    start_server,
    wait_job,
)

from support import wait_for

MIB = 1024 * 1024


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


def test_huge_error_text_is_cut_and_the_server_stays_small(env):
    server, _ = env
    the_slot_works(server)
    before = psutil.Process(server.proc.pid).memory_info().rss
    job = api(server, "submit", name="testapp.jobs.huge_error", args=[140_000_000])["job"]
    info = wait_job(server, job["id"], timeout=60)
    after = psutil.Process(server.proc.pid).memory_info().rss
    assert info["state"] == "failed", info["state"]
    error = info["error"]
    assert len(error) <= 64 * 1024, len(error)
    assert error.startswith("ValueError: begin xxxx")
    assert "characters cut ...]" in error
    assert "x end" in error
    assert "Traceback (most recent call last)" in error
    assert after - before < 100 * MIB, (before, after)
    the_slot_works(server)


def test_a_result_just_over_the_payload_limit_fails_the_job(env):
    server, _ = env
    # big_result returns "x" * size, whose JSON takes size + 2 bytes.
    over = api(server, "submit", name="testapp.jobs.big_result", args=[MIB - 1])["job"]
    info = wait_job(server, over["id"], timeout=30)
    assert info["state"] == "failed", info["state"]
    assert "takes 1048577 bytes of JSON, more than the limit of 1048576 bytes" in info["error"]
    at = api(server, "submit", name="testapp.jobs.big_result", args=[MIB - 2])["job"]
    info = wait_job(server, at["id"], timeout=30)
    assert info["state"] == "succeeded", info["error"]
    assert len(info["result"]) == MIB - 2


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


# -- in the server's process: the dispatcher with a fake store -----------------------


class _FakeStore:
    closed = False

    def __init__(self):
        self.calls = []

    def run(self, operation, *args):
        from twisted.internet import defer

        self.calls.append((operation.__name__, args))
        return defer.succeed(None)

    def set_progress(self, *args):
        pass


class _FakeProcess:
    # Above the kernel's largest pid: no signal can reach a real process.
    pid = 2**22 + 4321

    def __init__(self):
        self.written = b""
        self.closed = []

    def writeToChild(self, fd, data):
        assert fd == 3
        self.written += data

    def closeChildFD(self, fd):
        self.closed.append(fd)

    def signalProcess(self, name):
        raise AssertionError(f"no signal expected, got {name}")


def _box(data: bytes) -> dict:
    box, at = {}, 0
    while True:
        (n,) = struct.unpack("!H", data[at : at + 2])
        key = data[at + 2 : at + 2 + n]
        at += 2 + n
        if not key:
            return box
        (m,) = struct.unpack("!H", data[at : at + 2])
        box[key] = data[at + 2 : at + 2 + m]
        at += 2 + m


def test_an_answer_that_cannot_be_read_fails_the_job_and_replaces_the_worker(monkeypatch):
    from twisted.internet.task import Clock
    from twisted.protocols import amp

    from twistedlrp.jobs.service.dispatch import Dispatcher
    from twistedlrp.jobs.service.queue import JobRecord
    from twistedlrp.jobs.states import FAILED
    from twistedlrp.jobs.workers.pool import Worker

    monkeypatch.setenv("DJANGO_SETTINGS_MODULE", "testsite.settings")
    store = _FakeStore()
    options = {
        "workers": 1,
        "pythonpath": [],
        "max-job-payload": MIB,
        "max-jobs-per-worker": 1000,
        "max-worker-memory": 0,
    }
    dispatcher = Dispatcher(Clock(), store, options, {}, 5.0)
    worker = Worker(dispatcher.pool)
    process = _FakeProcess()
    worker.makeConnection(process)
    dispatcher.pool.workers.append(worker)
    worker.became_ready()
    assert worker.state == "idle"

    record = JobRecord("job-1", name="testapp.jobs.add", attempts=1, max_attempts=1)
    dispatcher.run_on(worker, record, b'{"args":[1,2],"kwargs":{}}')
    assert _box(process.written)[b"_command"] == b"RunJob"
    # The child answers, but its outcome is not JSON.
    tag = _box(process.written)[b"_ask"]
    answer = amp.AmpBox({b"_answer": tag, b"outcome": b"1", b"outcome.0": b"{not json"})
    worker.childDataReceived(4, answer.serialize())

    assert "job-1" not in dispatcher.running
    ((name, (job_id, state, fields, _)),) = [c for c in store.calls if c[0] == "finish"]
    assert (job_id, state) == ("job-1", FAILED)
    assert "the worker's answer could not be read: JSONDecodeError" in fields["error"]
    # Replaced: it retires (its command pipe closed), and is never idle again.
    assert worker.broken and worker.state == "retiring"
    assert 3 in process.closed
    assert worker not in dispatcher.pool.idle()


def test_the_childs_error_text_is_bounded():
    from twistedlrp.jobs.workers.main import MAX_ERROR, cut_text, describe_error

    assert cut_text("short") == "short"
    cut = cut_text("a" * 100 + "b" * 100, 100)
    assert len(cut) <= 100 and cut.startswith("a") and cut.endswith("b")
    assert "[... 164 characters cut ...]" in cut

    def deep(n):
        if n == 0:
            raise RuntimeError("y" * 5_000_000)
        deep(n - 1)

    try:
        deep(50)
    except RuntimeError as e:
        text = describe_error(e)
    assert len(text) <= MAX_ERROR
    assert text.startswith("RuntimeError: yyyy")
    assert "characters cut" in text
    assert "in deep" in text
