"""``twistd -ny conf/lrp.tac`` serves the demo site in ``example/``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from support import ROOT, TWISTD, free_port, request, wait_for


def test_tac_serves_the_demo(tmp_path):
    env = dict(os.environ)
    env.pop("DJANGO_SETTINGS_MODULE", None)
    port = free_port()
    env.update(
        LRP_DEMO_DB=str(tmp_path / "demo.sqlite3"),
        LRP_LISTEN=f"tcp:{port}:interface=127.0.0.1",
        LRP_STATE_DIR=str(tmp_path / "state"),
        LRP_DEMO_STATIC_ROOT=str(tmp_path / "static"),
    )
    for command in (["migrate", "-v0"], ["collectstatic", "--noinput", "-v0"]):
        subprocess.run(
            [sys.executable, str(ROOT / "example" / "manage.py"), *command],
            env=env,
            check=True,
            timeout=120,
        )
    log = open(tmp_path / "output.log", "wb")
    proc = subprocess.Popen(
        [TWISTD, "-ny", "conf/lrp.tac", "--pidfile", str(tmp_path / "twistd.pid")],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    output = lambda: (tmp_path / "output.log").read_text(errors="replace")  # noqa: E731
    try:

        def home():
            assert proc.poll() is None, output()
            try:
                return request(port, "/", timeout=5)
            except OSError:
                return None

        response = wait_for(home, 60, message="the demo home page")
        assert response.status == 200
        assert "twistedlrp demo" in response.text
        # The start-up hook ran before the first request.
        assert "46 primes below 200" in response.text
        assert request(port, "/-/health").status == 200
        assert request(port, "/static/demo/site.css").status == 200

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert "demo: shut-down hook ran" in output()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        log.close()
