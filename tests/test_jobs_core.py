"""
The job service against one real server (reused across the tests of this
module): submission from views, progress, results, concurrency, worker
crashes, timeouts, cancellation, refusals and large payloads.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime

import pytest
from jobsupport import (
    alive,
    api,
    count_jobs,
    job_state,
    make_template_db,
    read_pid,
    rows,
    start_server,
    stored_id,
    wait_job,
)

from support import TESTSITE, postgres, request, wait_for


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = tmp_path_factory.mktemp("jobs-core")
    template = make_template_db(base)
    markers = base / "markers"
    markers.mkdir()
    # Every pool thread may wait on the job service: 20 clients submitting at
    # once to a loaded machine would otherwise meet the --job-threads share
    # (half the pool), which refuses calls beyond it by design.
    server = start_server(
        template,
        base / "server",
        "--workers",
        "2",
        "--job-threads",
        "8",
        env={"LRP_TEST_CANCEL_GRACE": "0.5"},
    )
    yield server, markers
    server.kill()
    if os.environ.get("LRP_TEST_SHOW_LOG"):
        sys.stdout.write(server.output() + "\n")


def workers(server) -> list[dict]:
    return api(server, "stats")["stats"]["workers"]


def test_view_submits_fast_job_runs_elsewhere_with_progress_and_result(env):
    server, markers = env
    marker = markers / "progress"
    marker.mkdir()
    started = time.perf_counter()
    body = api(server, "submit", name="testapp.jobs.steps", args=[20, 0.05, str(marker)])
    round_trip = time.perf_counter() - started
    sys.stdout.write(
        f"submit: view {body['elapsed'] * 1000:.1f} ms, "
        f"HTTP round trip {round_trip * 1000:.1f} ms\n"
    )
    assert body["elapsed"] < 1.0
    job = body["job"]
    assert job["state"] == "queued"

    def progressing():
        info = job_state(server, job["id"])
        return info if info["state"] == "running" and info["progress"][0] > 0 else None

    info = wait_for(progressing, 20, interval=0.02, message="progress while running")
    assert info["progress"][1] == 20
    assert info["progress"][2].startswith("step ")
    final = api(server, "wait", id=job["id"], timeout=20)["job"]
    assert final["state"] == "succeeded", final
    assert final["result"]["steps"] == 20
    assert final["result"]["pid"] != body["pid"]
    assert final["progress"] == [20, 20, "step 20"]
    assert "step 20 of 20" in final["output"]
    assert final["attempts"] == 1


def test_submit_through_job_decorator(env):
    server, _ = env
    job = api(server, "add", a=2, b=3)["job"]
    assert api(server, "wait", id=job["id"])["job"]["result"] == 5


def test_a_job_that_submits_a_job_reaches_the_service_of_its_worker(env):
    # The server runs with --state-dir: the workers must be told the
    # service's socket, not look for ./.lrp/jobs.sock.
    server, _ = env
    for _ in range(2):  # both first workers
        job = api(server, "submit", name="testapp.jobs.submit_and_wait", args=[2, 3])["job"]
        info = api(server, "wait", id=job["id"], timeout=30)["job"]
        assert info["state"] == "succeeded", info["error"]
        assert info["result"]["result"] == 5
        child = api(server, "get", id=info["result"]["child"])["job"]
        assert (child["name"], child["state"]) == ("testapp.jobs.add", "succeeded")


def test_500_jobs_from_20_threads_run_exactly_once(env):
    server, markers = env
    marker = markers / "many"
    marker.mkdir()
    ids, errors = [], []
    lock = threading.Lock()

    def submit(numbers):
        for n in numbers:
            try:
                job = api(server, "submit", name="testapp.jobs.record", args=[str(marker), n])
                with lock:
                    ids.append(job["job"]["id"])
            except Exception as e:  # noqa: BLE001 - collected and asserted below
                errors.append(e)

    started = time.perf_counter()
    threads = [threading.Thread(target=submit, args=(range(i, 500, 20),)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    submitted = time.perf_counter() - started
    assert not errors
    assert len(set(ids)) == 500
    db = server.tmp / "db.sqlite3"

    def all_done():
        return (
            rows(
                db,
                "select count(*) from twistedlrp_job where name='testapp.jobs.record' "
                "and state in ('succeeded','failed','cancelled')",
            )[0][0]
            == 500
        )

    wait_for(all_done, 120, interval=0.1, message="500 jobs finished")
    done = time.perf_counter() - started
    sys.stdout.write(
        f"500 jobs: submitted in {submitted:.2f} s, all done after {done:.2f} s" + "\n"
    )
    states = rows(
        db, "select state, count(*) from twistedlrp_job where name='testapp.jobs.record' group by 1"
    )
    assert states == [("succeeded", 500)]
    for n in range(500):
        lines = (marker / f"run-{n}").read_text().splitlines()
        assert len(lines) == 1, (n, lines)


def test_kill_9_worker_mid_job(env):
    server, markers = env
    marker = markers / "crash"
    marker.mkdir()
    retried = api(server, "submit", name="testapp.jobs.crash_with_retry", args=[str(marker)])
    pid = read_pid(marker / "crash_with_retry-attempts")
    os.kill(pid, signal.SIGKILL)
    info = wait_job(server, retried["job"]["id"])
    assert info["state"] == "succeeded", info
    assert info["result"] == "second attempt succeeded"
    assert info["attempts"] == 2

    plain = api(server, "submit", name="testapp.jobs.crash_without_retry", args=[str(marker)])
    pid2 = read_pid(marker / "crash_without_retry-attempts")
    os.kill(pid2, signal.SIGKILL)
    info = wait_job(server, plain["job"]["id"])
    assert info["state"] == "failed"
    assert "worker died" in info["error"]
    assert "SIGKILL" in info["error"]

    def replaced():
        current = workers(server)
        pids = {w["pid"] for w in current}
        ready = [w for w in current if w["state"] in ("idle", "busy")]
        return len(ready) == 2 and pid not in pids and pid2 not in pids

    wait_for(replaced, 20, message="two live workers replacing the killed ones")


def test_timeout_kills_the_process(env):
    server, markers = env
    marker = markers / "timeout"
    marker.mkdir()
    job = api(server, "submit", name="testapp.jobs.too_slow", args=[str(marker)])["job"]
    pid = read_pid(marker / "too_slow")
    info = wait_job(server, job["id"], timeout=20)
    assert info["state"] == "failed"
    assert "timed out after 1.5 s" in info["error"]
    wait_for(lambda: not alive(pid), 10, message="the timed-out worker gone")


def _hold_workers(server, marker, count: int = 2):
    """
    Keep C{count} workers busy, each with a job that runs until released.

    @return: the jobs, and a function that releases them.
    """
    gates = [marker / f"held{i}" for i in range(count)]
    jobs = []
    for gate in gates:
        gate.mkdir()
        jobs.append(
            api(server, "submit", name="testapp.jobs.gated_steps", args=[str(gate), 1])["job"]
        )
    for gate in gates:
        read_pid(gate / "gated-started")

    def release():
        for gate in gates:
            (gate / "go-1").touch()

    return jobs, release


def test_cancel_queued_job_never_runs(env):
    server, markers = env
    marker = markers / "cancel-queued"
    marker.mkdir()
    # Both workers busy until the test lets them go (a job that sleeps a
    # fixed time may end, on a loaded machine, before the cancel arrives).
    busy, release = _hold_workers(server, marker)
    queued = api(server, "submit", name="testapp.jobs.record", args=[str(marker), "never"])["job"]
    info = api(server, "cancel", id=queued["id"])["job"]
    assert info["state"] == "cancelled"
    release()
    for job in busy:
        assert wait_job(server, job["id"])["state"] == "succeeded"
    after = api(server, "submit", name="testapp.jobs.add", args=[1, 1])["job"]
    assert wait_job(server, after["id"])["state"] == "succeeded"
    assert job_state(server, queued["id"])["state"] == "cancelled"
    assert not (marker / "run-never").exists()


def test_a_job_for_a_free_worker_is_stored_running_with_its_submission(env):
    server, markers = env
    db = server.tmp / "db.sqlite3"
    for round_ in range(3):
        marker = markers / f"stored-running-{round_}"
        marker.mkdir()
        wait_for(
            lambda: all(w["state"] == "idle" for w in workers(server)), 30, message="idle workers"
        )
        jobs = [
            api(server, "submit", name="testapp.jobs.sleeper", args=[str(marker), 1.0, name])["job"]
            for name in ("first", "second")
        ]
        # No worker is free now: the next job is queued as before, and runs after.
        third = api(server, "submit", name="testapp.jobs.record", args=[str(marker), "third"])[
            "job"
        ]
        for each in (*jobs, third):
            done = wait_job(server, each["id"])
            assert done["state"] == "succeeded" and done["attempts"] == 1, done
        assert len((marker / "run-third").read_text().splitlines()) == 1
        if all(job["state"] == "running" for job in jobs) or not postgres():
            break
        # PostgreSQL: the slow poll's claim (every 5 s) was in flight, so the
        # table might have held due jobs, and a job was queued as before.
    first, second = jobs
    # One commit stored each and gave it a worker: the answer says so before
    # the job has even begun (and the row, read back now, agrees).
    for job in jobs:
        assert job["state"] == "running" and job["attempts"] == 1 and job["worker"], job
        assert job["started_at"] == job["created_at"]
    assert first["worker"] != second["worker"]
    assert third["state"] == "queued" and third["attempts"] == 0 and not third["worker"], third
    stored = rows(
        db,
        "select attempts, worker, started_at = created_at from twistedlrp_job where id = ?",
        stored_id(first["id"]),
    )
    assert stored == [(1, first["worker"], True)]


def test_cancel_running_cooperative_job_stops(env):
    server, markers = env
    marker = markers / "cancel-coop"
    marker.mkdir()
    job = api(server, "submit", name="testapp.jobs.cooperative", args=[str(marker)])["job"]
    pid = read_pid(marker / "cooperative")
    api(server, "cancel", id=job["id"])
    info = wait_job(server, job["id"], timeout=10)
    assert info["state"] == "cancelled"
    assert (marker / "cooperative-stopped").exists()
    assert alive(pid), "a cooperative job's worker is not killed"


def test_cancel_running_stubborn_job_is_killed_after_grace(env):
    server, markers = env
    marker = markers / "cancel-stubborn"
    marker.mkdir()
    job = api(server, "submit", name="testapp.jobs.stubborn", args=[str(marker)])["job"]
    pid = read_pid(marker / "stubborn")
    started = time.monotonic()
    api(server, "cancel", id=job["id"])
    info = wait_job(server, job["id"], timeout=10)
    assert info["state"] == "cancelled"
    assert "SIGTERM" in info["error"] or "SIGKILL" in info["error"], info["error"]
    assert time.monotonic() - started >= 0.4  # the grace period (0.5 s) came first
    wait_for(lambda: not alive(pid), 10, message="the stubborn job's process gone")


def test_refusals_store_nothing(env):
    server, _ = env
    db = server.tmp / "db.sqlite3"
    before = count_jobs(db)
    error = api(server, "submit", expect_error=True, name="testapp.jobs.nope")
    assert error["error"] == "NotRegistered"
    assert "testapp.jobs.nope" in error["message"] and "registered" in error["message"]
    error = api(server, "submit", expect_error=True, name="testapp.jobs.echo", non_json=True)
    assert error["error"] == "InvalidArguments"
    assert "JSON" in error["message"]
    error = api(
        server, "submit", expect_error=True, name="testapp.jobs.echo", args=["x" * (1024 * 1024)]
    )
    assert error["error"] == "PayloadTooLarge"
    assert "1048576" in error["message"]
    assert count_jobs(db) == before
    error = api(server, "get", expect_error=True, id="00000000-0000-0000-0000-000000000000")
    assert error["error"] == "UnknownJob"


def test_200_kib_arguments_and_result_round_trip(env):
    server, _ = env
    data = {"text": "é" * 50_000 + "".join(chr(33 + i % 90) for i in range(100_000))}
    assert len(json.dumps(data).encode()) > 200 * 1024
    job = api(server, "submit", name="testapp.jobs.echo", args=[data])["job"]
    info = api(server, "wait", id=job["id"])["job"]
    assert info["state"] == "succeeded"
    assert info["result"] == data


def test_payload_just_under_the_limit_works(env):
    server, _ = env
    # The limit counts the JSON of {"args": [...], "kwargs": {...}}, compact.
    overhead = len(json.dumps({"args": [""], "kwargs": {}}, separators=(",", ":")))
    text = "x" * (1024 * 1024 - overhead)
    job = api(server, "submit", name="testapp.jobs.echo", args=[text])["job"]
    info = api(server, "wait", id=job["id"])["job"]
    assert info["state"] == "succeeded", info["error"]
    assert info["result"] == text


def test_results_that_cannot_be_stored_fail_the_job(env):
    server, _ = env
    big = api(server, "submit", name="testapp.jobs.big_result", args=[2 * 1024 * 1024])["job"]
    info = api(server, "wait", id=big["id"])["job"]
    assert info["state"] == "failed"
    assert "more than the limit of 1048576 bytes" in info["error"]
    odd = api(server, "submit", name="testapp.jobs.not_json_result")["job"]
    info = api(server, "wait", id=odd["id"])["job"]
    assert info["state"] == "failed"
    assert "not JSON" in info["error"]
    failing = api(server, "submit", name="testapp.jobs.fail")["job"]
    info = api(server, "wait", id=failing["id"])["job"]
    assert info["state"] == "failed"
    assert "ValueError: this job fails on purpose" in info["error"]
    assert "Traceback" in info["error"]


def test_key_returns_the_unfinished_job(env):
    server, markers = env
    marker = markers / "key"
    marker.mkdir()
    first = api(
        server, "submit", name="testapp.jobs.sleeper", args=[str(marker), 0.5], key="one-import"
    )["job"]
    second = api(
        server, "submit", name="testapp.jobs.sleeper", args=[str(marker), 0.5], key="one-import"
    )["job"]
    assert first["id"] == second["id"]
    wait_job(server, first["id"])
    third = api(
        server, "submit", name="testapp.jobs.sleeper", args=[str(marker), 0.0], key="one-import"
    )["job"]
    assert third["id"] != first["id"]


def test_priority_and_run_after(env):
    server, markers = env
    marker = markers / "order"
    marker.mkdir()
    # Both workers busy until the three jobs below are queued.
    busy, release = _hold_workers(server, marker)
    run_after = time.time() + 4
    later = api(server, "submit", name="testapp.jobs.add", args=[0, 0], run_after=run_after)["job"]
    low = api(server, "submit", name="testapp.jobs.add", args=[0, 1], priority=-5)["job"]
    high = api(server, "submit", name="testapp.jobs.add", args=[0, 2], priority=5)["job"]
    release()
    for job in busy:
        wait_job(server, job["id"])
    high_info, low_info = wait_job(server, high["id"]), wait_job(server, low["id"])
    assert high_info["started_at"] <= low_info["started_at"]
    info = wait_job(server, later["id"], timeout=10)
    # Not before its time, although a worker was free well before.
    started, high_finished = (
        datetime.fromisoformat(i[k]).timestamp()
        for i, k in ((info, "started_at"), (high_info, "finished_at"))
    )
    assert started >= run_after > high_finished
    assert info["state"] == "succeeded"


def test_list_jobs_and_stats(env):
    server, _ = env
    # Counted from here: the module's other tests (whichever ran before on
    # this server) leave jobs of their own.
    before = api(server, "stats")["stats"]
    jobs = [api(server, "add", a=3, b=i)["job"] for i in range(4)]
    for job in jobs:
        wait_job(server, job["id"])
    found = api(server, "list", state="succeeded", name="testapp.jobs.add", limit=500)["jobs"]
    for job in jobs:
        assert [job["id"], "testapp.jobs.add", "succeeded"] in found
    assert all(state == "succeeded" and name == "testapp.jobs.add" for _, name, state in found)
    assert len(api(server, "list", limit=3)["jobs"]) == 3
    stats = api(server, "stats")["stats"]
    assert stats["jobs"]["succeeded"] >= before["jobs"].get("succeeded", 0) + 4
    assert stats["jobs"]["succeeded"] >= len(found)
    assert stats["counters"]["submitted"] >= before["counters"]["submitted"] + 4
    assert len(stats["workers"]) == 2


def test_health_shows_the_job_service(env):
    server, _ = env
    health = request(server.port, "/-/health").json()
    assert health["jobs"]["state"] == "running"
    # The module's server is shared: a worker another test ended may still
    # be on its way back, so wait for both rather than read the count once.
    wait_for(
        lambda: request(server.port, "/-/health").json()["jobs"]["workers"] == 2,
        message="two live job workers in /-/health",
    )


def test_the_same_calls_work_in_a_plain_python_process(env):
    """A script with Django set up (like manage.py shell) reaches the service over its socket."""
    server, _ = env
    script = (
        "import django, json; django.setup()\n"
        "from twistedlrp import jobs\n"
        "from testapp.jobs import add\n"
        "info = add.submit(20, 22)\n"
        "done = jobs.wait(info.id, 20)\n"
        "try:\n"
        "    jobs.submit('testapp.jobs.nope')\n"
        "except jobs.NotRegistered as e:\n"
        "    refused = str(e)\n"
        "print(json.dumps({'state': done.state, 'result': done.result, 'refused': refused}))\n"
    )
    env_vars = dict(
        os.environ,
        DJANGO_SETTINGS_MODULE="testsite.settings",
        LRP_TEST_DB=str(server.tmp / "db.sqlite3"),
        LRP_STATE_DIR=str(server.tmp / "state"),
        PYTHONPATH=str(TESTSITE),
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        env=env_vars,
        cwd=TESTSITE,
        capture_output=True,
        timeout=60,
        check=True,
    )
    answer = json.loads(out.stdout.decode().strip().splitlines()[-1])
    assert answer["state"] == "succeeded" and answer["result"] == 42
    assert "testapp.jobs.nope" in answer["refused"]


def test_nul_characters_never_leave_a_job_unrecorded(env):
    """SQLite stores NUL characters; PostgreSQL's text and jsonb columns refuse them."""
    server, _ = env
    ids = {
        where: api(server, "submit", name="testapp.jobs.nul_characters", args=[where])["job"]["id"]
        for where in ("output", "progress", "error", "result")
    }
    info = wait_job(server, ids["output"])
    assert info["state"] == "succeeded", info
    assert "before" in info["output"] and "after" in info["output"]
    info = wait_job(server, ids["progress"])
    assert info["state"] == "succeeded", info
    assert info["progress"][2].startswith("step") and info["progress"][2].endswith("one")
    info = wait_job(server, ids["error"])
    assert info["state"] == "failed" and "ValueError: bad" in info["error"], info
    info = wait_job(server, ids["result"])
    if postgres():
        assert info["state"] == "failed", info
        assert "NUL" in info["error"], info["error"]
    else:
        assert info["state"] == "succeeded" and info["result"] == {"text": "a\x00b"}, info
    # Arguments: stored as they are, or refused with nothing stored.
    body = api(server, "submit", name="testapp.jobs.echo", args=["x\x00y"], expect_error=postgres())
    if postgres():
        assert body["error"] == "InvalidArguments" and "NUL" in body["message"], body
    else:
        assert wait_job(server, body["job"]["id"])["result"] == "x\x00y"


def test_a_key_longer_than_its_column_is_refused(env):
    server, _ = env
    error = api(
        server, "submit", expect_error=True, name="testapp.jobs.add", args=[1, 2], key="k" * 256
    )
    assert error["error"] == "InvalidArguments" and "255" in error["message"], error


def test_an_outcome_the_database_refuses_still_ends_the_job(env):
    server, _ = env
    job = api(server, "submit", name="testapp.jobs.huge_progress")["job"]
    info = api(server, "wait", id=job["id"], timeout=20)["job"]
    assert info["state"] == "failed", info
    assert "could not be stored" in info["error"], info["error"]
