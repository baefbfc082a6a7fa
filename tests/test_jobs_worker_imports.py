"""
A job worker imports Django and the site, not Twisted (which would cost
each worker about 7 MiB of the idle memory bench/jobs.py measures): the
worker child speaks its pipe protocol without a reactor, and the modules
of twistedlrp it imports (the package, boot, the registry, the job API,
schedules and retention declared by @job) import Twisted only when used.
A job node (C{--jobs-only}) imports no web module unless it serves metrics,
and no Perspective Broker unless it listens for it.
"""

from jobsupport import api, make_template_db, start_server, wait_job


def test_a_worker_has_not_imported_twisted(tmp_path):
    template = make_template_db(tmp_path)
    server = start_server(template, tmp_path / "server", "--workers", "1")
    try:
        job_id = api(server, "submit", name="testapp.jobs.loaded_modules", args=["twisted"])
        info = wait_job(server, job_id["job"]["id"])
        assert info["state"] == "succeeded", info
        assert info["result"] == [], f"a worker imported Twisted: {info['result'][:10]}"
        # The test can fail: the same job sees Django, which every worker imports.
        job_id = api(server, "submit", name="testapp.jobs.loaded_modules", args=["django"])
        assert "django.db" in wait_job(server, job_id["job"]["id"])["result"]
    finally:
        server.stop()


def test_a_job_node_imports_no_web_module_or_pb_unless_it_serves_them(tmp_path):
    """A C{--jobs-only} node (what the job bench's idle memory counts) leaves the web stack out."""
    import os
    import subprocess
    import sys

    from support import TESTSITE

    program = (
        "import sys\n"
        "from twistedlrp.tap import Options\n"
        "from twistedlrp.server import build_server\n"
        "options = Options()\n"
        "options.parseOptions(sys.argv[1:])\n"
        "build_server(options)\n"
        "print(sorted(m for m in sys.modules if m.startswith(('twisted.web', 'twistedlrp.web', 'twisted.spread'))))\n"
    )
    common = ["--settings", "testsite.settings", "--jobs-only", "--state-dir", str(tmp_path)]
    env = dict(os.environ, LRP_TEST_DB=str(tmp_path / "db.sqlite3"))
    env.pop("DJANGO_SETTINGS_MODULE", None)

    def imported(*args):
        done = subprocess.run(
            [sys.executable, "-c", program, *common, *args],
            cwd=TESTSITE,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.strip().splitlines()[-1]

    assert imported() == "[]"
    # The test can fail: serving metrics takes the web modules it needs,
    # and a PB listener Perspective Broker.
    assert "twisted.web.server" in imported("--metrics-listen", "tcp:0:interface=127.0.0.1")
    secret = tmp_path / "secret"
    secret.write_text("s" * 40)
    secret.chmod(0o600)
    pb_listen = ["--pb-listen", "tcp:0:interface=127.0.0.1", "--jobs-secret-file", str(secret)]
    assert "twisted.spread.pb" in imported(*pb_listen)
