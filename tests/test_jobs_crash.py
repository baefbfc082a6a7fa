"""
At most once across kill -9 (docs/jobs.md, "After a crash"): a job's start
is committed before its worker starts it, so after the server is killed
during heavy submission and restarted, no job without retries runs twice,
a job that ran to the end before the kill is not run again as if new, and
a retried job never runs more often than its recorded attempts. Each run is
counted by the job itself (testapp.jobs.counted_run appends a line to a file
when it starts and when it ends). Also on PostgreSQL.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import sqlite3
import threading
import time

from jobsupport import alive, api, rows, start_server

from support import pg_connect, postgres, wait_for

SUBMITTERS = 20
MOST_JOBS = 1200
# Each submitter pauses between submissions, so that the jobs keep coming
# while the server is killed (the workers run fewer jobs a second than this).
PAUSE = 0.05


def runs_by_tag(path) -> tuple[collections.Counter, set[int]]:
    """@return: the starts of each job tag, and the pids that ran them."""
    starts, pids = collections.Counter(), set()
    if path.exists():
        for line in path.read_text().splitlines():
            tag, what, pid = line.split()
            pids.add(int(pid))
            if what == "start":
                starts[tag] += 1
    return starts, pids


class WriteLockHolder(threading.Thread):
    """
    Holds the job table's write lock in bursts (another connection's
    transaction, as a site's view that writes for a while): the job store's
    commits wait meanwhile, which is when a job started before its claim
    committed would be lost to a crash.
    """

    def __init__(self, db, hold: float = 0.3, gap: float = 0.05):
        super().__init__(daemon=True)
        self.db, self.hold, self.gap = db, hold, gap
        self.stop = threading.Event()
        self.holding = threading.Event()
        self.rounds = 0

    def run(self):
        if postgres():
            con = pg_connect(self.db, autocommit=False)
            take = "LOCK TABLE twistedlrp_job IN EXCLUSIVE MODE"
        else:
            con = sqlite3.connect(self.db, timeout=20, isolation_level=None)
            take = "BEGIN IMMEDIATE"
        try:
            while not self.stop.is_set():
                con.execute(take)
                self.rounds += 1
                self.holding.set()
                self.stop.wait(self.hold)
                self.holding.clear()
                con.commit() if postgres() else con.execute("COMMIT")
                self.stop.wait(self.gap)
        finally:
            con.close()


def test_kill_9_during_heavy_submission_runs_no_job_twice(template, tmp_path):
    runs = tmp_path / "runs.log"
    home = tmp_path / "server"
    server = start_server(template, home, "--workers", "2")
    stop = threading.Event()
    counter = iter(range(MOST_JOBS))
    lock = threading.Lock()
    submitted = []

    def submitter():
        while not stop.is_set():
            with lock:
                n = next(counter, None)
            if n is None:
                return
            name = "testapp.jobs.counted_run" if n % 4 else "testapp.jobs.counted_run_retried"
            try:
                api(server, "submit", name=name, args=[str(runs), f"t{n}", 0.01])
            except Exception:
                return  # the server was killed under this request
            with lock:
                submitted.append(n)
            stop.wait(PAUSE)

    threads = [threading.Thread(target=submitter, daemon=True) for _ in range(SUBMITTERS)]
    locker = WriteLockHolder(server.env["LRP_TEST_DB"])
    try:
        for thread in threads:
            thread.start()
        wait_for(lambda: sum(runs_by_tag(runs)[0].values()) >= 150, 60, message="150 runs")
        locker.start()
        # Kill while submissions keep coming and the store waits for the lock:
        # once a few jobs started during this hold (their claims cannot have
        # committed), or a fifth of a second into it.
        hold = {"round": None}

        def mid_hold():
            if locker.rounds < 3 or not locker.holding.is_set():
                return False
            started = sum(runs_by_tag(runs)[0].values())
            if hold["round"] != locker.rounds:
                hold.update(round=locker.rounds, base=started, at=time.monotonic())
                return False
            return started - hold["base"] >= 3 or time.monotonic() - hold["at"] >= 0.2

        wait_for(mid_hold, 30, interval=0.01, message="a kill in the middle of a hold")
        with lock:
            assert len(submitted) < MOST_JOBS, "the submissions ended before the kill"
        os.kill(server.proc.pid, signal.SIGKILL)
        server.proc.wait(10)
        stop.set()
        for thread in threads:
            thread.join(30)
        # The workers see the server's end (end of file) and exit with their jobs.
        for pid in runs_by_tag(runs)[1]:
            wait_for(lambda pid=pid: not alive(pid), 10, message=f"worker {pid} gone")
    finally:
        stop.set()
        locker.stop.set()
        server.kill()
    locker.join(10)
    before, _ = runs_by_tag(runs)

    restarted = start_server(template, home, "--workers", "2")
    try:
        db = restarted.env["LRP_TEST_DB"]
        wait_for(
            lambda: (
                not rows(
                    db, "select 1 from twistedlrp_job where state in ('queued', 'running') limit 1"
                )
            ),
            120,
            message="every job finished after the restart",
        )
        jobs = rows(db, "select name, args, state, attempts, error from twistedlrp_job")
    finally:
        restarted.kill()
    starts, _ = runs_by_tag(runs)
    assert len(jobs) >= len(submitted) >= 150
    assert sum(starts.values()) > sum(before.values()), "nothing ran after the restart"
    stored = set()
    for name, args, state, attempts, error in jobs:
        tag = (json.loads(args) if isinstance(args, str) else args)[1]
        stored.add(tag)
        ran = starts[tag]
        where = f"{tag} ({name}): {state}, {attempts} attempt(s), {ran} run(s): {error[:300]}"
        assert state in ("succeeded", "failed"), where
        if name == "testapp.jobs.counted_run":
            # No retries: at most once, and exactly once if it succeeded.
            assert ran <= 1, where
            assert attempts == 1, where
            if state == "succeeded":
                assert ran == 1, where
            else:
                assert "job service stopped (crash or kill)" in error, where
        else:
            # Each run used an attempt of its own.
            assert ran <= attempts <= 2, where
            if state == "succeeded":
                assert ran >= 1, where
    # Every job that ran was stored.
    assert set(starts) <= stored
