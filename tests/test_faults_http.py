"""
Faults on the HTTP side, against real servers: slow and oversized request
heads, bare LF line ends, forwarded hops that are not addresses, a client
that stops reading a streaming response, and a slowloris of 1,500
connections against the default connection cap (docs/serving.md, "Limits").

Every socket here is on loopback; every loop is bounded and every socket is
closed at the end.
"""

from __future__ import annotations

import contextlib
import resource
import shutil
import socket
import time

import psutil
import pytest
from jobsupport import api, make_template_db

from support import LRPProcess, wait_for

HEADER_TIMEOUT = 1.0
WRITE_TIMEOUT = 1.0


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One server with short limits, for the tests that do not need their own."""
    server = LRPProcess(
        "--no-jobs",
        "--threads",
        "2",
        "--header-timeout",
        str(HEADER_TIMEOUT),
        "--max-header-size",
        "4096",
        "--write-timeout",
        str(WRITE_TIMEOUT),
        "--proxy-headers",
        tmp=tmp_path_factory.mktemp("faults"),
    )
    server.start()
    yield server
    server.kill()


def _connect(port: int, timeout: float = 10.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


def _read_to_close(sock: socket.socket, timeout: float = 10.0) -> bytes:
    """Everything the server sends until it closes (a reset counts as closed)."""
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def _busy(server) -> int:
    return server.get("/-/health").json()["threads"]["busy"]


# -- the request-head deadline ------------------------------------------------


def test_a_slowloris_head_gets_408_at_the_deadline(server):
    with _connect(server.port) as sock:
        started = time.monotonic()
        sock.sendall(b"GET /hello HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        # One byte every 0.2 s never resets the deadline; stop once answered.
        sock.settimeout(0.2)
        answer = b""
        for _ in range(50):
            try:
                answer = sock.recv(65536)
                break
            except TimeoutError:
                sock.sendall(b"a")
        elapsed = time.monotonic() - started
        answer += _read_to_close(sock)
    assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), answer
    assert b"\r\nConnection: close\r\n" in answer
    assert answer.endswith(b"\r\n\r\nRequest head not received in time.\n")
    assert HEADER_TIMEOUT * 0.9 <= elapsed < HEADER_TIMEOUT + 2


def test_a_connection_that_sends_nothing_is_closed_at_the_deadline(server):
    with _connect(server.port) as sock:
        started = time.monotonic()
        assert _read_to_close(sock) == b""
        elapsed = time.monotonic() - started
    assert HEADER_TIMEOUT * 0.9 <= elapsed < HEADER_TIMEOUT + 2


def test_each_request_on_a_keep_alive_connection_gets_its_own_deadline(server):
    with _connect(server.port) as sock:
        # A view slower than the head deadline: the head was complete, so no 408.
        sock.sendall(b"GET /sleep?seconds=1.3 HTTP/1.1\r\nHost: x\r\n\r\n")
        first = b""
        while b'"slept": 1.3' not in first:
            chunk = sock.recv(65536)
            assert chunk, first
            first += chunk
        assert first.startswith(b"HTTP/1.1 200 ")
        # The connection is older than the deadline now; the next head is
        # timed from its own first byte.
        sent = time.monotonic()
        sock.sendall(b"GET /hello HTTP/1.1\r\n")
        answer = _read_to_close(sock)
        elapsed = time.monotonic() - sent
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert HEADER_TIMEOUT * 0.9 <= elapsed < HEADER_TIMEOUT + 2


# -- the size of the head, and bad heads ---------------------------------------


def _head(pad: int, count: int = 1) -> bytes:
    return (
        b"GET /hello HTTP/1.1\r\nHost: x\r\n"
        + b"".join(b"X-Pad-%d: %s\r\n" % (i, b"p" * pad) for i in range(count))
        + b"\r\n"
    )


def test_a_head_over_max_header_size_gets_431_and_close(server):
    with _connect(server.port) as sock:
        sock.sendall(_head(3000))
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
    for head in (_head(5000), _head(100, count=60), _head(10, count=501)):
        with _connect(server.port) as sock:
            sock.sendall(head)
            answer = _read_to_close(sock)
        assert answer.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n"), answer
        assert b"\r\nConnection: close\r\n" in answer
        assert answer.endswith(b"\r\n\r\nRequest header fields too large.\n")


def test_a_header_line_sent_without_end_gets_431(server):
    with _connect(server.port) as sock:
        sock.sendall(b"GET /hello HTTP/1.1\r\nX-Endless: ")
        for _ in range(10):
            try:
                sock.sendall(b"e" * 1000)
            except (BrokenPipeError, ConnectionResetError):
                break
        answer = _read_to_close(sock)
    assert answer.startswith(b"HTTP/1.1 431 "), answer


def test_bare_line_feeds_get_400_and_close(server):
    with _connect(server.port) as sock:
        sock.sendall(b"GET / HTTP/1.1\nHost: x\n\n")
        started = time.monotonic()
        answer = _read_to_close(sock)
    assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n"), answer
    assert b"\r\nConnection: close\r\n" in answer
    # At once, not at the head deadline.
    assert time.monotonic() - started < HEADER_TIMEOUT
    # The server is fine.
    assert server.get("/hello").status == 200


# -- forwarded hops ----------------------------------------------------------


@pytest.mark.parametrize(
    "forwarded, client",
    [
        ("unknown", "127.0.0.1"),
        ("<script>", "127.0.0.1"),
        ("203.0.113.9, unknown", "127.0.0.1"),
        ("6.6.6.6, <script>, 203.0.113.9", "203.0.113.9"),
    ],
)
def test_a_forwarded_hop_that_is_not_an_address_is_ignored(server, forwarded, client):
    data = server.get("/environ", headers={"X-Forwarded-For": forwarded}).json()
    assert data["REMOTE_ADDR"] == client


# -- a client that reads nothing -------------------------------------------------


def test_a_client_that_stops_reading_a_stream_frees_its_thread(server):
    sock = socket.socket()
    try:
        # A small window and small segments, so that the kernel buffers fill quickly.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 536)
        sock.settimeout(10)
        sock.connect(("127.0.0.1", server.port))
        sock.sendall(b"GET /stream?count=5000000 HTTP/1.1\r\nHost: x\r\n\r\n")
        wait_for(lambda: _busy(server) == 1, timeout=10, message="the stream holding a thread")
        started = time.monotonic()
        # The client reads nothing: once the buffers are full, the thread
        # waits at most --write-timeout, then gives up.
        wait_for(lambda: _busy(server) == 0, timeout=20, message="the thread freed")
        freed_after = time.monotonic() - started
        # The connection was cut: what is left to read ends in a close or reset.
        _read_to_close(sock)
    finally:
        sock.close()
    assert freed_after < 15
    assert server.get("/hello").status == 200
    log = server.output()
    warnings = [
        line for line in log.splitlines() if "#warn]" in line and "Streaming GET /stream" in line
    ]
    assert len(warnings) == 1, log[-3000:]
    assert "the client did not read the response within 1 s" in warnings[0]
    assert "Error in the WSGI application" not in log


# -- a slowloris of 1,500 connections ---------------------------------------------


@contextlib.contextmanager
def _open_file_limit(soft: int):
    """Give processes started inside the block an open-file limit of C{soft}."""
    old_soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, hard), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (old_soft, hard))


def _alive(sock: socket.socket) -> bool:
    """Whether the (non-blocking) C{sock} is still open at the server's end."""
    try:
        return sock.recv(1) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False


def _http_connections(process: psutil.Process, port: int) -> int:
    return sum(
        1
        for c in process.net_connections("tcp")
        if c.laddr and c.laddr.port == port and c.status == psutil.CONN_ESTABLISHED
    )


def test_health_views_and_jobs_work_under_a_slowloris_of_1500_connections(tmp_path):
    flood = 1500
    if resource.getrlimit(resource.RLIMIT_NOFILE)[1] < flood + 100:
        pytest.skip("the hard open-file limit is too low for 1,500 sockets")
    template = make_template_db(tmp_path)
    (tmp_path / "server").mkdir()
    shutil.copy(template, tmp_path / "server" / "db.sqlite3")
    server = LRPProcess(
        "--threads",
        "4",
        "--workers",
        "1",
        env={"LRP_TEST_DB": str(tmp_path / "server" / "db.sqlite3")},
        tmp=tmp_path / "server",
        listen=False,
    )
    # A backlog that holds the burst of connects (with twisted's default of
    # 50 a burst overflows it, and the kernel makes the client retry a
    # second later: slow, not wrong).
    server.args += ["--listen", f"tcp:{server.port}:interface=127.0.0.1:backlog=2048"]
    # The common default soft limit, and the default --max-connections for it
    # (1024 - 128 - 4 x 4 threads - 10 x 1 worker = 870): fewer than the flood.
    cap = 1024 - 128 - 4 * 4 - 10 * 1
    with _open_file_limit(1024):
        server.start()
    sockets: list[socket.socket] = []
    try:
        process = psutil.Process(server.proc.pid)
        assert server.get("/hello").status == 200
        fds_before, rss_before = process.num_fds(), process.memory_info().rss
        for i in range(flood):
            sock = _connect(server.port)
            sockets.append(sock)
            sock.sendall(b"GET /hello HTTP/1.1\r\nHost: x\r\nX-Slow-%d: " % i)
            sock.setblocking(False)
        for round_ in range(3):
            # Each slow connection sends one more byte of its endless head.
            for sock in sockets:
                with contextlib.suppress(OSError):
                    sock.send(b"s")
            started = time.monotonic()
            health = server.get("/-/health", timeout=5)
            assert health.status == 200
            # The reactor is not starved by the slow connections.
            assert time.monotonic() - started < 2
            assert server.get("/hello", timeout=5).body == b"hello\n"
            job = api(server, "add", a=round_, b=1)["job"]
            done = api(server, "wait", id=job["id"], timeout=10)["job"]
            assert (done["state"], done["result"]) == ("succeeded", round_ + 1)
            assert time.monotonic() - started < 10
            # At most the cap is open: the connections that waited longest
            # for a head made room.
            assert _http_connections(process, server.port) <= cap
        # The slow connections that are left: at most the cap, and no fewer
        # than the room our own requests took.
        alive = sum(map(_alive, sockets))
        assert cap - 50 < alive <= cap
        rss_grown = process.memory_info().rss - rss_before
        # About 4 KiB a connection, measured; 32 MiB would be 37 KiB each.
        assert rss_grown < 32 * 1024 * 1024, f"the server grew by {rss_grown} bytes"
        for sock in sockets:
            sock.close()
        wait_for(lambda: process.num_fds() <= fds_before + 5, timeout=10, message="fds released")
        assert server.get("/-/health").json()["status"] == "running"
    finally:
        for sock in sockets:
            sock.close()
        server.kill()
    log = server.output()
    assert "Too many open files" not in log and "EMFILE" not in log
    assert "HTTP connections are open (--max-connections)" in log
