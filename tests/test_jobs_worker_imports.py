"""
A job worker imports Django and the site, not Twisted (which would cost
each worker about 7 MiB of the idle memory bench/jobs.py measures): the
worker child speaks its pipe protocol without a reactor, and the modules
of twistedlrp it imports (the package, boot, the registry, the job API,
schedules and retention declared by @job) import Twisted only when used.
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
