"""Serving: WSGI in the pool, static files and health in the reactor, limits, proxies."""

import http.client
import http.server
import os
import socket
import threading
import time
from email.utils import formatdate
from urllib.parse import quote

import psutil
import pytest

from support import TESTSITE, BackgroundRequest, pg_connect, pg_name, postgres, wait_for


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory):
    """One ordinary server for the tests that do not need their own."""
    from support import LRPProcess

    server = LRPProcess("--workers", "0", "--threads", "4", tmp=tmp_path_factory.mktemp("shared"))
    server.start()
    yield server
    server.kill()


def _busy(server) -> int:
    return server.get("/-/health").json()["threads"]["busy"]


def _fill_threads(server, count: int, seconds: float = 3.0) -> list[BackgroundRequest]:
    """Start C{count} slow requests and return once they all hold a thread."""
    threads = [BackgroundRequest(server.port, f"/sleep?seconds={seconds}") for _ in range(count)]
    for thread in threads:
        thread.start()
    wait_for(lambda: _busy(server) == count, message=f"{count} busy threads")
    return threads


def test_wsgi_environ_passes_wsgiref_validate(shared_server):
    # The test site wraps Django in wsgiref.validate.validator: a bad environ
    # or response would be an AssertionError, answered with 500.
    response = shared_server.get("/environ?a=1&b=%C3%A9", headers={"X-Custom": "yes"})
    assert response.status == 200
    data = response.json()
    assert data["PATH_INFO"] == "/environ"
    assert data["QUERY_STRING"] == "a=1&b=%C3%A9"
    assert data["SCRIPT_NAME"] == ""
    assert data["SERVER_PROTOCOL"] == "HTTP/1.1"
    assert data["SERVER_PORT"] == str(shared_server.port)
    assert data["REMOTE_ADDR"] == "127.0.0.1"
    assert data["wsgi.url_scheme"] == "http"
    assert data["wsgi.multiprocess"] is False  # one process serves views
    assert data["headers"]["HTTP_X_CUSTOM"] == "yes"
    assert data["pid"] == shared_server.proc.pid
    posted = shared_server.get(
        "/body",
        method="POST",
        body=b"x" * 150_000,
        headers={"Content-Type": "application/octet-stream"},
    )
    assert posted.status == 200
    assert posted.json() == {"length": 150_000}


def test_chunked_request_body_reaches_django_whole(shared_server):
    chunk = b"%x\r\n%s\r\n" % (1000, b"c" * 1000)
    with socket.create_connection(("127.0.0.1", shared_server.port), timeout=10) as sock:
        sock.sendall(
            b"POST /body HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
            b"Connection: close\r\n\r\n" + chunk * 5 + b"0\r\n\r\n"
        )
        answer = b""
        while data := sock.recv(65536):
            answer += data
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert b'{"length": 5000}' in answer


def test_percent_encoded_path_reaches_django_decoded(shared_server):
    response = shared_server.get("/" + quote("café"))
    # No such URL: Django answers 404 (not 500, which a bad PATH_INFO would cause).
    assert response.status == 404


def test_headers_with_underscores_are_dropped(shared_server):
    response = shared_server.get("/environ", headers={"X_Forwarded_For": "6.6.6.6"})
    assert "HTTP_X_FORWARDED_FOR" not in response.json()["headers"]


def test_streaming_response_and_application_error(shared_server):
    buffered = shared_server.get("/hello")
    assert buffered.headers["content-length"] == "6"
    stream = shared_server.get("/stream?count=200")
    assert stream.status == 200
    assert stream.headers["transfer-encoding"] == "chunked"
    assert stream.text.splitlines() == [f"chunk {i}" for i in range(200)]
    failing = shared_server.get("/error")
    assert failing.status == 500
    assert "this view fails on purpose" in shared_server.output()


def test_keep_alive_serves_many_requests_on_one_connection(shared_server):
    conn = http.client.HTTPConnection("127.0.0.1", shared_server.port, timeout=10)
    ports = set()
    for _ in range(20):
        conn.request("GET", "/hello")
        response = conn.getresponse()
        assert response.read() == b"hello\n"
        ports.add(conn.sock.getsockname()[1])
    conn.close()
    assert len(ports) == 1


def test_static_files_have_type_last_modified_and_304(shared_server):
    response = shared_server.get("/static/testapp/style.css")
    assert response.status == 200
    assert response.headers["content-type"] == "text/css"
    assert response.body == (TESTSITE / "testapp/static/testapp/style.css").read_bytes()
    last_modified = response.headers["last-modified"]
    cached = shared_server.get(
        "/static/testapp/style.css", headers={"If-Modified-Since": last_modified}
    )
    assert cached.status == 304
    assert cached.body == b""
    older = formatdate(time.time() - 10 * 365 * 86400, usegmt=True)
    assert (
        shared_server.get("/static/testapp/style.css", headers={"If-Modified-Since": older}).status
        == 200
    )


def test_static_refuses_traversal_listing_and_writes(shared_server):
    assert shared_server.get("/static/").status == 404
    assert shared_server.get("/static/testapp/").status == 404
    assert shared_server.get("/static/..%2F..%2Ftestsite%2Fsettings.py").status == 404
    assert shared_server.get("/static/../testsite/settings.py").status in (404, 400)
    assert shared_server.get("/static/testapp/style.css", method="POST").status == 405


def test_static_and_health_are_served_while_every_thread_is_busy(lrp_server):
    server = lrp_server("--workers", "0", "--threads", "2")
    _fill_threads(server, 2, seconds=4)
    started = time.monotonic()
    assert server.get("/static/testapp/style.css").status == 200
    health = server.get("/-/health").json()
    elapsed = time.monotonic() - started
    assert health["threads"]["busy"] == 2
    assert health["threads"]["idle"] == 0
    # Both answered while the two threads sleep (4 s): well before they free up.
    assert elapsed < 3


def test_saturated_pool_answers_503_with_retry_after(lrp_server):
    server = lrp_server("--workers", "0", "--threads", "1", "--max-waiting", "1")
    _fill_threads(server, 1, seconds=5)
    waiting = BackgroundRequest(server.port, "/hello")
    waiting.start()
    wait_for(lambda: server.get("/-/health").json()["waiting"] == 1, message="one waiting request")
    refused = server.get("/hello")
    assert refused.status == 503
    assert refused.headers["retry-after"] == "1"
    # The one that waited is answered once the thread frees up.
    assert waiting.outcome().status == 200


def _rss(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


def test_oversized_body_gets_413_without_being_kept(lrp_server):
    server = lrp_server("--workers", "0", "--max-body-size", "1000000")
    assert server.get("/body", method="POST", body=b"y" * 1_000_000).json() == {"length": 1_000_000}
    before = _rss(server.proc.pid)
    body = b"z" * (64 * 1024 * 1024)
    # The whole 64 MiB body is sent; the server answers 413 and discards it.
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("POST", "/body", body=body, headers={"Content-Type": "application/octet-stream"})
    response = conn.getresponse()
    assert response.status == 413
    assert response.getheader("connection") == "close"
    conn.close()
    grown = _rss(server.proc.pid) - before
    assert grown < 16 * 1024 * 1024, f"server grew by {grown} bytes"
    # The server is still fine.
    assert server.get("/hello").status == 200


def test_oversized_body_with_expect_continue_is_refused_before_it_is_sent(lrp_server):
    server = lrp_server("--workers", "0", "--max-body-size", "1000")
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(
            b"POST /body HTTP/1.1\r\nHost: x\r\nContent-Length: 5000000000\r\n"
            b"Expect: 100-continue\r\n\r\n"
        )
        answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 413 ")
    assert b"100 Continue" not in answer


def test_oversized_chunked_body_gets_413(lrp_server):
    server = lrp_server("--workers", "0", "--max-body-size", "1000")
    chunk = b"%x\r\n%s\r\n" % (600, b"a" * 600)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"POST /body HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        sock.sendall(chunk * 3 + b"0\r\n\r\n")
        answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 413 ")


def test_forwarded_headers(lrp_server):
    forged = {"X-Forwarded-For": "6.6.6.6, 203.0.113.9", "X-Forwarded-Proto": "https"}
    # Without --proxy-headers they are never believed.
    plain = lrp_server("--workers", "0")
    data = plain.get("/environ", headers=forged).json()
    assert (data["REMOTE_ADDR"], data["wsgi.url_scheme"], data["is_secure"]) == (
        "127.0.0.1",
        "http",
        False,
    )
    # With --proxy-headers, but from an address that is not allowed: ignored.
    untrusted = lrp_server(
        "--workers", "0", "--proxy-headers", "--forwarded-allow-ips", "10.0.0.1,192.168.0.0/16"
    )
    data = untrusted.get("/environ", headers=forged).json()
    assert (data["REMOTE_ADDR"], data["wsgi.url_scheme"]) == ("127.0.0.1", "http")
    # From an allowed proxy: the nearest untrusted hop is the client.
    trusted = lrp_server("--workers", "0", "--proxy-headers")
    data = trusted.get("/environ", headers=forged).json()
    assert (data["REMOTE_ADDR"], data["wsgi.url_scheme"], data["is_secure"]) == (
        "203.0.113.9",
        "https",
        True,
    )


def test_access_log_in_combined_format(lrp_server, tmp_path):
    log_path = tmp_path / "access.log"
    server = lrp_server("--workers", "0", "--access-log", str(log_path))
    server.get("/hello?x=1", headers={"User-Agent": "tester/1.0", "Referer": "http://r.example/"})
    server.stop()
    lines = log_path.read_text().splitlines()
    line = next(line for line in lines if "/hello?x=1" in line)
    assert line.startswith("127.0.0.1 - - [")
    assert '"GET /hello?x=1 HTTP/1.1" 200 6 "http://r.example/" "tester/1.0"' in line


class _CountingHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    connections = 0
    lock = threading.Lock()

    def setup(self):
        super().setup()
        with self.lock:
            type(self).connections += 1

    def do_GET(self):
        body = b"pong"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_outbound_http_reuses_persistent_connections(lrp_server):
    upstream = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _CountingHandler)
    thread = threading.Thread(target=upstream.serve_forever, daemon=True)
    thread.start()
    try:
        server = lrp_server("--workers", "0")
        url = f"http://127.0.0.1:{upstream.server_address[1]}/ping"
        response = server.get(f"/outbound?count=100&url={quote(url)}", timeout=60)
        assert response.status == 200, server.output()
        assert response.json() == {"statuses": [200] * 100, "last": "pong"}
        assert 1 <= _CountingHandler.connections <= 2
    finally:
        upstream.shutdown()


def test_database_connections_live_with_their_threads(lrp_server, tmp_path):
    db = tmp_path / "conn.sqlite3"
    # --no-jobs: the job store would hold a connection of its own.
    server = lrp_server("--no-jobs", "--threads", "3", env={"LRP_TEST_DB": str(db)})
    for _ in range(30):
        assert server.get("/db").status == 200

    def open_connections() -> int:
        if postgres():
            with pg_connect() as con:
                sql = "select count(*) from pg_stat_activity where datname = %s"
                return con.execute(sql, (pg_name(db),)).fetchone()[0]
        proc = psutil.Process(server.proc.pid)
        return len([f for f in proc.open_files() if f.path == str(db)])

    # CONN_MAX_AGE keeps one connection per pool thread, never more.
    assert 1 <= open_connections() <= 3
    assert postgres() or os.path.exists(db)
