"""
The eager test mode (LRP_JOBS_EAGER): a site's own tests, run by pytest in
a process with Django set up and no job service (tests/programs/eager_checks.py),
see every job run in the submitting thread and come back finished.
"""

from __future__ import annotations

import os
import subprocess
import sys

from jobsupport import api, make_template_db, start_server

from support import HERE, ROOT, TESTSITE


def test_a_sites_own_tests_run_their_jobs_eagerly(tmp_path):
    env = dict(os.environ, DJANGO_SETTINGS_MODULE="testsite.settings")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTSITE), env.get("PYTHONPATH")]))
    # No server uses this state directory: a call that is not eager fails at once.
    env["LRP_STATE_DIR"] = str(tmp_path / "state")
    env["LRP_TEST_DB"] = str(tmp_path / "unused.sqlite3")
    checks = HERE / "programs" / "eager_checks.py"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", str(checks), "-q", "-p", "no:cacheprovider", "-rA"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "\n11 passed in " in done.stdout, done.stdout


def test_a_server_with_the_setting_warns_and_runs_jobs_in_its_views(tmp_path):
    server = start_server(
        make_template_db(tmp_path), tmp_path / "server", env={"LRP_TEST_JOBS_EAGER": "1"}
    )
    try:
        job = api(server, "submit", name="testapp.jobs.whoami")["job"]
        # Finished when submit answers, run by the view's own process.
        assert job["state"] == "succeeded" and job["result"] == {"pid": server.proc.pid}
        assert api(server, "get", id=job["id"])["job"]["result"] == {"pid": server.proc.pid}
        assert "LRP_JOBS_EAGER is set (a setting for tests)" in server.output()
    finally:
        server.kill()
