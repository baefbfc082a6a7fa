"""
``--web-workers N`` against real processes: the main process runs the job
service and the ``once`` hooks and hands the listening sockets to N web
processes, which it restarts when they die and drains on SIGTERM.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import textwrap
import time

import psutil
from jobsupport import api, start_server

from support import TESTSITE, BackgroundRequest, LRPProcess, request, wait_for


def health(server) -> dict:
    return server.get("/-/health", timeout=10).json()


def web_pids(server, count: int = 2) -> dict[int, int]:
    """Wait until the health endpoint lists C{count} running web processes; index -> pid."""

    def listed():
        section = health(server).get("web_workers")
        if not section:
            return None
        running = {w["index"]: w["pid"] for w in section["workers"] if w["state"] == "running"}
        return running if len(running) == count else None

    return wait_for(listed, 30, interval=0.1, message="every web process running in /-/health")


def tree(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def gone(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def distinct_pids(server, count: int = 2, path: str = "/environ") -> set[int]:
    """Request C{path} on new connections until C{count} different pids answered."""
    seen: set[int] = set()

    def enough():
        response = request(server.port, path, timeout=10)
        assert response.status == 200, response.text
        seen.add(response.json()["pid"])
        return len(seen) >= count

    wait_for(enough, 30, interval=0.0, message=f"{count} web processes answering")
    return seen


def test_two_web_processes_serve_report_and_drain(lrp_server):
    server = lrp_server("--web-workers", "2", "--no-jobs", "--graceful-timeout", "10")
    main = server.proc.pid
    pids = web_pids(server)
    assert main not in pids.values()
    # Views answer from both web processes, never from the main process.
    assert distinct_pids(server) == set(pids.values())
    response = request(server.port, "/hello")
    assert response.status == 200 and response.text == "hello\n"
    assert request(server.port, "/environ").json()["wsgi.multiprocess"] is True
    # Each web process's health lists them all, with their threads.
    body = health(server)
    assert body["status"] == "running" and body["pid"] in pids.values()
    section = body["web_workers"]
    assert section["main_pid"] == main and section["size"] == 2
    for worker in section["workers"]:
        assert worker["threads"]["size"] == 8
    every = tree(main)
    assert {p.pid for p in every} >= set(pids.values())
    # Forked from one template, the main process's child, although the test
    # site's views import the reactor (never run there: it is renewed in each).
    (template,) = {psutil.Process(pid).ppid() for pid in pids.values()}
    assert psutil.Process(template).ppid() == main
    assert "each web process forks and gives it a poller and a waker" in server.output()

    # SIGTERM drains every web process: a slow request in flight finishes.
    slow = BackgroundRequest(server.port, "/sleep?seconds=2")
    slow.start()

    def busy():
        section = health(server)["web_workers"]
        return any(w.get("threads", {}).get("busy") for w in section["workers"])

    wait_for(busy, 10, interval=0.05, message="the slow request to be running")
    stopped_at = time.monotonic()
    server.signal(signal.SIGTERM)
    assert server.wait_exit(15) == 0
    assert time.monotonic() - stopped_at < 10
    outcome = slow.outcome()
    assert not isinstance(outcome, Exception), outcome
    assert outcome.status == 200 and outcome.json()["slept"] == 2
    wait_for(lambda: all(gone(p) for p in every), 10, message="every process to be gone")
    output = server.output()
    assert "2 web processes of 8 threads each" in output
    assert "Traceback" not in output


def test_a_killed_web_process_is_restarted_and_requests_keep_succeeding(lrp_server):
    server = lrp_server("--web-workers", "2", "--no-jobs")
    pids = web_pids(server)
    victim = pids[0]
    os.kill(victim, signal.SIGKILL)
    failures = []

    def restarted():
        response = request(server.port, "/hello", timeout=10)
        if response.status != 200:
            failures.append(response.status)
        now = web_pids(server)
        return now if now[0] != victim else None

    now = wait_for(restarted, 30, interval=0.05, message="web process 0 to be restarted")
    assert failures == []
    assert now[1] == pids[1]
    assert set(distinct_pids(server)) == set(now.values())
    section = health(server)["web_workers"]
    assert [w["restarts"] for w in section["workers"]] == [1, 0]
    assert f"Web process 0 (pid {victim}) exited (signal SIGKILL)" in server.output()
    assert "restarting it in 0.5 s" in server.output()
    assert server.stop() == 0


def test_a_job_submitted_from_a_web_process_runs_in_the_main_process_workers(template, tmp_path):
    server = start_server(template, tmp_path / "server", "--web-workers", "2", "--workers", "1")
    try:
        pids = web_pids(server)
        body = api(server, "submit", name="testapp.jobs.whoami")
        assert body["pid"] in pids.values()
        info = api(server, "wait", id=body["job"]["id"], timeout=20)["job"]
        assert info["state"] == "succeeded", info
        worker = info["result"]["pid"]
        assert psutil.Process(worker).ppid() == server.proc.pid
        # The job service's health section reaches the web processes' endpoint.
        assert "workers" in health(server)["jobs"]
        assert server.stop() == 0
    finally:
        server.kill()


def test_once_hooks_run_in_the_main_process_and_plain_hooks_in_each_web_process(
    lrp_server, tmp_path
):
    events = tmp_path / "events"
    server = lrp_server(
        "--web-workers", "2", "--no-jobs", env={"LRP_TEST_ONCE_EVENTS": str(events)}
    )
    pids = set(web_pids(server).values())
    main = server.proc.pid

    def noted(kind):
        lines = events.read_text().split("\n") if events.exists() else []
        return sorted(int(line.split()[1]) for line in lines if line.startswith(kind + " "))

    assert noted("once-startup") == [main]
    assert set(noted("each-startup")) == pids and len(noted("each-startup")) == 2
    # The test site's own (plain) hook prepared the value its view shows, in each.
    for _ in range(10):
        assert request(server.port, "/hook").json()["value"] == "computed-by-hook"
    assert server.stop() == 0
    assert noted("once-shutdown") == [main]
    assert set(noted("each-shutdown")) == pids
    assert noted("once-startup") == [main]


def test_a_failing_plain_hook_fails_the_start(lrp_server):
    server = lrp_server(
        "--web-workers", "2", "--no-jobs", env={"LRP_TEST_HOOK_FAIL": "1"}, wait=False
    )
    assert server.wait_exit(60) == 1
    output = server.output()
    assert "the test asked this hook to fail" in output
    assert "failed to start" in output


PRELOAD_SITE = {
    "presite/__init__.py": "",
    "presite/settings.py": """
        SECRET_KEY = "tests-only"
        ALLOWED_HOSTS = ["*"]
        INSTALLED_APPS = []
        ROOT_URLCONF = "presite.urls"
        DATABASES = {}
        USE_TZ = True
    """,
    "presite/urls.py": """
        import os

        from django.http import JsonResponse
        from django.urls import path


        def pid(request):
            return JsonResponse({"pid": os.getpid(), "ppid": os.getppid()})


        urlpatterns = [path("pid", pid)]
    """,
}


def test_web_processes_fork_from_a_warm_template_when_the_site_allows(tmp_path):
    site = tmp_path / "site"
    for name, text in PRELOAD_SITE.items():
        (site / name).parent.mkdir(parents=True, exist_ok=True)
        (site / name).write_text(textwrap.dedent(text))
    server = LRPProcess(
        "--web-workers", "2", "--no-jobs", settings="presite.settings", cwd=site, tmp=tmp_path
    )
    server.start()
    try:
        pids = web_pids(server)
        assert "fork from it and share its memory" in server.output()
        answers = {}

        def both():
            body = request(server.port, "/pid").json()
            answers[body["pid"]] = body["ppid"]
            return len(answers) == 2

        wait_for(both, 30, interval=0.0, message="both web processes answering")
        assert set(answers) == set(pids.values())
        (template_pid,) = set(answers.values())
        assert psutil.Process(template_pid).ppid() == server.proc.pid
        assert server.stop() == 0
    finally:
        server.kill()


def test_reload_serves_a_change_with_two_web_processes(tmp_path):
    site = tmp_path / "site"
    shutil.copytree(TESTSITE, site, ignore=shutil.ignore_patterns("__pycache__", "*.sqlite3"))
    server = LRPProcess(
        "--reload",
        "--graceful-timeout=3",
        "--web-workers",
        "2",
        "--no-jobs",
        cwd=site,
        tmp=tmp_path,
    )
    server.start()
    try:
        web_pids(server)
        assert server.get("/hello").text == "hello\n"
        views = site / "testapp" / "views.py"
        source = views.read_text()
        views.write_text(source.replace('b"hello\\n"', 'b"hello again\\n"', 1))

        def changed():
            response = request(server.port, "/hello", timeout=10)
            return response.status == 200 and response.text == "hello again\n"

        wait_for(changed, 60, interval=0.1, message="the change to be served")
        web_pids(server)
        everything = tree(server.proc.pid)
        server.signal(signal.SIGINT)
        assert server.wait_exit(30) == 0
        wait_for(lambda: all(gone(p) for p in everything), 10, message="every process gone")
    finally:
        for child in tree(server.proc.pid):
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass
        server.kill()


def test_a_second_signal_ends_every_process_at_once(lrp_server):
    server = lrp_server("--web-workers", "2", "--no-jobs", "--graceful-timeout", "30")
    web_pids(server)
    every = tree(server.proc.pid)
    slow = BackgroundRequest(server.port, "/sleep?seconds=20")
    slow.start()

    def busy():
        section = health(server)["web_workers"]
        return any(w.get("threads", {}).get("busy") for w in section["workers"])

    wait_for(busy, 10, interval=0.05, message="the slow request to be running")
    stopped_at = time.monotonic()
    server.signal(signal.SIGTERM)
    wait_for(lambda: "shutting down gracefully" in server.output(), 10, message="the first")
    server.signal(signal.SIGTERM)
    assert server.wait_exit(10) == 1
    assert time.monotonic() - stopped_at < 10
    wait_for(lambda: all(gone(p) for p in every), 10, message="every process to be gone")


SYSTEMD_WRAPPER = """
import os, socket, sys
sock = socket.socket()
sock.bind(("127.0.0.1", int(sys.argv[1])))
sock.listen(50)
os.dup2(sock.fileno(), 3)
os.set_inheritable(3, True)
os.environ["LISTEN_FDS"] = "1"
os.environ["LISTEN_FDNAMES"] = "http"
os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(sys.argv[2], sys.argv[2:])
"""


class _Activated(LRPProcess):
    """A server started as systemd would: its socket bound, as descriptor 3, by its parent."""

    wrapper = ""

    @property
    def command(self) -> list[str]:
        return [sys.executable, self.wrapper, str(self.port), *super().command]


def test_systemd_socket_activation_passes_the_socket_on(tmp_path):
    wrapper = tmp_path / "activate.py"
    wrapper.write_text(SYSTEMD_WRAPPER)
    server = _Activated(
        "--web-workers", "2", "--no-jobs", "--listen", "systemd:domain=INET:index=0", tmp=tmp_path
    )
    server.wrapper = str(wrapper)
    server.start()
    try:
        pids = web_pids(server)
        assert distinct_pids(server) == set(pids.values())
        assert server.stop() == 0
    finally:
        server.kill()


def test_without_preloading_each_web_process_is_execd(lrp_server):
    server = lrp_server("--web-workers", "2", "--no-jobs", env={"LRP_WEB_NO_PRELOAD": "1"})
    pids = web_pids(server)
    assert distinct_pids(server) == set(pids.values())
    for pid in pids.values():
        assert "--web" in psutil.Process(pid).cmdline()
    assert "LRP_WEB_NO_PRELOAD is set" in server.output()
    assert request(server.port, "/hook").json()["value"] == "computed-by-hook"
    assert server.stop() == 0
