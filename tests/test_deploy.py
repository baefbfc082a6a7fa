"""
The production examples in ``conf/``: socket activation as ``lrp.socket`` and
``lrp.service`` set it up (systemd binds, ``--listen systemd:...`` adopts).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess

import pytest

from support import ROOT, TESTSITE, TWISTD, free_port, request, wait_for

ACTIVATE = shutil.which("systemd-socket-activate")


def unit_command() -> list[str]:
    """The ExecStart= command of conf/lrp.service, as arguments."""
    text = (ROOT / "conf" / "lrp.service").read_text()
    match = re.search(r"^ExecStart=(.*?)(?<!\\)$", text, re.M | re.S)
    return shlex.split(match.group(1).replace("\\\n", " "))


def test_service_unit_runs_twistd_in_the_foreground_with_the_systemd_endpoint():
    command = unit_command()
    assert command[1:4] == ["--nodaemon", "--pidfile=", "lrp"]
    assert command[command.index("--listen") + 1] == "systemd:domain=INET:index=0"
    assert "--config" in command


@pytest.mark.skipif(ACTIVATE is None, reason="systemd-socket-activate is not installed")
@pytest.mark.parametrize(
    "endpoint", ["systemd:domain=INET:index=0", "systemd:domain=INET:name=http"]
)
def test_socket_activation(tmp_path, endpoint):
    port = free_port()
    env = dict(os.environ)
    env.pop("DJANGO_SETTINGS_MODULE", None)
    env["LRP_TEST_DB"] = str(tmp_path / "db.sqlite3")
    log = open(tmp_path / "output.log", "wb")
    # As lrp.socket: systemd binds 127.0.0.1:PORT, names the socket "http",
    # and starts the service on the first connection.
    proc = subprocess.Popen(
        [
            ACTIVATE,
            "--listen",
            f"127.0.0.1:{port}",
            "--fdname=http",
            TWISTD,
            "--nodaemon",
            "--pidfile=",
            "lrp",
            "--settings=testsite.settings",
            f"--state-dir={tmp_path / 'state'}",
            f"--listen={endpoint}",
        ],
        cwd=TESTSITE,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    output = lambda: (tmp_path / "output.log").read_text(errors="replace")  # noqa: E731
    try:
        wait_for(lambda: "Listening on" in output(), 10, message="systemd-socket-activate")
        # This first request starts twistd; it waits in the backlog meanwhile.
        response = request(port, "/hello", timeout=60)
        assert response.status == 200, output()
        assert response.text == "hello\n"
        assert "twistedlrp running" in output()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        log.close()
