"""
Several job nodes on one database: on PostgreSQL they share the work
(SKIP LOCKED claims, LISTEN/NOTIFY) and take over the running jobs of a
node that died once its lease expired; on SQLite a second node is refused.

The PostgreSQL tests run with LRP_TEST_POSTGRES only; the SQLite one
without it.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from jobsupport import FINISHED, api, rows, shared_db

from support import LRPProcess, postgres, wait_for

LEASE = 3.0
needs_postgres = pytest.mark.skipif(
    not postgres(), reason="several job nodes need PostgreSQL (LRP_TEST_POSTGRES)"
)
needs_sqlite = pytest.mark.skipif(bool(postgres()), reason="the SQLite one-node check")


_started: list[LRPProcess] = []


@pytest.fixture(autouse=True)
def _no_node_outlives_its_test():
    """A test that fails half-way leaves no job node (and its workers) running."""
    yield
    while _started:
        _started.pop().kill()


def job_node(db: Path, tmp: Path, name: str | None, *args, wait=True, **env) -> LRPProcess:
    """Start a job node (--jobs-only) on the database C{db}, its state under C{tmp}."""
    extra = ["--node-name", name] if name else []
    if not any(a.startswith("--workers") for a in args):
        extra += ["--workers", "2"]  # the server's default (the tests' is 1)
    tmp.mkdir(parents=True, exist_ok=True)
    node = LRPProcess(
        "--jobs-only",
        *extra,
        *args,
        listen=False,
        tmp=tmp,
        env={
            "LRP_TEST_DB": str(db),
            "LRP_TEST_NO_URLCONF": "1",
            "LRP_JOBS_NODE_LEASE": str(LEASE),
            **env,
        },
    )
    _started.append(node)
    node.start(wait=False)
    if wait:
        wait_for(
            lambda: "Job service ready" in node.output() or node.proc.poll() is not None,
            30,
            message=f"job node {name}",
        )
        assert node.proc.poll() is None, node.output()
    return node


def web_node(db: Path, tmp: Path, job_node: LRPProcess) -> LRPProcess:
    tmp.mkdir(parents=True, exist_ok=True)
    web = LRPProcess(
        "--no-jobs",
        "--jobs-connect",
        f"unix:path={job_node.tmp / 'state' / 'jobs.sock'}",
        tmp=tmp,
        env={"LRP_TEST_DB": str(db)},
    )
    return web.start()


def jobs_by_id(db: Path, ids) -> dict[str, tuple]:
    """@return: {id: (state, node, attempts, error, name)} of the jobs C{ids}."""
    found = rows(db, "select id, state, node, attempts, error, name from twistedlrp_job")
    wanted = set(ids)
    return {str(r[0]): tuple(r[1:]) for r in found if str(r[0]) in wanted}


def wait_all_finished(db: Path, ids, timeout: float) -> dict[str, tuple]:
    def check():
        jobs = jobs_by_id(db, ids)
        return jobs if all(j[0] in FINISHED for j in jobs.values()) else None

    return wait_for(check, timeout, interval=0.1, message="every job finished")


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


@needs_postgres
def test_two_nodes_share_the_work_and_take_over_a_killed_nodes_jobs(template, tmp_path):
    db = shared_db(template, tmp_path)
    marks = tmp_path / "marks"
    marks.mkdir()
    a = job_node(db, tmp_path / "a", "node-a")
    b = job_node(db, tmp_path / "b", "node-b")
    web = web_node(db, tmp_path / "web", a)
    try:
        # Phase 1: 20 jobs submitted to node A; both nodes run some of them.
        first = []
        for i in range(6):
            args = [str(marks), 0.5, f"s1-{i}"]
            first.append(api(web, "submit", name="testapp.jobs.sleeper", args=args)["job"]["id"])
        for n in range(14):
            args = [str(marks), n]
            first.append(api(web, "submit", name="testapp.jobs.record", args=args)["job"]["id"])
        # Waiting through node A works for a job that runs on node B as well
        # (B's end reaches A by NOTIFY): each answer comes long before its timeout.
        for job_id in first[:6]:
            started = time.monotonic()
            info = api(web, "wait", id=job_id, timeout=15)["job"]
            assert info["state"] == "succeeded", info
            assert time.monotonic() - started < 10
        jobs = wait_all_finished(db, first, 30)
        assert {j[0] for j in jobs.values()} == {"succeeded"}, jobs
        nodes = {j[1] for j in jobs.values()}
        assert nodes == {"node-a", "node-b"}, jobs

        # Phase 2: 20 more; the 4 of highest priority hang on their first
        # attempt (retries=1): node A's time out after 8 s and are retried,
        # node B's are running there when B is killed with SIGKILL.
        hanging = []
        for i in range(4):
            directory = marks / f"crash-{i}"
            directory.mkdir()
            body = api(
                web,
                "submit",
                name="testapp.jobs.crash_with_retry",
                args=[str(directory)],
                priority=10,
                timeout=8,
            )
            hanging.append(body["job"]["id"])
        second = []
        for i in range(4):
            args = [str(marks), 1, f"s2-{i}"]
            second.append(api(web, "submit", name="testapp.jobs.sleeper", args=args)["job"]["id"])
        for n in range(14, 26):
            args = [str(marks), n]
            second.append(api(web, "submit", name="testapp.jobs.record", args=args)["job"]["id"])

        def running_on_b():
            jobs = jobs_by_id(db, hanging)
            on_b = [i for i, j in jobs.items() if j[0] == "running" and j[1] == "node-b"]
            return on_b if len(on_b) == 2 else None

        on_b = wait_for(running_on_b, 20, interval=0.05, message="2 hanging jobs on node B")
        os.kill(b.proc.pid, signal.SIGKILL)  # the node alone: its workers see it die
        b.proc.wait(10)
        killed = time.monotonic()
        # Within the lease nobody touches B's jobs.
        time.sleep(1.0)
        jobs = jobs_by_id(db, on_b)
        assert all(j[:2] == ("running", "node-b") for j in jobs.values()), jobs

        everything = first + hanging + second
        jobs = wait_all_finished(db, everything, 60)
        assert time.monotonic() - killed >= LEASE - 1.0
        output = a.output()
        for job_id in hanging:
            state, node, attempts, error, _ = jobs[job_id]
            # Retried by their policy (one retry), each ran twice, the second time on A.
            assert (state, node, attempts) == ("succeeded", "node-a", 2), jobs[job_id]
        for job_id in on_b:
            assert f"Job {job_id}: retried (the worker died: the job node node-b " in output
        assert "Job node node-b: no heartbeat for" in output
        for i in range(4):
            assert len(lines(marks / f"crash-{i}" / "crash_with_retry-attempts")) == 2
        for job_id in second:
            state, node, attempts, error, name = jobs[job_id]
            assert (state, node, attempts) == ("succeeded", "node-a", 1), jobs[job_id]
        # Every record and sleeper job ran exactly once.
        for n in range(26):
            assert len(lines(marks / f"run-{n}")) == 1, n
        for name in [f"s1-{i}" for i in range(6)] + [f"s2-{i}" for i in range(4)]:
            assert len(lines(marks / f"{name}-started")) == 1, name
            assert len(lines(marks / f"{name}-done")) == 1, name
        # The dead node's row is gone; the live one's stays.
        names = {r[0] for r in rows(db, "select name from twistedlrp_node")}
        assert names == {"node-a"}
        assert "Traceback" not in output, output
    finally:
        for server in (web, a, b):
            server.kill()


@needs_postgres
def test_a_node_runs_only_its_queues_and_jobs_submitted_to_one_run_on_another(template, tmp_path):
    db = shared_db(template, tmp_path)
    marks = tmp_path / "marks"
    marks.mkdir()
    a = job_node(db, tmp_path / "a", "only-reports", "--queues", "reports")
    web = web_node(db, tmp_path / "web", a)
    b = None
    try:
        job_id = api(web, "submit", name="testapp.jobs.record", args=[str(marks), 1])["job"]["id"]
        time.sleep(1.5)
        assert jobs_by_id(db, [job_id])[job_id][0] == "queued"
        # A node of every queue runs it at once, woken by the NOTIFY of the submission.
        b = job_node(db, tmp_path / "b", None)
        jobs = wait_all_finished(db, [job_id], 15)
        state, node, *_ = jobs[job_id]
        assert state == "succeeded"
        assert node == f"{os.uname().nodename}:{tmp_path / 'b' / 'state'}"
        assert len(lines(marks / "run-1")) == 1
        assert "queues: reports" in a.output()
        # Through node A, a job running on node B: its progress, its cancel.
        body = api(web, "submit", name="testapp.jobs.steps", args=[200, 0.05])
        job_id = body["job"]["id"]
        wait_for(
            lambda: api(web, "get", id=job_id)["job"]["progress"][0] >= 2,
            15,
            message="progress of a job on node B, read through node A",
        )
        body = api(web, "submit", name="testapp.jobs.cooperative", args=[str(marks)])
        job_id = body["job"]["id"]
        wait_for(lambda: lines(marks / "cooperative"), 15, message="the job running on B")
        api(web, "cancel", id=job_id)
        info = api(web, "wait", id=job_id, timeout=10)["job"]
        assert info["state"] == "cancelled", info
        assert len(lines(marks / "cooperative-stopped")) == 1
        assert jobs_by_id(db, [job_id])[job_id][1] == node
    finally:
        for server in (web, a, b):
            if server is not None:
                server.kill()


@needs_postgres
def test_a_node_stopping_gracefully_hands_its_running_job_to_another_at_once(template, tmp_path):
    db = shared_db(template, tmp_path)
    marks = tmp_path / "marks"
    marks.mkdir()
    # A long lease: the hand-over must not wait for it.
    lease = {"LRP_JOBS_NODE_LEASE": "60"}
    b = job_node(db, tmp_path / "b", "node-b", "--graceful-timeout", "1", **lease)
    web = web_node(db, tmp_path / "web", b)
    a = None
    try:
        # Long enough to outlast node A's start-up and B's graceful timeout.
        body = api(web, "submit", name="testapp.jobs.sleeper", args=[str(marks), 8, "g"])
        job_id = body["job"]["id"]
        wait_for(lambda: lines(marks / "g-started"), 15, message="the job running on B")
        a = job_node(db, tmp_path / "a", "node-a", **lease)
        b.signal(signal.SIGTERM)
        assert b.wait_exit(15) == 0, b.output()
        jobs = wait_all_finished(db, [job_id], 30)
        state, node, attempts, *_ = jobs[job_id]
        # Put back without using up an attempt, and run to its end by A.
        assert (state, node, attempts) == ("succeeded", "node-a", 1), jobs
        assert len(lines(marks / "g-started")) == 2
        assert len(lines(marks / "g-done")) == 1
        names = {r[0] for r in rows(db, "select name from twistedlrp_node")}
        assert names == {"node-a"}
    finally:
        for server in (web, a, b):
            if server is not None:
                server.kill()


@needs_sqlite
def test_a_second_job_node_on_sqlite_is_refused_with_one_line(template, tmp_path):
    db = shared_db(template, tmp_path)
    a = job_node(db, tmp_path / "a", "first")
    try:
        b = job_node(db, tmp_path / "b", "second", wait=False)
        code = b.proc.wait(30)
        output = b.output()
        b.kill()
        assert code == 1, output
        (line,) = [x for x in output.splitlines() if x.startswith("twistd lrp: error:")]
        assert "another job node, first (pid " in line
        assert "SQLite" in line and "use PostgreSQL to run several job nodes" in line
        assert a.proc.poll() is None
        # Once the first node stopped (gracefully, or killed: its pid is gone), a second starts.
        a.stop()
        b = job_node(db, tmp_path / "b", "second")
        os.kill(b.proc.pid, signal.SIGKILL)
        b.proc.wait(10)
        c = job_node(db, tmp_path / "c", "third")
        c.stop()
    finally:
        a.kill()


@needs_postgres
def test_a_web_node_submits_in_a_transaction_with_no_job_node_up(template, tmp_path):
    # The job node it names is down; a job submitted inside a transaction
    # needs none: it is stored with the view's commit, and a job node that
    # starts later runs it.
    import json

    from support import request

    db = shared_db(template, tmp_path)
    (tmp_path / "web").mkdir()
    web = LRPProcess(
        "--no-jobs",
        "--jobs-connect",
        f"unix:path={tmp_path / 'nowhere' / 'jobs.sock'}",
        tmp=tmp_path / "web",
        env={"LRP_TEST_DB": str(db)},
    ).start()
    try:
        response = request(
            web.port, "/txn/api", method="POST", body=json.dumps({"text": "no node"}).encode()
        )
        assert response.status == 200, response.text
        job = response.json()["job"]
        assert job["state"] == "queued" and job["elapsed"] < 0.5, job
        node = job_node(db, tmp_path / "node", "late")
        try:
            jobs = wait_all_finished(db, [job["id"]], 30)
            assert jobs[job["id"]][0] == "succeeded", jobs
            assert jobs[job["id"]][1] == "late"
        finally:
            node.kill()
    finally:
        web.kill()


def enter_node(db: Path, name: str, pid: int) -> None:
    """Write a node row as a node on this machine with C{pid} would have, just now."""
    from datetime import UTC, datetime

    host = os.uname().nodename
    now = datetime.now(UTC)
    sql = (
        "INSERT INTO twistedlrp_node (name, host, pid, queues, started_at, heartbeat_at) "
        "VALUES (?, ?, ?, '', ?, ?)"
    )
    if postgres():
        from support import pg_connect

        with pg_connect(db) as con:
            con.execute(sql.replace("?", "%s"), (name, host, pid, now, now))
    else:
        import sqlite3

        con = sqlite3.connect(db, timeout=20)
        stamp = now.strftime("%Y-%m-%d %H:%M:%S.%f")
        with con:
            con.execute(sql, (name, host, pid, stamp, stamp))
        con.close()


def test_a_node_name_held_by_a_dead_or_foreign_pid_does_not_block_a_start(template, tmp_path):
    import subprocess

    db = shared_db(template, tmp_path)
    # A pid that now belongs to another program (not a job node)...
    foreign = subprocess.Popen(["sleep", "60"])
    # ... and one killed whose parent has not reaped it yet (a zombie), as
    # right after a kill -9 under a supervisor that has not waited for it.
    zombie = subprocess.Popen(["sleep", "60"])
    os.kill(zombie.pid, signal.SIGKILL)
    wait_for(
        lambda: Path(f"/proc/{zombie.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z",
        10,
        message="a zombie",
    )
    try:
        enter_node(db, "held-by-sleep", foreign.pid)
        enter_node(db, "held-by-zombie", zombie.pid)
        for name in ("held-by-sleep", "held-by-zombie"):
            node = job_node(db, tmp_path / name, name)
            assert "Job node " + name in node.output()
            node.stop()
    finally:
        foreign.kill()
        foreign.wait()
        zombie.wait()


def runs_of(path: Path) -> list[dict]:
    """
    @return: the runs a ticker job's marker file records, in order: each
        C{{"pid", "start", "last"(its last line's time), "done"(bool)}}.
    """
    runs: dict[int, dict] = {}
    for line in lines(path):
        what, pid, stamp = line.split()
        run = runs.setdefault(int(pid), {"pid": int(pid), "start": float(stamp), "done": False})
        run["last"] = float(stamp)
        run["done"] = run["done"] or what == "done"
    return sorted(runs.values(), key=lambda run: run["start"])


def submit_tickers(web, marks: Path, names, seconds: float) -> dict[str, str]:
    """@return: {name: job id} of ticker jobs submitted through C{web}."""
    return {
        name: api(web, "submit", name="testapp.jobs.ticker", args=[str(marks), name, seconds])[
            "job"
        ]["id"]
        for name in names
    }


def running_on(db: Path, ids, node: str) -> bool:
    jobs = jobs_by_id(db, ids)
    return len(jobs) == len(ids) and all(j[:2] == ("running", node) for j in jobs.values())


@needs_postgres
def test_a_node_cut_off_from_the_database_stops_its_jobs_before_another_runs_them(
    template, tmp_path
):
    from support import PausableProxy

    db = shared_db(template, tmp_path)
    marks = tmp_path / "marks"
    marks.mkdir()
    # Lease 4 s: renewed every second; a node that cannot renew it stops its
    # jobs 3 s after its last renewal, the others take it for dead after 4 s.
    lease = {"LRP_JOBS_NODE_LEASE": "4"}
    proxy = PausableProxy()
    a = job_node(
        db, tmp_path / "a", "node-a", "--workers", "2", LRP_TEST_POSTGRES=proxy.conninfo, **lease
    )
    web = web_node(db, tmp_path / "web", a)
    b = None
    try:
        # 1. A cut shorter than the lease less the margin stops nothing: the
        #    jobs run once, on their first attempt, and nothing is logged.
        short = submit_tickers(web, marks, ["short-1", "short-2"], 4)
        wait_for(lambda: running_on(db, short.values(), "node-a"), 20, message="A runs them")
        proxy.pause()
        time.sleep(1.5)  # the cut
        proxy.resume()
        jobs = wait_all_finished(db, short.values(), 30)
        assert {j[:3] for j in jobs.values()} == {("succeeded", "node-a", 1)}, jobs
        for name in short:
            assert [run["done"] for run in runs_of(marks / name)] == [True], name
        assert "stopping its" not in a.output()

        # 2. Alone, cut off for longer than the lease: A stops its jobs before
        #    the lease runs out and, back, retries them itself (they were not
        #    taken over by anyone), recording nothing else for the killed runs.
        alone = submit_tickers(web, marks, ["alone-1", "alone-2"], 3)
        wait_for(lambda: running_on(db, alone.values(), "node-a"), 20, message="A runs them")
        cut = time.time()
        proxy.pause()
        wait_for(lambda: "stopping its 2 running job(s)" in a.output(), 15, message="the fence")
        time.sleep(max(0.0, cut + 6 - time.time()))  # a cut of 6 s, longer than the lease
        proxy.resume()
        jobs = wait_all_finished(db, alone.values(), 40)
        for name, job_id in alone.items():
            state, node, attempts, error, _ = jobs[job_id]
            assert (state, node, attempts) == ("succeeded", "node-a", 2), jobs[job_id]
            first, second = runs_of(marks / name)
            # The first run was stopped within the lease (3 s after the last
            # renewal, itself within a second before the cut).
            assert not first["done"] and second["done"], name
            assert first["last"] < cut + 4.0, (name, first["last"] - cut)
        output = a.output()
        assert "renewed its lease again: it takes work again" in output
        assert "could not renew its lease for" in output

        # 3. With another node: A's jobs are stopped on A before B retries
        #    them; every job runs to its end once, and no two runs overlap.
        taken = submit_tickers(web, marks, ["a-1", "a-2"], 12)
        wait_for(lambda: running_on(db, taken.values(), "node-a"), 20, message="A runs them")
        b = job_node(db, tmp_path / "b", "node-b", "--workers", "2", **lease)
        # A's workers are busy: these go to B.
        on_b = submit_tickers(web, marks, ["b-1", "b-2"], 3)
        wait_for(lambda: running_on(db, on_b.values(), "node-b"), 20, message="B runs its jobs")
        cut = time.time()
        proxy.pause()
        wait_for(
            lambda: all(len(runs_of(marks / name)) == 2 for name in taken),
            30,
            message="B runs A's jobs again",
        )
        time.sleep(max(0.0, cut + 8 - time.time()))  # a cut of 8 s
        proxy.resume()
        everything = {**on_b, **taken}
        jobs = wait_all_finished(db, everything.values(), 60)
        assert {j[0] for j in jobs.values()} == {"succeeded"}, jobs
        for name in on_b:
            assert [run["done"] for run in runs_of(marks / name)] == [True], name
        for name, job_id in taken.items():
            first, second = runs_of(marks / name)
            assert not first["done"] and second["done"], name
            # A's run had ended (its last line) before B's began: never both at once.
            assert first["last"] < second["start"], (name, first, second)
            assert jobs[job_id][:3] == ("succeeded", "node-b", 2), jobs[job_id]
        assert "Job node node-a: no heartbeat for" in b.output()
        wait_for(lambda: a.output().count("renewed its lease again") == 2, 20, message="A back")
        for server in (a, b):
            assert "Traceback" not in server.output(), server.output()
    finally:
        for server in (web, a, b):
            if server is not None:
                server.kill()
        proxy.close()
