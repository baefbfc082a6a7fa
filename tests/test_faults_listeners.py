"""
The job listeners under abuse, against a real server: a huge box or PB
message before login, a client that never logs in, a flood of connections
that do not log in, a box over the payload limit after login; and the
refusal to start on a state directory or secret file others may use.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import json
import select
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from jobsupport import AMPClient, api, start_server
from twisted.spread import banana

from support import free_port, port_open, run_to_exit, wait_for

SECRET = b"a long random secret for the listener tests"
LOGIN_TIMEOUT = 5  # LRP_JOBS_LOGIN_TIMEOUT of the server below
MB = 1024 * 1024


def secret_file(directory, mode=0o600):
    path = directory / "secret"
    path.write_bytes(SECRET + b"\n")
    path.chmod(mode)
    return path


@pytest.fixture(scope="module")
def node(template, tmp_path_factory):
    """A server with AMP and PB on TCP, whose clients must log in within 5 s."""
    tmp = tmp_path_factory.mktemp("listeners")
    site = tmp / "site"
    site.mkdir()
    (site / "listener_settings.py").write_text(
        f"from testsite.settings import *  # noqa\nLRP_JOBS_LOGIN_TIMEOUT = {LOGIN_TIMEOUT}\n"
    )
    amp_port, pb_port = free_port(), free_port()
    server = start_server(
        template,
        tmp / "server",
        "--jobs-listen",
        f"tcp:{amp_port}:interface=127.0.0.1",
        "--pb-listen",
        f"tcp:{pb_port}:interface=127.0.0.1",
        "--jobs-secret-file",
        str(secret_file(tmp)),
        "--workers",
        "1",
        "--pythonpath",
        str(site),
        "--settings",
        "listener_settings",
    )
    server.amp_port, server.pb_port = amp_port, pb_port
    wait_for(lambda: port_open(amp_port) and port_open(pb_port), 10, message="job listeners")
    yield server
    server.kill()


def rss(server) -> int:
    return psutil.Process(server.proc.pid).memory_info().rss


def logged_in_client(port: int) -> AMPClient:
    client = AMPClient("127.0.0.1", port)
    nonce = client.call("Challenge")[b"nonce"]
    digest = hmac.new(SECRET, b"twistedlrp-jobs-login:" + nonce, hashlib.sha256).digest()
    assert client.call("Login", digest=digest)[b"ok"] == b"True"
    return client


def stats_work(client: AMPClient) -> bool:
    answer = client.call("Stats")
    return b"stats" in answer and b"_error_code" not in answer


def amp_string(data: bytes) -> bytes:
    return struct.pack("!H", len(data)) + data


def huge_submit(total: int, ask=b"1"):
    """The pieces of one Submit box whose payload claims C{total} bytes, 65,000 at a time."""
    count = -(-total // 65_000)
    yield (
        amp_string(b"_ask")
        + amp_string(ask)
        + amp_string(b"_command")
        + amp_string(b"Submit")
        + amp_string(b"name")
        + amp_string(b"testapp.jobs.add")
        + amp_string(b"payload")
        + amp_string(str(count).encode())
    )
    piece = b"7" * 65_000
    for i in range(count):
        yield amp_string(b"payload.%d" % i) + amp_string(piece)
    yield b"\x00\x00"


def send_until_closed(sock: socket.socket, pieces) -> tuple[int, bool]:
    """@return: (bytes sent, whether the server closed the connection meanwhile)."""
    sent = 0
    try:
        for piece in pieces:
            sock.sendall(piece)
            sent += len(piece)
    except (BrokenPipeError, ConnectionResetError):
        return sent, True
    return sent, False


def closed(sock: socket.socket) -> bool:
    """@return: whether the server closed C{sock} (without waiting)."""
    readable, _, _ = select.select([sock], [], [], 0)
    if not readable:
        return False
    try:
        return sock.recv(65536) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True


# -- AMP --------------------------------------------------------------------------


def test_a_huge_box_before_login_is_cut_off(node):
    before = rss(node)
    sock = socket.create_connection(("127.0.0.1", node.amp_port), timeout=20)
    try:
        sent, was_closed = send_until_closed(sock, huge_submit(400 * MB))
    finally:
        sock.close()
    assert was_closed, f"sent all {sent} bytes"
    assert sent < 100 * MB  # what the socket buffers took before the server closed it
    grown = rss(node) - before
    assert grown < 50 * MB, f"the server grew by {grown / MB:.0f} MB"
    wait_for(
        lambda: "sent more than 4096 bytes before logging in: disconnected" in node.output(),
        10,
        message="the warning",
    )
    # The service is fine.
    client = logged_in_client(node.amp_port)
    assert stats_work(client)
    client.close()


def test_a_client_that_does_not_log_in_is_closed_after_the_deadline(node):
    silent = socket.create_connection(("127.0.0.1", node.amp_port), timeout=10)
    talker = AMPClient("127.0.0.1", node.amp_port)
    started = time.monotonic()
    try:
        assert b"nonce" in talker.call("Challenge")  # ... but no Login
        wait_for(lambda: closed(silent), LOGIN_TIMEOUT + 10, interval=0.05, message="closed")
        took = time.monotonic() - started
        assert LOGIN_TIMEOUT - 0.5 <= took <= LOGIN_TIMEOUT + 5, took
        assert talker.closed_by_server(5)
    finally:
        silent.close()
        talker.close()
    assert f"did not log in within {LOGIN_TIMEOUT} s: disconnected" in node.output()


def flood(port: int, source: str, count: int) -> list[socket.socket]:
    """C{count} connections from C{source} that never log in (closed ones are kept too)."""
    held = []
    for _ in range(count):
        sock = socket.socket()
        sock.settimeout(10)
        sock.bind((source, 0))
        sock.connect(("127.0.0.1", port))
        held.append(sock)
    return held


class Churn(threading.Thread):
    """Connects from C{source} as fast as it can without logging in, holding the last C{hold}."""

    def __init__(self, port: int, source: str, hold: int = 1000):
        super().__init__(daemon=True)
        self.port, self.source, self.hold = port, source, hold
        self.held: collections.deque[socket.socket] = collections.deque()
        self.opened = 0
        self.done = threading.Event()

    def run(self):
        while not self.done.is_set():
            try:
                self.held.extend(flood(self.port, self.source, 1))
                self.opened += 1
            except OSError:
                continue
            while len(self.held) > self.hold:
                self.held.popleft().close()

    def __enter__(self):
        self.start()
        wait_for(lambda: self.opened >= self.hold, 30, message=f"{self.hold} connections")
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.join(10)
        for sock in self.held:
            sock.close()


def timed_login(port: int) -> float:
    started = time.monotonic()
    client = logged_in_client(port)
    try:
        assert stats_work(client)
    finally:
        client.close()
    return time.monotonic() - started


@pytest.mark.alone  # measures time
def test_idle_connections_from_another_address_do_not_keep_a_client_out(node):
    client = logged_in_client(node.amp_port)
    held = flood(node.amp_port, "127.0.0.2", 1000)
    try:
        # 8 of them wait to log in; each new one closed the oldest from its address.
        wait_for(
            lambda: sum(map(closed, held)) >= 1000 - 8,
            LOGIN_TIMEOUT - 1,
            interval=0.05,
            message="closed",
        )
        assert sum(map(closed, held)) == 1000 - 8
        # A client from 127.0.0.1 logs in at once, and the one logged in before is fine.
        assert timed_login(node.amp_port) < 1
        assert stats_work(client)
    finally:
        for sock in held:
            sock.close()
    # The same while 127.0.0.2 opens new connections without end.
    with Churn(node.amp_port, "127.0.0.2") as churn:
        # At least 10 logins, while at least 200 more connections come from 127.0.0.2.
        times, until = [], churn.opened + 200
        deadline = time.monotonic() + 30
        while (len(times) < 10 or churn.opened < until) and time.monotonic() < deadline:
            times.append(timed_login(node.amp_port))
        assert churn.opened >= until, (churn.opened, until)
        slowest = max(times)
    # Typically 0.1-0.2 s here; once in CI 1.07 s with the machine otherwise
    # idle. Kept out, as before the per-address limit, means every login
    # refused for the whole flood.
    assert slowest < 2, slowest
    client.close()
    output = node.output()
    assert "8 connections from 127.0.0.2 were waiting to log in, the most allowed from one " in (
        output
    )
    assert "Job client 127.0.0.2:" in output


def test_when_all_addresses_together_fill_the_listener_a_new_client_still_logs_in(node):
    # 8 addresses × 8 connections: the 64 the listener lets wait.
    held = [sock for n in range(3, 11) for sock in flood(node.amp_port, f"127.0.0.{n}", 8)]
    try:
        # One more, from another address, closes the one that waited longest.
        assert timed_login(node.amp_port) < 1
        wait_for(lambda: closed(held[0]), 2, interval=0.05, message="the oldest closed")
        assert not any(closed(sock) for sock in held[1:])
    finally:
        for sock in held:
            sock.close()
    assert "64 connections were waiting to log in, the most allowed; a new one took" in (
        node.output()
    )


def _try_login(port):
    try:
        return logged_in_client(port)
    except (ConnectionError, KeyError, OSError):
        return None


def test_a_box_over_the_payload_limit_after_login_is_refused_as_it_arrives(node):
    client = logged_in_client(node.amp_port)
    try:
        # Just over --max-job-payload (1 MiB): the service's own refusal, the connection stays.
        client.sock.sendall(b"".join(huge_submit(MB + 10_000, ask=b"50")))
        answer = client.read_box()
        assert answer[b"_error_code"] == b"PAYLOAD_TOO_LARGE", answer
        assert b"limit of 1048576 bytes (--max-job-payload)" in answer[b"_error_description"]
        assert stats_work(client)

        # 200 MB in one box: refused while it arrives, the rest read and dropped.
        before = rss(node)
        sent, was_closed = send_until_closed(client.sock, huge_submit(200 * MB, ask=b"51"))
        assert not was_closed, sent
        answer = client.read_box()
        assert answer[b"_error"] == b"51"
        assert answer[b"_error_code"] == b"PAYLOAD_TOO_LARGE", answer
        assert b"larger than the job service takes in one message" in answer[b"_error_description"]
        assert client.closed_by_server(10)
        grown = rss(node) - before
        assert grown < 50 * MB, f"the server grew by {grown / MB:.0f} MB"
    finally:
        client.close()
    assert "sent a Submit of more than 1310720 bytes" in node.output()


# -- Perspective Broker --------------------------------------------------------------


def b128(number: int) -> bytes:
    pieces = []
    banana.int2b128(number, pieces.append)
    return b"".join(pieces)


def test_a_huge_pb_message_before_login_is_cut_off(node):
    def message():
        # A list of 600 strings of 600 KiB: Banana would keep them all until the end.
        yield b128(600) + banana.LIST
        string = b128(600 * 1024) + banana.STRING + b"p" * (600 * 1024)
        for _ in range(600):
            yield string

    before = rss(node)
    sock = socket.create_connection(("127.0.0.1", node.pb_port), timeout=20)
    try:
        sent, was_closed = send_until_closed(sock, message())
    finally:
        sock.close()
    assert was_closed, f"sent all {sent} bytes"
    assert sent < 100 * MB
    grown = rss(node) - before
    assert grown < 50 * MB, f"the server grew by {grown / MB:.0f} MB"
    wait_for(
        lambda: (
            "PB job client" in node.output()
            and "sent more than 4096 bytes before logging in" in node.output()
        ),
        10,
        message="the warning",
    )


def pb_login(port: int, times: int = 1) -> dict:
    """@return: what tests/programs/pb_login.py says of C{times} logins from 127.0.0.1."""
    program = Path(__file__).parent / "programs" / "pb_login.py"
    done = subprocess.run(
        [sys.executable, str(program), str(port), SECRET.decode(), "127.0.0.1", str(times)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.alone  # measures time
def test_idle_pb_connections_from_another_address_do_not_keep_a_client_out(node):
    held = flood(node.pb_port, "127.0.0.2", 1000)
    try:
        wait_for(
            lambda: sum(map(closed, held)) >= 1000 - 8,
            LOGIN_TIMEOUT - 1,
            interval=0.05,
            message="closed",
        )
        answer = pb_login(node.pb_port)
    finally:
        for sock in held:
            sock.close()
    assert answer.get("stats"), answer
    assert answer["seconds"] < 1, answer
    with Churn(node.pb_port, "127.0.0.2") as churn:
        before = churn.opened
        answer = pb_login(node.pb_port, times=5)
        # Still churning (a connect can wait a second on a full backlog, longer
        # than the five logins took).
        wait_for(lambda: churn.opened > before, 15, message="another connection from 127.0.0.2")
    assert answer.get("stats") and answer["seconds"] < 1, answer
    assert "failed to log in" not in node.output()


# -- permissions -----------------------------------------------------------------------


def test_open_permissions_stop_the_server(template, tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    state.chmod(0o777)
    code, output = run_to_exit("--state-dir", str(state))
    assert code == 1, output
    assert (
        f"twistd lrp: error: --state-dir {state} is writable by others (mode 0777): chmod 700 "
        "it, or pass --allow-open-permissions\n"
    ) in output

    secret = secret_file(tmp_path, 0o644)
    code, output = run_to_exit(
        "--jobs-listen", "tcp:0:interface=127.0.0.1", "--jobs-secret-file", str(secret)
    )
    assert code == 1, output
    assert output.strip() == (
        f"twistd lrp: error: --jobs-secret-file {secret} is readable by others (mode 0644): "
        "chmod 600 it, or pass --allow-open-permissions"
    )

    # Allowed explicitly: the server starts, with its UNIX socket in the
    # state directory and a PB listener that uses the secret.
    pb_port = free_port()
    server = start_server(
        template,
        tmp_path / "server",
        "--state-dir",
        str(state),
        "--pb-listen",
        f"tcp:{pb_port}:interface=127.0.0.1",
        "--jobs-secret-file",
        str(secret),
        "--allow-open-permissions",
        "--workers",
        "0",
    )
    try:
        assert (state / "jobs.sock").exists()
        # The site's view reaches the job service through that socket.
        assert api(server, "submit", name="testapp.jobs.add", args=[1, 2])["job"]["id"]
        assert port_open(pb_port)
    finally:
        server.kill()
