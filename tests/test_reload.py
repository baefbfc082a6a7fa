"""
``twistd lrp --reload`` against real processes: a copy of the test site is
served, its source is changed, and the supervisor must restart the server
without refusing a connection, survive broken code, and take the whole
process tree down on Ctrl-C.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time

import psutil
import pytest

from support import TESTSITE, LRPProcess, request, wait_for

HELLO = 'return HttpResponse(b"hello\\n", content_type="text/plain")'


@pytest.fixture
def site(tmp_path):
    """A private copy of the test site, free to edit."""
    target = tmp_path / "site"
    shutil.copytree(TESTSITE, target, ignore=shutil.ignore_patterns("__pycache__", "*.sqlite3"))
    return target


@pytest.fixture
def supervisor(tmp_path, site):
    started = []

    def start(*args, env=None, wait=True):
        server = LRPProcess(
            "--reload", "--graceful-timeout=3", *args, cwd=site, env=env, tmp=tmp_path
        )
        started.append(server)
        return server.start(wait=wait)

    yield start
    for server in started:
        _kill_tree(server)


def _kill_tree(server: LRPProcess) -> None:
    if server.proc is None:
        return
    try:
        for child in psutil.Process(server.proc.pid).children(recursive=True):
            try:
                os.killpg(child.pid, signal.SIGKILL)
            except OSError:
                pass
    except psutil.NoSuchProcess:
        pass
    server.kill()


def set_hello(site, text: str) -> None:
    views = site / "testapp" / "views.py"
    source = views.read_text()
    start = source.index("def hello(request):")
    end = source.index("\n\n\n", start)
    views.write_text(
        source[:start]
        + f'def hello(request):\n    return HttpResponse(b"{text}\\n", content_type="text/plain")'
        + source[end:]
    )


def assert_never_loops(output: str) -> None:
    """Every start after the first follows a change of a watched file."""
    starts = output.count("failed to start") + output.count("twistedlrp running (pid")
    assert starts <= 1 + output.count("changed: restarting the server"), output


class Client(threading.Thread):
    """Requests /hello over and over, on a new connection each time."""

    def __init__(self, port: int):
        super().__init__(daemon=True)
        self.port = port
        self.results: list[tuple[float, object]] = []
        self.done = threading.Event()

    def run(self):
        while not self.done.is_set():
            try:
                response = request(self.port, "/hello", timeout=10)
                outcome = (response.status, response.text)
            except Exception as e:
                outcome = e
            self.results.append((time.monotonic(), outcome))
            self.done.wait(0.02)  # pacing, like a busy browser; not synchronisation

    def stop(self):
        self.done.set()
        self.join(15)
        assert not self.is_alive()

    def failures(self):
        return [r for _, r in self.results if not (isinstance(r, tuple) and r[0] == 200)]


@pytest.mark.alone  # measures time
def test_change_is_served_within_two_seconds_and_no_request_fails(supervisor, site):
    server = supervisor()
    assert "Django loaded in the supervisor: False" in server.output()
    assert server.get("/hello").text == "hello\n"

    client = Client(server.port)
    client.start()
    try:
        wait_for(lambda: len(client.results) >= 5, 30, message="the client's first answers")
        # A burst of saves, as an editor that writes several times makes.
        changed_at = time.monotonic()
        for i in range(3):
            set_hello(site, f"hello v{i}")
        wait_for(
            lambda: any(r == (200, "hello v2\n") for _, r in client.results),
            5,
            message="the new response",
        )
        first_new = min(t for t, r in client.results if r == (200, "hello v2\n"))
        assert first_new - changed_at < 2.0, first_new - changed_at
        count = len(client.results)
        wait_for(lambda: len(client.results) > count + 5, 30, message="more answers")
    finally:
        client.stop()
    assert client.failures() == []
    assert server.get("/hello").text == "hello v2\n"
    # One restart for the burst.
    assert server.output().count("testapp/views.py changed") == 1, server.output()


def test_syntax_error_keeps_supervisor_up_and_fix_restarts(supervisor, site):
    server = supervisor()
    views = site / "testapp" / "views.py"
    good = views.read_text()
    views.write_text(good.replace("def hello(request):", "def hello(request)"))
    wait_for(lambda: "failed to start" in server.output(), 30, message="the error")
    output = server.output()
    assert "SyntaxError" in output
    assert "views.py" in output
    assert server.proc.poll() is None
    # The previous server still answers.
    assert server.get("/hello").text == "hello\n"

    views.write_text(good.replace('b"hello\\n"', 'b"hello fixed\\n"'))
    wait_for(
        lambda: server.get("/hello", timeout=10).text == "hello fixed\n",
        30,
        message="the fixed code",
    )
    # One attempt per change: it never loops.
    assert server.output().count("testapp/views.py changed") == 2
    assert_never_loops(server.output())


def test_broken_at_start_waits_for_a_fix(supervisor, site):
    checks = site / "testapp" / "checks.py"
    views = site / "testapp" / "views.py"
    good = views.read_text()
    views.write_text(good + "\ndef broken(:\n    pass\n")
    server = supervisor(wait=False)
    wait_for(lambda: "failed to start" in server.output(), 20, message="the error")
    assert server.proc.poll() is None
    # Meanwhile the supervisor answers itself, with the error.
    page = server.get("/hello", timeout=5)
    assert page.status == 503
    assert "SyntaxError" in page.text and "views.py" in page.text
    views.write_text(good)
    server.wait_ready(10)
    assert server.get("/hello").text == "hello\n"
    assert_never_loops(server.output())
    # A failing system check is reported the same way.
    checks.write_text(checks.read_text().replace('os.environ.get("LRP_TEST_CHECK_ERROR")', "True"))
    wait_for(lambda: "testapp.E001" in server.output(), 30, message="the check error")
    assert server.get("/hello").text == "hello\n"


def test_module_outside_the_site_is_watched_once_imported(supervisor, site, tmp_path):
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "greeting.py").write_text('TEXT = "from lib v1"\n')
    urls = site / "testsite" / "urls.py"
    urls.write_text(
        urls.read_text()
        + "\n\nimport greeting  # noqa: E402\nfrom django.http import HttpResponse  # noqa: E402\n"
        "urlpatterns.append(path('greeting', lambda r: HttpResponse(greeting.TEXT)))\n"
    )
    server = supervisor(env={"PYTHONPATH": str(lib)})
    assert server.get("/greeting").text == "from lib v1"
    (lib / "greeting.py").write_text('TEXT = "from lib v2"\n')
    wait_for(lambda: server.get("/greeting").text == "from lib v2", 30, message="the new text")
    # Broken, then fixed: the file the traceback names stays watched.
    (lib / "greeting.py").write_text('TEXT = "from lib v3\n')
    wait_for(lambda: "failed to start" in server.output(), 30, message="the error")
    assert "greeting.py" in server.output()
    (lib / "greeting.py").write_text('TEXT = "from lib v3"\n')
    wait_for(lambda: server.get("/greeting").text == "from lib v3", 30, message="the fix")


def test_polling_fallback(supervisor, site):
    server = supervisor(env={"LRP_RELOAD_POLL": "1"})
    assert "(polling)" in server.output()
    set_hello(site, "hello polled")
    wait_for(lambda: server.get("/hello").text == "hello polled\n", 30, message="the change")
    # Templates too, without a restart.
    pid = _template_page(server.port)["pid"]
    (site / "testapp" / "templates" / "testapp" / "page.html").write_text("page polled\n")
    wait_for(
        lambda: _template_page(server.port) == {"pid": pid, "text": "page polled\n"},
        30,
        message="the new template from the same server",
    )
    assert server.output().count("changed: restarting the server") == 1


def _group_members(pgid: int) -> list[int]:
    members = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                members.append(proc.pid)
        except (ProcessLookupError, psutil.NoSuchProcess):
            pass
    return members


def test_sigint_ends_the_whole_tree_within_the_graceful_timeout(supervisor, site):
    # A view that leaves a process behind which ignores SIGTERM, like a
    # stuck job worker would be.
    views = site / "testapp" / "views.py"
    views.write_text(
        views.read_text() + "\n\ndef stubborn(request):\n"
        "    import subprocess, sys\n"
        "    code = 'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "time.sleep(120)'\n"
        "    proc = subprocess.Popen([sys.executable, '-c', code])\n"
        "    return JsonResponse({'pid': proc.pid})\n"
    )
    urls = site / "testsite" / "urls.py"
    urls.write_text(urls.read_text().replace("]\n", "    path('stubborn', views.stubborn),\n]\n"))
    server = supervisor()
    stubborn = server.get("/stubborn").json()["pid"]
    supervisor_pid = server.proc.pid
    # The server, and perhaps a spare that waits for the next restart.
    children = [p.pid for p in psutil.Process(supervisor_pid).children()]
    server_pid = os.getpgid(stubborn)
    assert server_pid in children
    # Each leads its own process group (once its first line has run).
    wait_for(lambda: all(os.getpgid(pid) == pid for pid in children), 5, message="process groups")
    assert server_pid != os.getpgid(supervisor_pid)
    tree = [supervisor_pid, *(p.pid for p in psutil.Process(supervisor_pid).children(True))]
    assert stubborn in tree

    # A long request in flight.
    slow = threading.Thread(
        target=lambda: _ignore_errors(request, server.port, "/sleep?seconds=30", timeout=15),
        daemon=True,
    )
    slow.start()
    wait_for(lambda: _busy(server), 5, message="the request in flight")

    signalled = time.monotonic()
    server.signal(signal.SIGINT)
    server.wait_exit(10)

    def gone():
        return not [p for p in tree if psutil.pid_exists(p) and not _zombie(p)] and not any(
            _group_members(pid) for pid in children
        )

    wait_for(gone, 30, message="every process of the tree to end")
    took = time.monotonic() - signalled
    assert took < 3 + 1.5, took
    assert "Received SIGINT" in server.output()
    assert "supervisor is gone" not in server.output()


def _ignore_errors(function, *args, **kwargs):
    try:
        return function(*args, **kwargs)
    except Exception:
        return None


def _busy(server) -> bool:
    try:
        return server.get("/-/health", timeout=2).json().get("threads", {}).get("busy", 0) > 0
    except Exception:
        return False


def _zombie(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_sigint_while_a_job_runs_leaves_no_worker(supervisor, site, tmp_path):
    from jobsupport import api, make_template_db, read_pid

    db = make_template_db(tmp_path)
    markers = tmp_path / "markers"
    markers.mkdir()
    server = supervisor("--workers=1", env={"LRP_TEST_DB": str(db)})
    supervisor_pid = server.proc.pid
    api(server, "submit", name="testapp.jobs.sleeper", args=[str(markers), 60, "long"])
    worker = read_pid(markers / "long-started", 20)
    tree = [supervisor_pid, *(p.pid for p in psutil.Process(supervisor_pid).children(True))]
    assert worker in tree
    groups = {os.getpgid(pid) for pid in tree} - {os.getpgid(supervisor_pid)}

    signalled = time.monotonic()
    server.signal(signal.SIGINT)
    server.wait_exit(10)

    def gone():
        return not [p for p in tree if psutil.pid_exists(p) and not _zombie(p)] and not any(
            _group_members(g) for g in groups
        )

    wait_for(gone, 30, message="every process of the tree to end")
    took = time.monotonic() - signalled
    assert took < 3 + 1.5, took


def test_server_stops_when_the_supervisor_is_killed(supervisor):
    server = supervisor()
    supervisor_pid = server.proc.pid
    children = [p.pid for p in psutil.Process(supervisor_pid).children()]
    assert children
    os.kill(supervisor_pid, signal.SIGKILL)
    server.wait_exit(5)
    wait_for(
        lambda: not [p for p in children if psutil.pid_exists(p) and not _zombie(p)],
        3 + 2,
        message="the server and the spare to notice",
    )
    assert "The reload supervisor is gone: stopping the server" in server.output()


def _unix_get(path: str, url: str) -> tuple[int, str]:
    import http.client
    import socket

    class Connection(http.client.HTTPConnection):
        def connect(self):
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(10)
            self.sock.connect(path)

    conn = Connection("localhost")
    try:
        conn.request("GET", url)
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def test_unix_socket_keeps_its_path_and_mode_across_restarts(tmp_path, site):
    import stat

    path = str(tmp_path / "http.sock")
    server = LRPProcess(
        "--reload",
        "--graceful-timeout=3",
        f"--listen=unix:{path}:mode=600",
        listen=False,
        cwd=site,
        tmp=tmp_path,
    )
    try:
        server.start(wait=False)
        wait_for(lambda: os.path.exists(path), 30, message="the socket")
        assert wait_for(lambda: _ignore_errors(_unix_get, path, "/hello"), 20) == (200, "hello\n")
        set_hello(site, "hello unix")
        wait_for(
            lambda: _ignore_errors(_unix_get, path, "/hello") == (200, "hello unix\n"),
            30,
            message="the new code on the UNIX socket",
        )
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        set_hello(site, "hello again")
        wait_for(
            lambda: _ignore_errors(_unix_get, path, "/hello") == (200, "hello again\n"),
            30,
            message="a second restart",
        )
        server.signal(signal.SIGINT)
        server.wait_exit(10)
        # The supervisor, which bound it, removes it.
        assert not os.path.exists(path)
    finally:
        _kill_tree(server)


# -- templates: reloaded, not the server ------------------------------------------------


def _template_page(port: int) -> dict:
    response = request(port, "/template", timeout=10)
    assert response.status == 200, response.text
    return response.json()


def _startups(events) -> int:
    return events.read_text().count("startup-begin") if events.exists() else 0


def test_template_change_reloads_the_templates_not_the_server(supervisor, site, tmp_path):
    import http.client

    from jobsupport import api, job_state, make_template_db, read_pid

    events = tmp_path / "events"
    markers = tmp_path / "markers"
    markers.mkdir()
    db = make_template_db(tmp_path)
    server = supervisor("--workers=1", env={"LRP_TEST_EVENTS": str(events), "LRP_TEST_DB": str(db)})
    page = site / "testapp" / "templates" / "testapp" / "page.html"
    first = _template_page(server.port)
    assert first["text"] == "page v1\n"
    assert _startups(events) == 1
    # A job that runs through the change, and a keep-alive connection.
    job = api(server, "submit", name="testapp.jobs.sleeper", args=[str(markers), 30, "long"])["job"]
    worker = read_pid(markers / "long-started", 20)
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request("GET", "/template")
    assert conn.getresponse().read()
    local = conn.sock.getsockname()
    wait_for(
        lambda: "template directories: a template change" in server.output(),
        30,
        message="the template directories watched",
    )

    # Not a template (outside the template directories): runserver ignores it too.
    (site / "notes.html").write_text("<p>notes</p>\n")
    page.write_text("page v2\n")
    wait_for(
        lambda: _template_page(server.port)["text"] == "page v2\n", 10, message="the new template"
    )
    # The same server: same pid, its start-up hooks did not run again, the
    # job still runs in the same worker, the connection still serves.
    assert _template_page(server.port)["pid"] == first["pid"]
    assert _startups(events) == 1
    assert job_state(server, job["id"])["state"] == "running"
    assert os.path.exists(f"/proc/{worker}") and not (markers / "long-done").exists()
    conn.request("GET", "/template")
    assert b"page v2" in conn.getresponse().read()
    assert conn.sock is not None and conn.sock.getsockname() == local
    conn.close()
    output = server.output()
    assert (
        "testapp/templates/testapp/page.html changed: templates reloaded without a restart"
        in output
    ), output
    assert "restarting the server" not in output
    assert "notes.html" not in output

    # A .py file still restarts the server.
    set_hello(site, "hello restarted")
    wait_for(
        lambda: server.get("/hello").text == "hello restarted\n", 10, message="the restarted server"
    )
    assert _template_page(server.port)["pid"] != first["pid"]
    assert _startups(events) == 2
    assert "notes.html" not in server.output()


def test_template_change_reaches_every_web_process(supervisor, site, tmp_path):
    once_events = tmp_path / "once-events"
    server = supervisor(
        "--web-workers=2", "--no-jobs", env={"LRP_TEST_ONCE_EVENTS": str(once_events)}
    )
    page = site / "testapp" / "templates" / "testapp" / "page.html"

    def answers(text: str) -> set[int]:
        """Pids of the web processes that answered C{text}, on new connections, until both did."""
        seen: dict[int, str] = {}

        def both():
            body = _template_page(server.port)
            seen[body["pid"]] = body["text"]
            return len(seen) >= 2 and all(t == text for t in seen.values())

        wait_for(both, 30, interval=0.0, message=f"both web processes answering {text!r}")
        return set(seen)

    pids = answers("page v1\n")
    started = once_events.read_text().count("each-startup")
    assert started == 2
    wait_for(
        lambda: "template directories: a template change" in server.output(),
        30,
        message="the template directories watched",
    )
    page.write_text("page v2\n")
    # Every web process answers the new text (each caches the template it
    # rendered before): the same processes, none started again.
    assert answers("page v2\n") == pids
    assert once_events.read_text().count("each-startup") == started
    # The server logs once its own loaders are reset, which may come after
    # the web processes already answer with the new text.
    wait_for(
        lambda: (
            "templates reloaded without a restart; 2 web processes told to reload theirs"
            in server.output()
        ),
        30,
        message="the reload logged",
    )
    assert "restarting the server" not in server.output()
