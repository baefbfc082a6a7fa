"""
The demo site's "import contacts" story, served by a real ``twistd -n lrp``:
the button's view answers at once, the job runs in a worker process, the
JSON view shows its progress, the result arrives; cancelling stops it.
"""

from __future__ import annotations

import html
import http.client
import json
import os
import re
import sqlite3
import subprocess
import sys
import time
from urllib.parse import urlencode

import pytest
from prometheus_client.parser import text_string_to_metric_families

from support import ROOT, wait_for

EXAMPLE = ROOT / "example"


@pytest.fixture
def demo(lrp_server, tmp_path):
    db = tmp_path / "demo.sqlite3"
    env = {"LRP_DEMO_DB": str(db)}
    subprocess.run(
        [sys.executable, "manage.py", "migrate", "--noinput", "-v0"],
        cwd=EXAMPLE,
        env={**os.environ, **env},
        check=True,
        timeout=120,
    )
    server = lrp_server("--workers", "1", settings="mysite.settings", cwd=EXAMPLE, env=env)
    server.db = db
    return server


class Browser:
    """Just enough of a browser: the CSRF cookie and token of the home page."""

    def __init__(self, server):
        self.server = server
        page = server.get("/")
        assert page.status == 200
        self.home = page.text
        self.cookie = re.search(r"csrftoken=([^;]+)", page.headers["set-cookie"]).group(1)
        self.token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text).group(1)

    def post(self, path: str, json: bool = True):
        headers = {"Cookie": f"csrftoken={self.cookie}", "X-CSRFToken": self.token}
        if json:
            headers["Accept"] = "application/json"
        return self.server.get(path, method="POST", body=b"", headers=headers)

    def job(self, job_id: str) -> dict:
        response = self.server.get(f"/jobs/{job_id}.json")
        assert response.status == 200, response.text
        return response.json()


def count_contacts(db, batch=None) -> int:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=20)
    try:
        if batch is None:
            return con.execute("select count(*) from demo_contact").fetchone()[0]
        sql = "select count(*) from demo_contact where batch = ?"
        return con.execute(sql, (batch,)).fetchone()[0]
    finally:
        con.close()


def test_import_contacts_with_progress_and_result(demo):
    browser = Browser(demo)
    assert "46 primes below 200" in browser.home
    assert "Import 5,000 contacts" in browser.home
    started = time.monotonic()
    response = browser.post("/import")
    answered = time.monotonic() - started
    assert response.status == 202, response.text
    job = response.json()
    # The view answers at once: the import takes seconds.
    assert answered < 1.0, answered
    assert job["state"] in ("queued", "running") and not job["finished"]

    seen = []

    def done():
        info = browser.job(job["id"])
        seen.append(info["progress"]["current"])
        return info if info["finished"] else None

    info = wait_for(done, 60, interval=0.05, message="the import")
    assert info["state"] == "succeeded", info
    assert info["result"]["imported"] == 5000 and info["result"]["elapsed"] > 0
    assert info["progress"] == {
        "current": 5000,
        "total": 5000,
        "message": "5,000 of 5,000 contacts imported",
        "percent": 100.0,
    }
    # Progress was seen while it ran, and never went backwards.
    assert any(0 < current < 5000 for current in seen), seen
    assert seen == sorted(seen)
    assert count_contacts(demo.db, info["result"]["batch"]) == 5000
    assert "5000" in demo.get("/").text
    # What Prometheus scrapes (conf/prometheus.yml): the import, by its job name.
    scraped = demo.get("/-/metrics")
    assert scraped.status == 200
    succeeded = {
        sample.labels["name"]: sample.value
        for family in text_string_to_metric_families(scraped.text)
        if family.name == "lrp_jobs_succeeded"
        for sample in family.samples
        if sample.name == "lrp_jobs_succeeded_total"
    }
    assert succeeded == {"demo.jobs.import_contacts": 1}


def test_import_without_javascript_then_cancel(demo):
    browser = Browser(demo)
    response = browser.post("/import", json=False)
    assert response.status == 303
    job_id = re.fullmatch(r"/\?job=([0-9a-f-]{36})", response.headers["location"]).group(1)
    # The page the browser lands on follows that job with the progress widget.
    page = demo.get(f"/?job={job_id}")
    assert f'data-lrp-job="{job_id}"' in page.text
    assert '<script src="/static/twistedlrp/progress.js" defer></script>' in page.text
    events = html.unescape(re.search(r'data-events="([^"]+)"', page.text).group(1))
    token = re.search(r'name="token" value="([^"]+)"', page.text).group(1)

    wait_for(lambda: browser.job(job_id)["progress"]["current"] > 0, 30, message="the first batch")
    # Its event stream (what the widget's script reads) says how far it got.
    conn = http.client.HTTPConnection("127.0.0.1", demo.port, timeout=10)
    try:
        conn.request("GET", events)
        stream = conn.getresponse()
        assert stream.status == 200
        assert stream.headers["content-type"].startswith("text/event-stream")
        while not (line := stream.readline()).startswith(b"data: "):
            assert line, "the stream ended"
        assert json.loads(line[6:])["progress"]["current"] > 0
    finally:
        conn.close()
    # The widget's Cancel button, as a form post without JavaScript: back to the page.
    form = urlencode(
        {"csrfmiddlewaretoken": browser.token, "token": token, "next": f"/?job={job_id}"}
    )
    response = demo.get(
        f"/lrp/jobs/{job_id}/cancel",
        method="POST",
        body=form.encode(),
        headers={
            "Cookie": f"csrftoken={browser.cookie}",
            "Content-Type": "application/x-www-form-urlencoded",
        },
    )
    assert response.status == 303, response.text
    assert response.headers["location"] == f"/?job={job_id}"
    info = wait_for(
        lambda: (i := browser.job(job_id))["finished"] and i, 30, message="the cancelled job"
    )
    assert info["state"] == "cancelled", info
    assert "cancelled" in info["error"]
    assert info["result"] is None
    # It stopped between batches: not everything was imported.
    assert 0 < count_contacts(demo.db) < 5000


def test_unknown_job_is_404(demo):
    assert demo.get("/jobs/00000000-0000-0000-0000-000000000000.json").status == 404


def test_the_demo_reads_its_database_and_hosts_from_the_environment(lrp_server, tmp_path):
    # What a deployment of the demo sets (docs/deploying.md): its database as
    # a URL (PostgreSQL there; SQLite here unless the suite has PostgreSQL),
    # and the names it answers to.
    from support import pg_connect, pg_ensure, postgres

    if postgres():
        name = pg_ensure(tmp_path / "demo")
        with pg_connect(tmp_path / "demo") as con:
            user, host, port = con.info.user, con.info.host, con.info.port
        url = f"postgres://{user}@/{name}?host={host}&port={port}"
    else:
        url = f"sqlite:///{tmp_path / 'from-url.sqlite3'}"
    env = {"DATABASE_URL": url, "DJANGO_ALLOWED_HOSTS": "demo.example,127.0.0.1"}
    subprocess.run(
        [sys.executable, "manage.py", "migrate", "--noinput", "-v0"],
        cwd=EXAMPLE,
        env={**os.environ, **env},
        check=True,
        timeout=120,
    )
    if not postgres():
        assert (tmp_path / "from-url.sqlite3").exists()
    server = lrp_server("--workers", "1", settings="mysite.settings", cwd=EXAMPLE, env=env)
    assert server.get("/", headers={"Host": "demo.example"}).status == 200
    assert server.get("/", headers={"Host": "elsewhere.example"}).status == 400
    # The job table is in that database: the demo's import runs there.
    browser = Browser(server)
    response = browser.post("/import")
    assert response.status == 202, response.text
    job_id = response.json()["id"]
    info = wait_for(lambda: (j := browser.job(job_id))["finished"] and j, 60, message="import")
    assert info["state"] == "succeeded", info


def test_make_run_makes_a_demo_superuser_once(tmp_path):
    """What make run runs after migrate: the admin's password, printed the first time only."""
    env = {**os.environ, "LRP_DEMO_DB": str(tmp_path / "demo.sqlite3")}

    def manage(*args):
        return subprocess.run(
            [sys.executable, "manage.py", *args],
            cwd=EXAMPLE,
            env=env,
            check=True,
            timeout=120,
            capture_output=True,
            text=True,
        ).stdout

    manage("migrate", "--noinput", "-v0")
    first = manage("demo_user")
    password = re.search(r"admin / (\S+) ", first).group(1)
    assert manage("demo_user") == ""
    check = (
        "from django.contrib.auth import authenticate; "
        f"print(authenticate(username='admin', password={password!r}).is_superuser)"
    )
    assert manage("shell", "-c", check).strip().splitlines()[-1] == "True"
