"""
Faults on the HTTP side, against real servers: slow and oversized request
heads, bare LF line ends, request targets that are not paths, two Host
headers, obs-fold, oversized chunk sizes, tokens in the access log, the
security headers of static answers, forwarded hops that are not addresses, clients
that stop reading a streaming response (cut at the write timeout; streams
take at most half the threads), and a slowloris of 1,500 connections
against the default connection cap (docs/serving.md, "Limits").

Every socket here is on loopback; every loop is bounded and every socket is
closed at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import socket
import stat
import time

import psutil
import pytest
from jobsupport import api, make_template_db

from support import LRPProcess, read_to_close, wait_for

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
        answer += read_to_close(sock)
    assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), answer
    assert b"\r\nConnection: close\r\n" in answer
    assert answer.endswith(b"\r\n\r\nRequest head not received in time.\n")
    assert HEADER_TIMEOUT * 0.9 <= elapsed < HEADER_TIMEOUT + 2


def test_a_connection_that_sends_nothing_is_closed_at_the_deadline(server):
    with _connect(server.port) as sock:
        started = time.monotonic()
        assert read_to_close(sock) == b""
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
        answer = read_to_close(sock)
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
            answer = read_to_close(sock)
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
        answer = read_to_close(sock)
    assert answer.startswith(b"HTTP/1.1 431 "), answer


def test_bare_line_feeds_get_400_and_close(server):
    with _connect(server.port) as sock:
        sock.sendall(b"GET / HTTP/1.1\nHost: x\n\n")
        started = time.monotonic()
        answer = read_to_close(sock)
    assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n"), answer
    assert b"\r\nConnection: close\r\n" in answer
    # At once, not at the head deadline.
    assert time.monotonic() - started < HEADER_TIMEOUT
    # The server is fine.
    assert server.get("/hello").status == 200


# -- request targets, Host headers, obs-fold, chunk sizes ----------------------------


def _ask(port: int, raw: bytes) -> bytes:
    with _connect(port) as sock:
        sock.sendall(raw)
        return read_to_close(sock)


def test_an_absolute_form_target_is_reduced_to_its_path_and_names_the_host(server):
    answer = _ask(
        server.port,
        b"GET http://evil.example:8080/environ?a=1 HTTP/1.1\r\nHost: x\r\n"
        b"Connection: close\r\n\r\n",
    )
    assert answer.startswith(b"HTTP/1.1 200 "), answer
    environ = json.loads(answer.split(b"\r\n\r\n", 1)[1])
    assert (environ["PATH_INFO"], environ["QUERY_STRING"]) == ("/environ", "a=1")
    # RFC 9112 section 3.3: the target's authority is the request's host.
    assert environ["headers"]["HTTP_HOST"] == "evil.example:8080"
    for target in (b"HTTP://h", b"http://h?x=1", b"https://h/"):
        answer = _ask(
            server.port, b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"hello\n"), answer
    assert "#critical]" not in server.output()


@pytest.mark.parametrize(
    "line, reason",
    [
        (b"GET * HTTP/1.1", b"* is a request target of OPTIONS only"),
        (b"POST * HTTP/1.1", b"* is a request target of OPTIONS only"),
        (b"GET hello HTTP/1.1", b"the request target must be a path"),
        (b"CONNECT evil:443 HTTP/1.1", b"the request target must be a path"),
        (b"GET ftp://evil/x HTTP/1.1", b"the request target must be a path"),
        (b"GET http://user@evil/x HTTP/1.1", b"the request target must be a path"),
        (b"GET http:///x HTTP/1.1", b"the request target must be a path"),
    ],
)
def test_a_target_that_is_not_a_path_gets_400_and_close(server, line, reason):
    answer = _ask(server.port, line + b"\r\nHost: x\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n"), answer
    assert b"\r\nConnection: close\r\n" in answer
    assert reason in answer
    assert "Error in the WSGI application" not in server.output()


def test_options_star_is_answered_by_the_server_on_a_kept_connection(server):
    with _connect(server.port) as sock:
        sock.sendall(b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\nGET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
        answers = b""
        while not answers.endswith(b"hello\n"):
            chunk = sock.recv(65536)
            assert chunk, answers
            answers += chunk
    first, second = answers.split(b"HTTP/1.1 ")[1:]
    assert first.startswith(b"200 OK\r\n") and b"\r\nContent-Length: 0\r\n" in first
    assert second.startswith(b"200 OK\r\n")


@pytest.mark.parametrize(
    "headers",
    [b"Host: x\r\nHost: y\r\n", b"Host: x\r\nhost: x\r\n", b"HOST: a\r\nX-A: 1\r\nHost: b\r\n"],
)
def test_two_host_headers_get_400(server, headers):
    answer = _ask(server.port, b"GET /hello HTTP/1.1\r\n" + headers + b"\r\n")
    assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n"), answer
    assert answer.endswith(b"Bad request: more than one Host header.\n")


@pytest.mark.parametrize("fold", [b" folded", b"\tfolded"])
def test_an_obs_fold_header_line_gets_400(server, fold):
    answer = _ask(server.port, b"GET /hello HTTP/1.1\r\nHost: x\r\nX-A: a\r\n" + fold + b"\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n"), answer
    assert answer.endswith(b"Bad request: a header line begins with whitespace.\n")


def _chunked(size_line: bytes) -> bytes:
    return (
        b"POST /body HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        + size_line
        + b"\r\nabc"
    )


def test_an_oversized_chunk_size_gets_400_at_once(server):
    started = time.monotonic()
    answer = _ask(server.port, _chunked(b"f" * 20))
    assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n"), answer
    assert answer.endswith(b"Bad request: chunk size too large.\n")
    assert time.monotonic() - started < 2


def test_a_chunk_larger_than_the_body_limit_gets_413_before_it_is_sent(server):
    # 1 GB in one chunk: refused on its size line (--max-body-size is 10 MiB).
    with _connect(server.port) as sock:
        started = time.monotonic()
        sock.sendall(_chunked(b"3b9aca00"))
        answer = b""
        while not answer.endswith(b"\r\n\r\nRequest body too large.\n"):
            chunk = sock.recv(65536)
            assert chunk, answer
            answer += chunk
        answered_after = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 413 "), answer
    assert answered_after < 2
    # A small chunked body is fine.
    answer = _ask(
        server.port,
        b"POST /body HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        b"Connection: close\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    )
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b'{"length": 3}'), answer


# -- the access log and static answers ----------------------------------------------


def test_the_access_log_is_created_0640_and_masks_tokens(tmp_path):
    path = tmp_path / "access.log"
    server = LRPProcess("--no-jobs", "--access-log", str(path), tmp=tmp_path)
    server.start()
    try:
        response = server.get(
            "/environ?token=SECRET-ONE&x=1",
            headers={"Referer": "http://x/page?a=1&Token=SECRET-TWO"},
        )
        assert response.status == 200
        wait_for(lambda: "/environ" in path.read_text(), timeout=10, message="the access line")
        umask = os.umask(0)
        os.umask(umask)
        assert stat.S_IMODE(path.stat().st_mode) == 0o640 & ~umask
    finally:
        server.kill()
    text = path.read_text()
    assert "SECRET" not in text, text
    assert '"GET /environ?token=[masked]&x=1 HTTP/1.1"' in text
    assert '"http://x/page?a=1&Token=[masked]"' in text


def test_static_answers_carry_the_headers_of_django_security_middleware(server, tmp_path):
    answer = server.get("/static/testapp/style.css")
    assert answer.status == 200
    assert answer.headers["x-content-type-options"] == "nosniff"
    # The test site runs no SecurityMiddleware: no policies of its own.
    assert "referrer-policy" not in answer.headers
    assert "cross-origin-opener-policy" not in answer.headers
    assert server.get("/static/nothing.css").headers["x-content-type-options"] == "nosniff"

    secured = LRPProcess("--no-jobs", env={"LRP_TEST_SECURITY_MIDDLEWARE": "1"}, tmp=tmp_path)
    secured.start()
    try:
        static = secured.get("/static/testapp/style.css")
        page = secured.get("/hello")
    finally:
        secured.kill()
    assert static.status == 200 and page.status == 200
    names = ("x-content-type-options", "referrer-policy", "cross-origin-opener-policy")
    assert [static.headers.get(n) for n in names] == [page.headers.get(n) for n in names]
    assert static.headers["referrer-policy"] == "strict-origin,no-referrer"
    assert static.headers["cross-origin-opener-policy"] == "same-origin-allow-popups"


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


# -- clients that read nothing ---------------------------------------------------


def _never_reading(port: int, path: str = "/stream?count=50000000") -> socket.socket:
    """A client that asks for C{path} and reads nothing (a small window fills at once)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    sock.sendall(b"GET " + path.encode() + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    return sock


def _cut(sock: socket.socket) -> bool:
    """Whether the server has cut C{sock} (its TCP state, read without reading data)."""
    tcp_established = 1
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] != tcp_established


def test_a_client_that_stops_reading_a_stream_is_cut_at_the_write_timeout(server):
    sock = _never_reading(server.port)
    try:
        sent = time.monotonic()
        wait_for(lambda: _cut(sock), timeout=WRITE_TIMEOUT + 10, message="the connection cut")
        cut_after = time.monotonic() - sent
        wait_for(lambda: _busy(server) == 0, timeout=5, message="the thread freed")
    finally:
        sock.close()
    # Counted from when the first write could not go out (at once: the
    # client reads nothing), not from when the socket buffers filled up.
    assert cut_after < WRITE_TIMEOUT + 2
    assert server.get("/hello").status == 200
    log = server.output()
    warnings = [line for line in log.splitlines() if "#warn]" in line and "GET /stream" in line]
    assert len(warnings) == 1, log[-3000:]
    assert (
        "the client read nothing for 1 s (--write-timeout); "
        "the connection is cut and its thread freed" in warnings[0]
    )
    assert "Error in the WSGI application" not in log


def test_a_slow_reader_is_cut_only_write_timeout_after_its_last_read(server):
    sock = _never_reading(server.port)
    try:
        # Reading a little now and then is progress: the stream goes on for
        # three times the write timeout.
        started = time.monotonic()
        received = 0
        while True:
            data = sock.recv(4096)
            last_read = time.monotonic()
            assert data, "the server cut a client that reads"
            received += len(data)
            if last_read - started > 3 * WRITE_TIMEOUT:
                break
            time.sleep(WRITE_TIMEOUT / 4)  # the client's pace, not synchronisation
        assert not _cut(sock)
        # Then it stops reading.
        wait_for(lambda: _cut(sock), timeout=WRITE_TIMEOUT + 10, message="the connection cut")
        cut_after = time.monotonic() - last_read
    finally:
        sock.close()
    assert received > 8 * 4096
    assert WRITE_TIMEOUT * 0.9 <= cut_after < WRITE_TIMEOUT + 2
    wait_for(lambda: _busy(server) == 0, timeout=5, message="the thread freed")


def test_twelve_clients_that_never_read_take_at_most_half_the_threads(tmp_path):
    write_timeout = 3.0
    server = LRPProcess(
        "--no-jobs", "--threads", "8", "--write-timeout", str(write_timeout), tmp=tmp_path
    )
    server.start()
    sockets: list[tuple[socket.socket, float]] = []
    try:
        for _ in range(12):
            sockets.append((_never_reading(server.port), time.monotonic()))
        # /hello keeps answering at once while the streams hold their threads.
        hello_times = []
        cut_after: dict[int, float] = {}
        started = time.monotonic()
        while len(cut_after) < 4 and time.monotonic() - started < write_timeout + 10:
            before = time.monotonic()
            assert server.get("/hello", timeout=5).body == b"hello\n"
            hello_times.append(time.monotonic() - before)
            health = server.get("/-/health").json()["threads"]
            assert health["streaming"] <= 4
            for i, (sock, sent) in enumerate(sockets):
                if i not in cut_after and _cut(sock):
                    cut_after[i] = time.monotonic() - sent
        assert len(hello_times) > 10
        assert max(hello_times) < 1.0, hello_times
        # Four streamed (half the threads) and were cut at the write timeout.
        assert len(cut_after) == 4, cut_after
        assert all(t < write_timeout + 2 for t in cut_after.values()), cut_after
        wait_for(lambda: _busy(server) == 0, timeout=5, message="the threads freed")
        # The other eight were answered 503 at once, on connections still open.
        for i, (sock, _) in enumerate(sockets):
            if i in cut_after:
                continue
            sock.settimeout(5)
            answer = sock.recv(65536)
            assert answer.startswith(b"HTTP/1.1 503 Service Unavailable\r\n"), answer
            assert b"\r\nRetry-After: 1\r\n" in answer
            assert answer.endswith(b"too many streaming responses. Retry shortly.\n")
        assert server.get("/-/health").json()["threads"]["streaming"] == 0
    finally:
        for sock, _ in sockets:
            sock.close()
        server.kill()
    log = server.output()
    assert log.count("threads stream responses already (--stream-threads)") == 1, log[-3000:]
    assert log.count("(--write-timeout); the connection is cut and its thread freed") == 4


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
