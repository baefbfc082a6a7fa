"""
Replacement workers forked from the worker template
(L{twistedlrp.jobs.workers.preload}), in a real server: the template appears only
when a worker nears C{--max-jobs-per-worker}; successors are its children;
a forked worker killed mid-job, or whose job times out, is seen and
replaced like any other; killing the template leaves its workers and
their jobs running, and their ends are still seen; a template that cannot start, or
C{--no-worker-template}, leaves the pool spawning workers itself; threads
the template started are named in a warning; a stop leaves no process
behind.
"""

from __future__ import annotations

import os
import signal
import time

import psutil
import pytest
from jobsupport import (
    alive,
    api,
    read_pid,
    read_tree,
    start_server,
    wait_job,
)

from support import wait_for

# The smallest limit with a standby successor (workers.standby_ahead), and
# so with a template: started 10 jobs before it, the standby 5 before.
LIMIT = "100"


def run_whoami(server, count: int) -> list[int]:
    """Run C{count} jobs one after another; @return: the pid of each one's worker."""
    pids = []
    for _ in range(count):
        job = api(server, "submit", name="testapp.jobs.whoami")["job"]
        info = api(server, "wait", id=job["id"])["job"]
        assert info["state"] == "succeeded", info
        pids.append(info["result"]["pid"])
    return pids


def stats(server) -> dict:
    return api(server, "stats")["stats"]


def ready_template(server) -> int:
    """Wait until the server says its template is ready; @return: its pid."""

    def check():
        described = stats(server)["worker_template"]
        return described and described["state"] == "ready" and described["pid"]

    return wait_for(check, 30, interval=0.05, message="the worker template ready")


def idle_worker(server, parent: int, not_pids=()) -> int:
    """Wait for an idle worker that is a child of C{parent}; @return: its pid."""

    def check():
        for worker in stats(server)["workers"]:
            pid = worker["pid"]
            if worker["state"] != "idle" or pid is None or pid in not_pids:
                continue
            try:
                if psutil.Process(pid).ppid() == parent:
                    return pid
            except psutil.NoSuchProcess:
                continue
        return None

    return wait_for(check, 30, interval=0.05, message=f"an idle worker forked by {parent}")


def start_replacing(template, tmp, *args, workers: int = 1, env=None):
    """@return: a server whose workers are replaced after L{LIMIT} jobs."""
    return start_server(
        template, tmp, "--workers", str(workers), "--max-jobs-per-worker", LIMIT, *args, env=env
    )


def fork_one(server, jobs: int = int(LIMIT)) -> tuple[int, int]:
    """
    Run C{jobs} jobs, enough for the workers to be replaced.

    @return: the template's pid, and an idle worker it forked.
    """
    run_whoami(server, jobs)
    template_pid = ready_template(server)
    return template_pid, idle_worker(server, template_pid)


@pytest.fixture
def forked_env(template, tmp_path):
    """@return: a server, a marker directory, its template's pid and an idle forked worker."""
    server = start_replacing(template, tmp_path / "server")
    markers = tmp_path / "markers"
    markers.mkdir()
    try:
        yield (server, markers, *fork_one(server))
    finally:
        server.kill()


def python_children(pid: int) -> list[psutil.Process]:
    return [p for p in psutil.Process(pid).children() if p.status() != psutil.STATUS_ZOMBIE]


def test_successors_are_forked_from_a_template_started_near_the_limit(template, tmp_path):
    server = start_replacing(template, tmp_path / "server")
    try:
        # No template at start-up: the server costs no more process than before.
        assert stats(server)["worker_template"] is None
        assert len(python_children(server.proc.pid)) == 1
        first = run_whoami(server, int(LIMIT))
        assert set(first) == {first[0]}
        template_pid = ready_template(server)
        assert "--template" in psutil.Process(template_pid).cmdline()
        assert psutil.Process(template_pid).ppid() == server.proc.pid
        (second,) = run_whoami(server, 1)
        assert second != first[0]
        # The successor is the template's child, leads its own process
        # group (a job's process tree is killed with it), and the worker it
        # replaced is gone.
        assert psutil.Process(second).ppid() == template_pid
        assert os.getpgid(second) == second
        wait_for(lambda: not alive(first[0]), 10, message="the replaced worker gone")
        assert stats(server)["workers_forked"] >= 1
        assert "Worker template" in server.output() and "ready" in server.output()
        # It opens a database connection of its own (the template closed
        # its connections before forking).
        job = api(server, "submit", name="testapp.jobs.stored_jobs")["job"]
        info = api(server, "wait", id=job["id"])["job"]
        assert info["state"] == "succeeded", info
        assert info["result"]["pid"] == second and info["result"]["jobs"] > int(LIMIT)
        # Every replacement after it comes from the same template.
        third = run_whoami(server, int(LIMIT) - 1)
        assert set(third) == {second, third[-1]} and third[-1] != second
        assert psutil.Process(third[-1]).ppid() == template_pid
        assert stats(server)["worker_template"]["pid"] == template_pid
    finally:
        server.kill()


def test_a_forked_worker_that_is_killed_or_times_out_is_replaced(forked_env):
    server, markers, template_pid, forked = forked_env
    # SIGKILL mid-job: the template reaps it and says how it ended.
    job = api(server, "submit", name="testapp.jobs.crash_without_retry", args=[str(markers)])
    assert read_pid(markers / "crash_without_retry-attempts") == forked
    os.kill(forked, signal.SIGKILL)
    info = wait_job(server, job["job"]["id"])
    assert info["state"] == "failed", info
    assert "worker died" in info["error"] and "SIGKILL" in info["error"], info
    replacement = idle_worker(server, template_pid, not_pids={forked})
    # A timeout ends the forked worker's whole process tree.
    job = api(
        server,
        "submit",
        name="testapp.jobs.process_tree_timeout",
        args=[str(markers), "timeout"],
    )["job"]
    grandchild, worker = read_tree(markers / "timeout-tree")
    assert worker == replacement
    info = wait_job(server, job["id"], timeout=15)
    assert info["state"] == "failed" and "timed out" in info["error"], info
    wait_for(lambda: not alive(grandchild), 10, message="the job's subprocess gone")
    wait_for(lambda: not alive(worker), 10, message="the timed-out worker gone")
    after = idle_worker(server, template_pid, not_pids={forked, replacement})
    assert run_whoami(server, 1) == [after]


def test_a_killed_template_leaves_its_workers_and_their_jobs_running(forked_env):
    server, markers, template_pid, forked = forked_env
    job = api(server, "submit", name="testapp.jobs.sleeper", args=[str(markers), 1.5])["job"]
    assert read_pid(markers / "sleeper-started") == forked
    os.kill(template_pid, signal.SIGKILL)
    wait_for(
        lambda: "The worker template killed by signal 9 (SIGKILL)" in server.output(),
        10,
        message="the template's end logged",
    )
    # Its worker lives on: it finishes its job, then takes the next.
    info = wait_job(server, job["id"])
    assert (info["state"], info["result"]) == ("succeeded", "sleeper"), info
    assert alive(forked)
    assert run_whoami(server, 1) == [forked]
    assert stats(server)["worker_template"] is None
    # Nobody reaps it for the server now, but its end is seen (a pidfd)
    # and it is replaced by a worker the server starts itself.
    os.kill(forked, signal.SIGKILL)
    spawned = idle_worker(server, server.proc.pid, not_pids={forked})
    assert run_whoami(server, 1) == [spawned]
    assert "exited after the worker template ended (its exit status is unknown)" in (
        server.output()
    )
    # The next replacement starts a new template.
    run_whoami(server, int(LIMIT))
    assert ready_template(server) != template_pid


def test_without_a_template_workers_are_spawned(template, tmp_path):
    # A template that cannot start: said once, and the pool spawns workers.
    server = start_replacing(
        template, tmp_path / "broken", env={"LRP_TEST_TEMPLATE_BOOT_FAIL": "1"}
    )
    try:
        first = run_whoami(server, int(LIMIT))
        wait_for(
            lambda: "workers are started directly from now on" in server.output(),
            30,
            message="the template's failure logged",
        )
        assert "this worker template fails to start on purpose" in server.output()
        (second,) = run_whoami(server, 1)
        assert second != first[0]
        assert psutil.Process(second).ppid() == server.proc.pid
        assert stats(server)["worker_template"] is None
        assert stats(server)["workers_forked"] == 0
    finally:
        server.kill()
    # --no-worker-template: no template, ever.
    server = start_replacing(template, tmp_path / "off", "--no-worker-template")
    try:
        first = run_whoami(server, int(LIMIT) + 1)
        assert first[-1] != first[0]
        assert psutil.Process(first[-1]).ppid() == server.proc.pid
        described = stats(server)
        assert described["worker_template"] is None and described["workers_forked"] == 0
        assert "Worker template" not in server.output()
    finally:
        server.kill()


def test_a_thread_the_template_started_is_named_in_a_warning(template, tmp_path):
    server = start_replacing(template, tmp_path / "server", env={"LRP_TEST_TEMPLATE_THREAD": "1"})
    try:
        template_pid, forked = fork_one(server)
        wait_for(
            lambda: (
                "runs 1 thread(s) that setting Django up started (import-time-sender)"
                in server.output()
            ),
            10,
            message="the warning",
        )
        assert "--no-worker-template" in server.output()
        # The forked worker runs jobs all the same.
        assert run_whoami(server, 1) == [forked]
    finally:
        server.kill()


def test_a_stop_leaves_neither_template_nor_forked_workers(template, tmp_path):
    server = start_replacing(template, tmp_path / "server", workers=2)
    try:
        template_pid, forked = fork_one(server, 2 * int(LIMIT) + 2)
        workers = [w["pid"] for w in stats(server)["workers"] if w["pid"]]
        started = time.monotonic()
        server.signal(signal.SIGTERM)
        assert server.wait_exit(30) == 0
        assert time.monotonic() - started < 15
        for pid in [template_pid, forked, *workers]:
            wait_for(lambda pid=pid: not alive(pid), 10, message=f"process {pid} gone")
    finally:
        server.kill()
