"""
Process faults with ``--web-workers 2``, against a real ``twistd lrp``: the
web process template killed while a client sends requests (the web
processes keep answering, a new template comes back and forks the
replacements), and a template that can no longer start (the server stops
with exit status 1, which systemd's ``Restart=on-failure`` acts on).
"""

from __future__ import annotations

import os
import signal
import threading
import time

import psutil
import pytest

from support import request, wait_for

# After the template's kill -9, requests are answered again within this.
RESUMED_WITHIN = 5.0


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


def template_of(server) -> psutil.Process | None:
    """The main process's live web process template, if it has one."""
    for child in psutil.Process(server.proc.pid).children():
        try:
            if "--template" in child.cmdline() and child.status() != psutil.STATUS_ZOMBIE:
                return child
        except psutil.NoSuchProcess:
            pass
    return None


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


class Client(threading.Thread):
    """Requests C{/hello}, each on a new connection, until stopped; every outcome is kept."""

    def __init__(self, port: int):
        super().__init__(daemon=True)
        self.port = port
        self.outcomes: list[tuple[float, object]] = []  # (when, status or exception)
        self.done = threading.Event()

    def run(self):
        while not self.done.is_set():
            try:
                outcome = request(self.port, "/hello", timeout=10).status
            except OSError as e:  # refused, reset, timed out
                outcome = e
            self.outcomes.append((time.monotonic(), outcome))
            self.done.wait(0.005)  # pacing on a shared machine, not a synchronisation

    def stop(self) -> list[tuple[float, object]]:
        self.done.set()
        self.join(30)
        assert not self.is_alive()
        return self.outcomes


@pytest.mark.alone  # measures time
def test_a_killed_template_comes_back_while_the_web_processes_keep_answering(lrp_server):
    server = lrp_server("--web-workers", "2", "--no-jobs")
    pids = web_pids(server)
    template = template_of(server)
    assert template is not None and {p.pid for p in template.children()} == set(pids.values())

    client = Client(server.port)
    client.start()
    wait_for(lambda: len(client.outcomes) >= 5, 10, message="the client's first answers")
    killed_at = time.monotonic()
    os.kill(template.pid, signal.SIGKILL)

    def back():
        new = template_of(server)
        return new if new is not None and new.pid != template.pid else None

    new_template = wait_for(back, 30, interval=0.05, message="a new template")
    wait_for(
        lambda: f"Web process template (pid {new_template.pid}) ready again" in server.output(),
        30,
        interval=0.05,
        message="the new template to be ready",
    )
    # The web processes the dead template forked are the same, still serving.
    assert web_pids(server) == pids
    # A web process killed now is replaced, forked from the new template.
    web_killed_at = time.monotonic()
    os.kill(pids[0], signal.SIGKILL)

    def replaced():
        now = web_pids(server)
        return now if now[0] != pids[0] else None

    now = wait_for(replaced, 30, interval=0.05, message="web process 0 to be replaced")
    assert now[1] == pids[1]
    assert psutil.Process(now[0]).ppid() == new_template.pid
    wait_for(
        lambda: any(when > time.monotonic() - 0.5 for when, _ in client.outcomes[-50:]),
        10,
        message="answers after the replacement",
    )
    outcomes = client.stop()

    # No request failed: nothing refused, reset or unanswered by a live web
    # process. The one this test kills may take the request it was answering
    # with it (its connection closed unanswered, at once).
    in_flight = [
        (when, o)
        for when, o in outcomes
        if isinstance(o, ConnectionError) and web_killed_at <= when < web_killed_at + 0.5
    ]
    assert len(in_flight) <= 1, in_flight
    failed = [
        (round(when - killed_at, 3), o)
        for when, o in outcomes
        if o != 200 and (when, o) not in in_flight
    ]
    assert failed == []
    after = [when for when, _ in outcomes if when > killed_at]
    assert after and after[0] - killed_at < RESUMED_WITHIN
    gaps = [b - a for a, b in zip([killed_at, *after], after, strict=False)]
    assert max(gaps) < RESUMED_WITHIN, max(gaps)

    output = server.output()
    assert f"The web process template (pid {template.pid}) ended (signal SIGKILL)" in output
    assert "the web processes keep serving; starting a new template in 0.5 s" in output
    assert f"Web process 0 (pid {pids[0]}) ended (its exit status went with its template)" in (
        output
    )
    assert "Traceback" not in output
    every = [pids[1], now[0], new_template.pid]
    assert server.stop() == 0
    wait_for(lambda: all(gone(pid) for pid in every), 10, message="every process gone")


def test_a_template_that_can_no_longer_start_stops_the_server_with_exit_status_1(
    lrp_server, tmp_path
):
    broken = tmp_path / "settings-broken"
    server = lrp_server(
        "--web-workers", "2", "--no-jobs", env={"LRP_TEST_SETTINGS_FAIL_IF": str(broken)}
    )
    pids = web_pids(server)
    template = template_of(server)
    # From now on a process that imports the settings fails: every new template.
    broken.write_text("")
    os.kill(template.pid, signal.SIGKILL)
    wait_for(
        lambda: "starting a new template in 1 s" in server.output(),
        30,
        interval=0.05,
        message="a new template to have failed",
    )
    # The web processes still answer while templates fail.
    response = request(server.port, "/hello", timeout=10)
    assert response.status == 200 and response.text == "hello\n"

    assert server.wait_exit(90) == 1
    output = server.output()
    assert "the test asked the settings to fail" in output  # a template's own output
    assert "The web process template failed 5 times in a row" in output
    assert "stopping the server with exit status 1" in output
    assert "twistd lrp: error: the web process template failed 5 times in a row" in output
    # The web processes were drained, not left behind.
    assert "twistedlrp stopped" in output
    wait_for(lambda: all(gone(pid) for pid in pids.values()), 10, message="web processes gone")
