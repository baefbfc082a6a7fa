"""Start-up: the DESIGN's order, the plugin, and every way start-up can fail."""

import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from support import ROOT, TESTSITE, TWISTD, free_port, port_open, request, run_to_exit, wait_for


def _events(path: Path) -> list[str]:
    if not path.exists():
        return []
    return [line.split()[0] for line in path.read_text().splitlines()]


def test_port_opens_only_after_startup_hooks_and_every_first_request_sees_their_result(
    lrp_server, tmp_path
):
    events = tmp_path / "events"
    imports = tmp_path / "imports"
    server = lrp_server(
        "--workers",
        "0",
        env={
            "LRP_TEST_HOOK_SLEEP": "2",
            "LRP_TEST_EVENTS": str(events),
            "LRP_TEST_IMPORT_LOG": str(imports),
        },
        wait=False,
    )
    # 30 clients hammer the port and fire the moment it accepts.
    results: list = []
    go = threading.Event()

    def client():
        go.wait(30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                response = request(server.port, "/hook", timeout=10)
            except OSError:
                time.sleep(0.005)
                continue
            results.append((response.status, response.json()["value"]))
            return
        results.append(("timeout", None))

    clients = [threading.Thread(target=client) for _ in range(30)]
    for thread in clients:
        thread.start()
    wait_for(lambda: "startup-begin" in _events(events), message="the start-up hook to begin")
    go.set()
    # While the 2-second hook runs, the port stays closed.
    assert not port_open(server.port)
    assert "startup-end" not in _events(events)
    for thread in clients:
        thread.join(60)
    assert results == [(200, "computed-by-hook")] * 30
    # The settings module was imported once in the server process, under one name.
    lines = [line.split() for line in imports.read_text().splitlines()]
    in_server = [line for line in lines if int(line[0]) == server.proc.pid]
    assert len(in_server) == 1, lines
    assert in_server[0][1] == "testsite.settings"
    assert server.stop() == 0


def test_health_endpoint_reports_state_and_threads(lrp_server):
    # No job service: its store has no tables here, and it would say "degraded".
    server = lrp_server("--threads", "3", "--no-jobs")
    response = server.get("/-/health")
    assert response.status == 200
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["status"] == "running"
    # Threads that stream and that wait in job calls, with their limits (half of --threads).
    job_calls = {"busy": 0, "max": 1, "refused": 0}
    assert body["threads"] == {
        "busy": 0,
        "idle": 3,
        "size": 3,
        "streaming": 0,
        "job_calls": job_calls,
    }
    assert body["waiting"] == 0
    # --no-jobs without a job node: the link is reported, and the node stays healthy.
    assert body["job_link"]["state"] in ("down", "connecting")
    assert body["uptime"] >= 0
    assert body["pid"] == server.proc.pid


def test_health_path_option(lrp_server):
    server = lrp_server("--no-jobs", "--health-path", "/healthz", wait=False)
    wait_for(lambda: port_open(server.port), message="port")
    assert server.get("/healthz").json()["status"] == "running"
    # The old path is now an ordinary URL of the site (404 from Django).
    assert server.get("/-/health").status == 404


def test_no_settings_is_a_clear_error():
    code, output = run_to_exit(settings=None, env={"DJANGO_SETTINGS_MODULE": ""})
    assert code != 0
    assert "twistd lrp: error: no Django settings" in output


def test_unimportable_settings_is_a_clear_error():
    code, output = run_to_exit(settings="nosuchsite.settings")
    assert code != 0
    assert "twistd lrp: error: cannot import settings module 'nosuchsite.settings'" in output
    assert "Traceback" not in output


def test_system_check_error_aborts_with_the_check_message():
    code, output = run_to_exit(env={"LRP_TEST_CHECK_ERROR": "1"})
    assert code != 0
    assert "twistd lrp: error: system check found 1 error" in output
    assert "testapp.E001" in output
    assert "the test asked for a check error" in output


def test_port_in_use_is_a_clear_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        code, output = run_to_exit("--workers", "0", "--listen", f"tcp:{port}:interface=127.0.0.1")
    assert code != 0
    assert f"twistd lrp: error: cannot listen on tcp:{port}:interface=127.0.0.1" in output
    assert "Address already in use" in output


def test_failing_startup_hook_stops_the_server_with_its_traceback():
    code, output = run_to_exit("--workers", "0", env={"LRP_TEST_HOOK_FAIL": "1"})
    assert code != 0
    assert (
        "twistd lrp: error: start-up hook testapp.lrp.slow_start failed: "
        "ValueError: the test asked this hook to fail" in output
    )
    assert "Traceback" in output
    assert 'lrp.py", line' in output


def test_bad_option_values_get_one_line_naming_the_option():
    cases = [
        (["--threads", "0"], "--threads: must be at least 1"),
        (["--threads", "many"], "--threads: expected a whole number"),
        (["--graceful-timeout", "soon"], "--graceful-timeout: expected a number of seconds"),
        (["--listen", "nonsense:1"], "--listen: bad endpoint 'nonsense:1'"),
        (["--static", "static"], "--static: expected PREFIX=DIR"),
        (["--max-body-size", "-1"], "--max-body-size: must be at least 0"),
        (["--forwarded-allow-ips", "not-an-ip"], "--forwarded-allow-ips: not an address"),
        (["--health-path", "health"], "--health-path: must start with '/'"),
        (["--jobs-listen", "tcp:9999"], "--jobs-listen: a network listener (tcp:9999) requires"),
        (["--no-such-option"], "no-such-option"),
    ]
    for args, expected in cases:
        result = subprocess.run(
            [TWISTD, "-n", "--pidfile=", "lrp", "--settings", "testsite.settings", *args],
            cwd=TESTSITE,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode != 0, args
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, (args, result.stderr)
        assert lines[0].startswith("twistd lrp: error: "), lines
        assert expected in lines[0], (args, lines[0])


def test_lrp_help_documents_every_option():
    result = subprocess.run(
        [TWISTD, "lrp", "--help"], capture_output=True, text=True, timeout=60, cwd=TESTSITE
    )
    assert result.returncode == 0
    for option in [
        "--settings",
        "--pythonpath",
        "--listen",
        "--threads",
        "--graceful-timeout",
        "--static",
        "--access-log",
        "--max-body-size",
        "--proxy-headers",
        "--forwarded-allow-ips",
        "--health-path",
    ]:
        assert option in result.stdout, option


def test_dropin_imports_neither_the_reactor_nor_django():
    script = (
        "import sys\n"
        "from twisted.plugin import getPlugins\n"
        "from twisted.application.service import IServiceMaker\n"
        "names = [p.tapname for p in getPlugins(IServiceMaker)]\n"
        "assert 'lrp' in names, names\n"
        "bad = [m for m in ('twisted.internet.reactor', 'django', 'twistedlrp.tap') if m in sys.modules]\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert result.stdout.strip() == "ok", result.stderr


def test_the_demo_site_serves_its_page_and_css(lrp_server, tmp_path):
    example = ROOT / "example"
    db = tmp_path / "demo.sqlite3"
    env = {"LRP_DEMO_DB": str(db)}
    subprocess.run(
        [sys.executable, "manage.py", "migrate", "--noinput", "-v0"],
        cwd=example,
        env={**__import__("os").environ, **env},
        check=True,
        timeout=120,
    )
    server = lrp_server(
        "--workers",
        "0",
        "--static",
        f"/static/={ROOT / 'example' / 'demo' / 'static'}",
        settings="mysite.settings",
        cwd=example,
        env=env,
    )
    page = server.get("/")
    assert page.status == 200
    assert "46 primes below 200" in page.text
    css = server.get("/static/demo/site.css")
    assert css.status == 200
    assert css.headers["content-type"] == "text/css"


def test_listen_repeatable_and_pythonpath(lrp_server, tmp_path):
    first, other = free_port(), free_port()
    lrp_server(
        "--workers",
        "0",
        "--listen",
        f"tcp:{first}:interface=127.0.0.1",
        "--listen",
        f"tcp:{other}:interface=127.0.0.1",
        "--pythonpath",
        str(TESTSITE),
        cwd=tmp_path,
        wait=False,
    )
    wait_for(lambda: port_open(other), message="the second port")
    assert request(other, "/hello").body == b"hello\n"
    assert request(first, "/hello").body == b"hello\n"
