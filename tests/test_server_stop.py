"""Shut-down: the DESIGN's order, the graceful deadline and the second signal."""

import signal
import time
from pathlib import Path

import pytest

from support import BackgroundRequest, port_open, wait_for


def _events(path: Path) -> list[str]:
    if not path.exists():
        return []
    return [line.split()[0] for line in path.read_text().splitlines()]


def _busy(server) -> int:
    return server.get("/-/health").json()["threads"]["busy"]


def test_sigterm_lets_the_request_in_flight_finish_and_runs_shutdown_hooks(lrp_server, tmp_path):
    events = tmp_path / "events"
    server = lrp_server(
        "--workers", "0", "--graceful-timeout", "20", env={"LRP_TEST_EVENTS": str(events)}
    )
    slow = BackgroundRequest(server.port, "/sleep?seconds=3")
    slow.start()
    wait_for(lambda: _busy(server) == 1, message="the slow request to hold a thread")
    signalled = time.monotonic()
    server.signal(signal.SIGTERM)
    # New connections are refused while the slow request is still running.
    wait_for(lambda: not port_open(server.port), timeout=5, message="the port to close")
    assert slow.is_alive()
    response = slow.outcome()
    assert not isinstance(response, Exception), response
    assert response.status == 200
    assert response.json()["slept"] == 3
    assert response.headers["connection"] == "close"
    assert server.wait_exit(20) == 0
    # It waited for the request, not for the whole graceful timeout.
    assert time.monotonic() - signalled < 15
    # Shut-down hooks ran after the request, newest registration first.
    order = [e for e in _events(events) if e.startswith("shutdown")]
    assert order == ["shutdown-last-registered", "shutdown-first-registered"]
    assert "Received SIGTERM" in server.output()


def test_a_request_that_ends_during_the_drain_is_in_the_access_log_file(lrp_server, tmp_path):
    access_log = tmp_path / "access.log"
    server = lrp_server("--workers", "0", "--access-log", str(access_log))
    slow = BackgroundRequest(server.port, "/sleep?seconds=2")
    slow.start()
    wait_for(lambda: _busy(server) == 1, message="the slow request to hold a thread")
    server.signal(signal.SIGTERM)
    assert slow.outcome().status == 200
    assert server.wait_exit(20) == 0
    assert '"GET /sleep?seconds=2 HTTP/1.1" 200' in access_log.read_text()


def test_sigint_is_graceful_too(lrp_server, tmp_path):
    events = tmp_path / "events"
    server = lrp_server("--workers", "0", env={"LRP_TEST_EVENTS": str(events)})
    server.signal(signal.SIGINT)
    assert server.wait_exit(20) == 0
    assert "shutdown-first-registered" in _events(events)


def test_idle_keep_alive_connections_are_closed(lrp_server):
    import socket

    server = lrp_server("--workers", "0")
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.sendall(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
    first = sock.recv(4096)
    assert first.startswith(b"HTTP/1.1 200")
    server.signal(signal.SIGTERM)
    # The server closes the idle connection: recv returns end-of-file.
    deadline = time.monotonic() + 10
    rest = b""
    while time.monotonic() < deadline:
        chunk = sock.recv(4096)
        if not chunk:
            break
        rest += chunk
    else:
        raise AssertionError("the idle connection stayed open")
    sock.close()
    assert server.wait_exit(20) == 0


@pytest.mark.alone  # measures time
def test_a_request_longer_than_the_graceful_timeout_is_cut_at_the_deadline(lrp_server, tmp_path):
    events = tmp_path / "events"
    server = lrp_server(
        "--workers", "0", "--graceful-timeout", "2", env={"LRP_TEST_EVENTS": str(events)}
    )
    slow = BackgroundRequest(server.port, "/sleep?seconds=30", timeout=60)
    slow.start()
    wait_for(lambda: _busy(server) == 1, message="the slow request to hold a thread")
    signalled = time.monotonic()
    server.signal(signal.SIGTERM)
    code = server.wait_exit(15)
    took = time.monotonic() - signalled
    assert code == 0
    assert took < 2 + 1.5, f"exit took {took:.1f} s for a 2 s graceful timeout"
    # The client's connection was cut, not answered.
    assert isinstance(slow.outcome(), Exception)
    # Shut-down hooks still ran.
    assert "shutdown-first-registered" in _events(events)
    assert "draining requests did not finish before the graceful deadline" in server.output()


def test_a_second_signal_exits_at_once(lrp_server):
    server = lrp_server("--workers", "0", "--graceful-timeout", "60")
    slow = BackgroundRequest(server.port, "/sleep?seconds=30", timeout=60)
    slow.start()
    wait_for(lambda: _busy(server) == 1, message="the slow request to hold a thread")
    server.signal(signal.SIGTERM)
    wait_for(lambda: not port_open(server.port), timeout=5, message="the port to close")
    started = time.monotonic()
    server.signal(signal.SIGTERM)
    code = server.wait_exit(10)
    assert time.monotonic() - started < 5
    assert code != 0
    assert "second SIGTERM: exiting at once" in server.output()


def test_registered_services_start_before_hooks_and_stop_after_them(lrp_server, tmp_path):
    events = tmp_path / "events"
    server = lrp_server("--workers", "0", env={"LRP_TEST_EVENTS": str(events)})
    data = server.get("/service").json()
    assert data["running"] is True
    assert "no service named 'no-such-service'" in data["missing"]
    assert "recorder" in data["missing"]
    assert server.stop() == 0
    order = _events(events)
    # Start: the service's Deferred is awaited before the first start-up hook.
    assert order.index("service-start-end") < order.index("startup-begin")
    # Stop: shut-down hooks first, then the service.
    assert order.index("shutdown-first-registered") < order.index("service-stop")


def test_a_connection_accepted_before_sigterm_has_its_first_request_answered(lrp_server):
    import socket

    server = lrp_server("--workers", "0", "--graceful-timeout", "20")
    # Two connections accepted before the signal; neither has sent a byte.
    late = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    silent = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    # The listening socket's backlog is first in, first out: a connection
    # made after them is answered only once both were accepted.
    assert server.get("/hello").status == 200
    signalled = time.monotonic()
    server.signal(signal.SIGTERM)
    wait_for(lambda: not port_open(server.port), timeout=5, message="the port to close")
    # The listening has stopped; the first request still arrives in time.
    late.sendall(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
    answer = b""
    while chunk := late.recv(4096):
        answer += chunk
    late.close()
    assert answer.startswith(b"HTTP/1.1 200"), answer
    assert b"connection: close" in answer.lower()
    assert answer.endswith(b"hello\n")
    # The one that never sends is closed after the short grace, not held to
    # the graceful deadline.
    assert silent.recv(4096) == b""
    silent.close()
    assert server.wait_exit(20) == 0
    assert time.monotonic() - signalled < 10
