"""call_in_reactor and twistedlrp.http in a process with no running reactor."""

import json
import subprocess
import sys

from support import HERE


def test_call_in_reactor_and_http_from_a_process_without_a_reactor(lrp_server):
    # No job service: its store has no tables here, and health would say "degraded".
    server = lrp_server("--no-jobs")
    result = subprocess.run(
        [sys.executable, str(HERE / "programs" / "reactor_in_a_thread.py"), str(server.port)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["plain"] == {"value": 5}
    # It started the reactor in a daemon thread of its own.
    assert out["thread"] == {"value": "twistedlrp-reactor"}
    assert out["deferred"] == {"value": "later"}
    assert out["coroutine"] == {"value": "from a coroutine"}
    assert out["error"]["error"] == "KeyError"
    assert out["timeout"]["error"] == "TimeoutError"
    assert out["timeout_took"] < 2
    assert out["timeout_cancelled_the_deferred"] is True
    assert out["from_reactor_thread"]["error"] == "RuntimeError"
    assert "from the reactor thread" in out["from_reactor_thread"]["message"]
    assert out["http_get"] == {"value": "hello\n"}
    assert out["http_json"] == {"value": "running"}
    assert out["http_refused"]["error"] == "HTTPConnectionError"
    assert "127.0.0.1:1" in out["http_refused"]["message"]
    assert out["http_timeout"]["error"] == "HTTPTimeout"
    assert out["woken_by_shutdown"]["error"] == "ShutdownInProgress"
    assert out["woken_after"] < 5
    assert out["after_shutdown"]["error"] == "ShutdownInProgress"
    assert out["shutdown_error_is_runtime_error"] is True
