"""
A site in one file (docs/one-file.md), served by real processes:
``twistd -n lrp --app FILE`` for each of the four kinds of object, ``python
hello.py`` with a job, hooks, a model and Ctrl-C, ``--reload`` on the file,
a nanodjango file with a job, the example, and the errors, each one line.
Every file lives in the test's own folder, outside the test site.
"""

from __future__ import annotations

import html
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
import pytest

from support import ROOT, TESTSITE, TWISTD, LRPProcess, wait_for

HELLO = textwrap.dedent(
    '''
    """A site in one file with a job, hooks and a model (tests/test_onefile.py)."""
    import os
    import time
    from pathlib import Path

    from django.db import models
    from django.http import HttpResponse, JsonResponse
    from django.template import engines
    from django.urls import reverse
    from django.views.decorators.csrf import csrf_exempt

    from twistedlrp import Router, serve
    from twistedlrp.jobs import JobCancelled, cancel, cancelled, get, job, progress
    from twistedlrp.lifecycle import on_shutdown, on_startup

    MARKS = Path(os.environ["HELLO_MARKS"])


    class Note(models.Model):
        text = models.TextField()


    @job
    def count(n):
        progress(1, n, "first")
        deadline = time.monotonic() + 60
        while not (MARKS / "go").exists():  # the test says when
            if cancelled():
                raise JobCancelled("cancelled at the first step")
            if time.monotonic() > deadline:
                raise TimeoutError("no go")
            time.sleep(0.02)
        progress(n, n, "done")
        return {"pid": os.getpid()}


    @on_startup
    def started():
        (MARKS / "started").write_text(str(os.getpid()))


    @on_shutdown
    def stopped():
        (MARKS / "stopped").write_text(str(os.getpid()))


    def hello(request):
        return HttpResponse(f"hello from {os.getpid()}")


    def start(request, n):
        job_id = count.submit(n).id
        return JsonResponse({"id": job_id, "url": reverse("status", args=[job_id])})


    def status(request, id):
        info = get(str(id))
        return JsonResponse(
            {"state": info.state, "progress": list(info.progress), "result": info.result}
        )


    def page(request, id):
        widget = engines["django"].from_string("{% load lrp %}{% lrp_job_progress job %}")
        return HttpResponse(widget.render({"job": str(id)}, request))


    def stop(request, id):
        cancel(str(id))
        return HttpResponse("asked")


    @csrf_exempt
    def notes(request):
        if request.method == "POST":
            Note.objects.create(text="x")
        return HttpResponse(str(Note.objects.count()))


    app = Router(
        ("", hello),
        ("start/<int:n>", start),
        ("jobs/<uuid:id>", status),
        ("jobs/<uuid:id>/page", page),
        ("jobs/<uuid:id>/stop", stop),
        ("notes", notes),
    )

    if __name__ == "__main__":
        serve(app, workers=1, threads=4)
    '''
)

KINDS = textwrap.dedent(
    """
    from django.http import HttpResponse
    from django.urls import path, reverse

    from twistedlrp import Router


    def index(request):
        return HttpResponse(f"view {request.path}")


    def page(request, n):
        return HttpResponse(f"page {n} at {reverse('page', args=[n])}")


    def which(request):
        from django.conf import settings

        return HttpResponse(f"{settings.SETTINGS_MODULE} {request.path}")


    NUMBER = 42
    router = Router(("", index), ("page/<int:n>", page))
    urlpatterns = [path("p/<int:n>", page, name="page")]


    def application(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [f"wsgi {environ['PATH_INFO']}".encode()]
    """
)

COUNTER = textwrap.dedent(
    """
    import json
    import os

    from django.db import models
    from nanodjango import Django

    from twistedlrp.jobs import get, job, progress

    app = Django()


    @app.admin
    class CountLog(models.Model):
        timestamp = models.DateTimeField(auto_now_add=True)


    @job
    def tally(n):
        for i in range(n):
            progress(i + 1, n, "tallying")
        return {"pid": os.getpid(), "count": CountLog.objects.count()}


    @app.route("/")
    def count(request):
        CountLog.objects.create()
        return f"<p>Number of page loads: {CountLog.objects.count()}</p>"


    @app.route("/tally")
    def start(request):
        return tally.submit(3).id


    @app.route("/jobs/<str:id>")
    def status(request, id):
        info = get(id)
        return json.dumps({"state": info.state, "result": info.result, "progress": list(info.progress)})
    """
)


class ScriptProcess(LRPProcess):
    """C{python FILE ARGS}: a file that calls C{twistedlrp.serve()}."""

    def __init__(self, script: str, *args: str, **kwargs):
        super().__init__(*args, settings=None, **kwargs)
        self.script = script

    @property
    def command(self) -> list[str]:
        return [sys.executable, self.script, *self.args]


@pytest.fixture
def folder(tmp_path):
    """The site's folder: the working directory of every process started."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "marks").mkdir()
    return site


@pytest.fixture
def started(folder):
    """Start servers in C{folder}; stop whatever is left, with its whole process tree."""
    servers: list[LRPProcess] = []

    def start(server: LRPProcess, wait=True):
        servers.append(server)
        return server.start(wait=wait, timeout=60)

    yield start
    for server in servers:
        kill_tree(server)


def kill_tree(server: LRPProcess) -> None:
    if server.proc is None:
        return
    try:
        for child in psutil.Process(server.proc.pid).children(recursive=True):
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass
    except psutil.NoSuchProcess:
        pass
    server.kill()


def run(command: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    environment.update(env or {})
    return subprocess.run(
        command, cwd=cwd, env=environment, capture_output=True, text=True, timeout=120
    )


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def children_of(pid: int) -> set[int]:
    return {p.pid for p in psutil.Process(pid).children(recursive=True)}


# -- python hello.py ---------------------------------------------------------------------


def test_python_hello_py_job_hooks_model_and_ctrl_c(folder, started):
    (folder / "hello.py").write_text(HELLO)
    env = {"HELLO_MARKS": str(folder / "marks")}
    state = ["--state-dir", str(folder / "state")]
    migrated = run([sys.executable, "hello.py", "--migrate", *state], folder, env)
    assert migrated.returncode == 0, migrated.stdout + migrated.stderr
    assert "Creating table hello_note" in migrated.stdout

    server = started(ScriptProcess("hello.py", *state, cwd=folder, env=env, tmp=folder))
    pid = server.proc.pid
    # python replaced itself with the server (same pid: Ctrl-C reaches it),
    # and the start-up hook ran there before the port opened.
    assert (folder / "marks" / "started").read_text() == str(pid)
    assert server.get("/").text == f"hello from {pid}"
    assert server.get("/nowhere").status == 404
    assert server.get("/notes", method="POST").text == "1"
    assert server.get("/notes", method="POST").text == "2"

    started_job = server.get("/start/2").json()
    assert started_job["url"] == f"/jobs/{started_job['id']}"  # reverse() by the view's name

    def job():
        return server.get(started_job["url"]).json()

    wait_for(lambda: job()["progress"] == [1, 2, "first"], 60, message="the first progress")
    assert job()["state"] == "running"
    (folder / "marks" / "go").touch()
    done = wait_for(lambda: (info := job())["state"] == "succeeded" and info, 30)
    assert done["progress"] == [2, 2, "done"]
    # It ran in a worker process of this server, not in the server.
    worker = done["result"]["pid"]
    assert worker != pid and worker in children_of(pid)
    assert "job hello.count" in server.output()

    # The progress widget (its views are in the root URLconf, its script
    # served with no collectstatic), and cancelling a running job.
    (folder / "marks" / "go").unlink()
    second = server.get("/start/3").json()["id"]
    wait_for(lambda: server.get(f"/jobs/{second}").json()["progress"][0] == 1, 60)
    page = server.get(f"/jobs/{second}/page").text
    assert f'data-lrp-job="{second}"' in page and 'data-state="running"' in page
    status_url = html.unescape(re.search(r'data-status="([^"]+)"', page).group(1))
    assert status_url.startswith(f"/lrp/jobs/{second}/status?token=")
    assert server.get(status_url).json()["state"] == "running"
    script = re.search(r'<script src="([^"]+)"', page).group(1)
    assert server.get(script).status == 200
    assert server.get(f"/jobs/{second}/stop").text == "asked"
    wait_for(lambda: server.get(f"/jobs/{second}").json()["state"] == "cancelled", 30)

    server.signal(signal.SIGINT)
    assert server.wait_exit(30) == 0, server.output()
    assert (folder / "marks" / "stopped").read_text() == str(pid)
    assert "Received SIGINT" in server.output()
    wait_for(lambda: not alive(worker), 10, message="the worker's end")


def test_the_example(started, tmp_path):
    """example/hello.py, what the README shows and make hello runs."""
    (tmp_path / "example").mkdir()
    server = started(
        ScriptProcess("hello.py", cwd=ROOT / "example", tmp=tmp_path / "example", env={})
    )
    job_id = server.get("/count/5").json()["job"]
    done = {"current": 5, "total": 5, "message": "counted to 5"}
    wait_for(lambda: server.get(f"/jobs/{job_id}").json() == done, 60, message="the job's end")

    # The README shows the same code (blank lines aside).
    def lines(path):
        return "\n".join(line for line in path.read_text().splitlines() if line.strip())

    code = lines(ROOT / "example" / "hello.py").split("\n", 1)[1]
    assert code in lines(ROOT / "README.md")


# -- twistd -n lrp --app: the four kinds -------------------------------------------------


@pytest.mark.parametrize(
    "app, path, status, body, extra",
    [
        ("kinds.py:index", "/any/path", 200, "view /any/path", ()),
        ("kinds.py:router", "/page/3", 200, "page 3 at /page/3", ()),
        ("kinds.py:router", "/p/3", 404, None, ()),
        ("kinds.py:urlpatterns", "/p/4", 200, "page 4 at /p/4", ()),
        # Web processes set the site up as the server does.
        ("kinds.py:urlpatterns", "/p/5", 200, "page 5 at /p/5", ("--web-workers=2",)),
        ("kinds:application", "/x/y", 200, "wsgi /x/y", ()),
        # No name: the first of app, application, urlpatterns.
        ("kinds.py", "/z", 200, "wsgi /z", ()),
    ],
)
def test_the_four_kinds(folder, started, app, path, status, body, extra):
    (folder / "kinds.py").write_text(KINDS)
    args = ["--app", app, "--no-jobs", *extra]
    server = started(LRPProcess(*args, settings=None, cwd=folder, tmp=folder))
    response = server.get(path)
    assert response.status == status, response.text
    if body is not None:
        assert response.text == body
    # twistedlrp's tables were made at the first start, in the state folder.
    assert (folder / "state" / "db.sqlite3").exists()
    assert (folder / "state" / "secret_key").stat().st_mode & 0o777 == 0o600
    assert "Applied " in server.output()


def test_a_settings_module_wins(folder, started):
    """--settings and --app: the module's settings, the URLs of what --app names."""
    (folder / "kinds.py").write_text(KINDS)
    server = started(
        LRPProcess(
            "--app", "kinds.py:which", "--pythonpath", str(TESTSITE), "--no-jobs",
            settings="testsite.settings", cwd=folder, tmp=folder,
        )
    )  # fmt: skip
    assert server.get("/a/b").text == "testsite.settings /a/b"
    assert not (folder / "state" / "db.sqlite3").exists()


# -- --reload --------------------------------------------------------------------------------


def test_reload_on_the_file(folder, started):
    site = folder / "page.py"
    site.write_text(
        "from django.http import HttpResponse\n\n\n"
        "def app(request):\n    return HttpResponse('first')\n"
    )
    server = started(
        LRPProcess(
            "--app", "page.py", "--reload", "--graceful-timeout=3", "--no-jobs",
            settings=None, cwd=folder, tmp=folder,
        )
    )  # fmt: skip
    assert server.get("/").text == "first"
    site.write_text(site.read_text().replace("'first'", "'second'"))
    wait_for(lambda: server.get("/").text == "second", 60, message="the edited file served")
    server.signal(signal.SIGINT)
    assert server.wait_exit(30) == 0, server.output()


# -- nanodjango ------------------------------------------------------------------------------


def test_a_nanodjango_file_with_a_job(folder, started):
    pytest.importorskip("nanodjango")
    (folder / "counter.py").write_text(COUNTER)
    state = ["--state-dir", str(folder / "state")]
    migrated = run([TWISTD, "-n", "--pidfile=", "lrp", "--app", "counter.py:app", "--migrate", *state], folder)  # fmt: skip
    assert migrated.returncode == 0, migrated.stdout + migrated.stderr
    assert "Creating table counter_countlog" in migrated.stdout
    server = started(
        LRPProcess("--app", "counter.py:app", "--workers=1", settings=None, cwd=folder, tmp=folder)
    )
    assert server.get("/").text == "<p>Number of page loads: 1</p>"
    assert server.get("/").text == "<p>Number of page loads: 2</p>"
    # nanodjango's own database, beside the file.
    assert (folder / "db.sqlite3").exists()
    # @app.admin: the admin is there (its login page first).
    admin = server.get("/admin/")
    assert admin.status == 302 and "/admin/login/" in admin.headers["location"]

    job_id = server.get("/tally").text

    def finished():
        info = server.get(f"/jobs/{job_id}").json()
        return info if info["state"] == "succeeded" else None

    info = wait_for(finished, 90, message="the nanodjango file's job")
    assert info["progress"] == [3, 3, "tallying"]
    assert info["result"]["count"] == 2
    assert info["result"]["pid"] in children_of(server.proc.pid)


# -- errors: one line each -------------------------------------------------------------------


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode != 0, result.stdout + result.stderr
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


def test_errors_are_one_line(folder):
    (folder / "kinds.py").write_text(KINDS)
    (folder / "needs.py").write_text(
        "from django.conf import settings\n\nKEY = settings.WEATHER_API_KEY\n\n\n"
        "def app(request):\n    pass\n"
    )
    (folder / "script.py").write_text(
        "from twistedlrp import serve\nfrom django.conf import settings\n\n"
        "KEY = settings.WEATHER_API_KEY\nserve(lambda request: None)\n"
    )
    lrp = [TWISTD, "-n", "--pidfile=", "lrp", "--state-dir", str(folder / "state")]

    line = one_line_error(run([*lrp, "--app", "nope.py"], folder))
    assert line == f"twistd lrp: error: --app nope.py: no such file: {folder / 'nope.py'}"
    line = one_line_error(run([*lrp, "--app", "kinds.py:KINDS_MISSING"], folder))
    assert (
        line == "twistd lrp: error: --app kinds.py:KINDS_MISSING: kinds.py has no 'KINDS_MISSING'"
    )
    line = one_line_error(run([*lrp, "--app", "kinds.py:NUMBER"], folder))
    assert line == (
        "twistd lrp: error: --app kinds.py:NUMBER: expected a view (a callable taking a "
        "request), a Router, a list of URL patterns or a WSGI application, got int 42"
    )
    line = one_line_error(run([*lrp, "--app", "needs.py"], folder))
    assert line == (
        "twistd lrp: error: needs.py needs the setting WEATHER_API_KEY, which the defaults "
        "do not give: add --set WEATHER_API_KEY=VALUE (or serve(..., WEATHER_API_KEY=...))"
    )
    given = run([*lrp, "--app", "needs.py", "--set", "WEATHER_API_KEY=k", "--migrate"], folder)
    assert given.returncode == 0, given.stdout + given.stderr
    # python FILE: its own first run reads the setting too.
    line = one_line_error(run([sys.executable, "script.py"], folder))
    assert line == (
        "script.py: error: script.py needs the setting WEATHER_API_KEY, which the defaults "
        "do not give: add --set WEATHER_API_KEY=VALUE to the command line"
    )
    (folder / "served.py").write_text(
        "from twistedlrp import serve\n\nserve(lambda request: None)\n"
    )
    line = one_line_error(run([sys.executable, "served.py", "--threads", "x"], folder))
    assert line == "served.py: error: --threads: expected a whole number, got 'x'"
    shutil.rmtree(folder / "state", ignore_errors=True)
