"""
Jobs submitted inside transaction.atomic() are part of the transaction
(docs/jobs.md, "Jobs and transactions"), against a real server: a view of
the test site writes a note, submits testapp.jobs.read_note for it (which
fails with DoesNotExist if it runs before the note is committed), holds the
transaction open, then commits or rolls back. Also on PostgreSQL.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid

import pytest
from jobsupport import api, make_template_db, rows, start_server, stored_id, wait_job

from support import HERE, TESTSITE, BackgroundRequest, postgres, request, wait_for


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("txn")
    server = start_server(make_template_db(tmp), tmp / "server")
    yield server
    server.kill()


def txn(server, **data) -> dict:
    response = request(server.port, "/txn/api", method="POST", body=json.dumps(data).encode())
    assert response.status == 200, response.text
    return response.json()


def unknown(server, job_id: str) -> bool:
    answer = api(server, "get", expect_error=True, id=job_id)
    return answer.get("error") == "UnknownJob"


def known(server, job_id: str) -> bool:
    body = json.dumps({"op": "get", "id": job_id}).encode()
    response = request(server.port, "/jobs/api", method="POST", body=body)
    assert response.status == 200 or response.json()["error"] == "UnknownJob", response.text
    return response.status == 200


def barrier(server) -> None:
    """Return once a job submitted now has run: what came before it was seen."""
    job = api(server, "add", a=1, b=2)["job"]
    assert wait_job(server, job["id"])["state"] == "succeeded"


def test_a_job_submitted_in_a_transaction_runs_only_after_the_commit(server):
    # The view holds its transaction (and, on SQLite, the write lock) for 1.5 s.
    started = time.monotonic()
    answer = txn(server, text="written first", hold=1.5)
    took = time.monotonic() - started
    job = answer["job"]
    assert answer["committed"]
    # It joined the transaction: no wait for the job service (which on SQLite
    # waited 10 s for the lock the view held, then failed).
    assert job["elapsed"] < 0.5, job
    assert job["state"] == "queued"
    assert took < 5
    info = wait_job(server, job["id"])
    # It ran after the commit: the note it reads was there.
    assert info["state"] == "succeeded", info
    assert info["result"] == "written first"
    assert info["attempts"] == 1


def test_other_connections_do_not_see_the_job_until_the_commit(server, tmp_path):
    chosen = str(uuid.uuid4())
    marker = tmp_path / "submitted"
    body = json.dumps({"id": chosen, "text": "slow commit", "hold": 3, "marker": str(marker)})
    view = BackgroundRequest(server.port, "/txn/api", method="POST", body=body.encode())
    view.start()
    # The view has submitted and now holds its transaction open.
    wait_for(marker.exists, 20, message="the view's submission")
    # (Read directly: on SQLite the job service's own reads wait for the view's write lock.)
    assert not rows(
        server_db(server), "SELECT id FROM twistedlrp_job WHERE id = ?", stored_id(chosen)
    )
    response = view.outcome()
    assert response.status == 200, response.text
    assert response.json()["job"]["id"] == chosen
    assert wait_job(server, chosen)["result"] == "slow commit"


def test_a_rollback_takes_the_job_with_it(server):
    answer = txn(server, then="rollback")
    assert not answer["committed"]
    job_id = answer["job"]["id"]
    barrier(server)
    assert unknown(server, job_id)
    assert not rows(
        server_db(server), "SELECT id FROM twistedlrp_job WHERE id = ?", stored_id(job_id)
    )
    assert not rows(server_db(server), "SELECT job FROM twistedlrp_announcement")


def test_a_savepoint_rollback_takes_the_job_and_the_transaction_commits(server):
    answer = txn(server, then="savepoint_rollback")
    assert answer["committed"]  # the outer transaction
    job_id = answer["job"]["id"]
    barrier(server)
    assert unknown(server, job_id)


def test_a_task_enqueued_in_a_transaction_runs_after_the_commit(server):
    answer = txn(server, text="a task's note", task=True, hold=1)
    job = answer["job"]
    assert job["elapsed"] < 0.5, job
    info = wait_job(server, job["id"])
    assert info["state"] == "succeeded", info
    assert info["name"] == "testapp.tasks.read_note_task"
    assert info["result"] == "a task's note"


def test_join_transaction_false_runs_the_job_even_when_the_transaction_rolls_back(server):
    answer = txn(server, then="rollback", join=False, hold=1)
    assert not answer["committed"]
    job = answer["job"]
    assert job["elapsed"] < 0.5, job
    # On SQLite it is stored once the view's transaction let go of the write lock.
    wait_for(lambda: known(server, job["id"]), 20, message="the job stored")
    info = wait_job(server, job["id"])
    # It ran although the note it reads was rolled back.
    assert info["state"] == "failed", info
    assert "DoesNotExist" in info["error"]


def test_the_same_id_or_key_in_a_transaction_is_one_job(server):
    chosen = str(uuid.uuid4())
    first = txn(server, id=chosen)["job"]
    assert first["id"] == chosen
    # Submitting again with the id, in another transaction, returns that job.
    again = txn(server, id=chosen)["job"]
    assert again["id"] == chosen
    wait_job(server, chosen)
    key = f"k-{uuid.uuid4()}"
    # A key held by an unfinished (delayed) job, submitted in a transaction, returns it.
    held = api(
        server, "submit", name="testapp.jobs.add", args=[1, 1], key=key, run_after=time.time() + 60
    )
    same = txn(server, key=key)["job"]
    assert same["id"] == held["job"]["id"]
    api(server, "cancel", id=held["job"]["id"])


def test_a_cancellation_in_a_transaction_takes_effect_at_the_commit(server, tmp_path):
    # A delayed job: cancelled in a transaction that rolls back, it stays queued.
    queued = api(server, "submit", name="testapp.jobs.add", args=[1, 2], run_after=time.time() + 60)
    job_id = queued["job"]["id"]
    answer = txn(server, cancel=job_id, then="rollback")
    assert answer["job"]["state"] == "cancelled" and answer["job"]["elapsed"] < 0.5, answer
    assert api(server, "get", id=job_id)["job"]["state"] == "queued"
    # Committed, it is cancelled.
    answer = txn(server, cancel=job_id)
    assert wait_job(server, job_id)["state"] == "cancelled"
    # A running job: the commit asks it to stop, and the job service stops it.
    running = api(server, "submit", name="testapp.jobs.cooperative", args=[str(tmp_path)])
    job_id = running["job"]["id"]
    wait_for(lambda: (tmp_path / "cooperative").exists(), 20, message="job started")
    answer = txn(server, cancel=job_id)
    assert answer["job"]["state"] == "running" and answer["job"]["elapsed"] < 0.5, answer
    info = wait_job(server, job_id)
    assert info["state"] == "cancelled", info


def server_db(server):
    return server.env["LRP_TEST_DB"]


@pytest.mark.skipif(bool(postgres()), reason="SQLite's announcement table (PostgreSQL: NOTIFY)")
def test_a_job_whose_process_died_after_the_commit_still_runs(server):
    # A process (not the server) submits in a transaction and dies right after
    # the commit, before it could tell the job service: the sweep finds the job.
    program = HERE / "programs" / "commit_then_die.py"
    env = dict(os.environ, LRP_TEST_DB=server_db(server), LRP_STATE_DIR=str(server.tmp / "state"))
    env.pop("DJANGO_SETTINGS_MODULE", None)
    done = subprocess.run(
        [sys.executable, str(program), str(TESTSITE)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 7, done.stderr  # it died in its on_commit callback
    job_id = done.stdout.split()[-1]
    # (Its announcement may already be taken by now: the sweep runs every 2 s.)
    info = wait_job(server, job_id, timeout=20)
    assert info["state"] == "succeeded", info
    assert info["result"] == "committed, then the process died"
    assert not rows(server_db(server), "SELECT job FROM twistedlrp_announcement")
