"""
The HTTP/1.1 protocol over httptools (twistedlrp.web.http) on a real
loopback port, in a process of its own (this file, run as a script, serves
a tiny site), spoken to with raw bytes: keep-alive, pipelining,
100-continue, chunked bodies both ways, HTTP/1.0, the write deadline (over TLS too), heads
too large (431) or bad (400), and every request-smuggling case of issue
20: each answered 400 and the connection closed, the smuggled request
never answered.
"""

from __future__ import annotations

import select
import socket
import subprocess
import sys
import time

import pytest

from support import read_to_close

HELLO = b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n"
WRITE_TIMEOUT = 1.0
PIECES = [10, 70_000, 3, 300_000, 1, 65_536, 500_000, 20, 4_000_000, 7, 200_000, 2, 6_000_000, 5]
BLOCK_SECONDS = 4.0
LOG_SECONDS = 1.0


def serve() -> None:
    """Serve the tiny site on a free loopback port; print the port."""
    from twisted.internet import reactor

    from twistedlrp.web.limits import Limits
    from twistedlrp.web.site import LRPSite

    class Big:
        """A push producer of 64 KiB chunks, paused while the client is behind."""

        def __init__(self, request):
            self.request, self.paused, self.sent = request, False, 0

        def go(self):
            while not self.paused and self.request.channel is not None:
                if self.sent >= 200 * 2**20:
                    self.request.unregisterProducer()
                    self.request.finish()
                    return
                self.sent += 65536
                self.request.write(b"x" * 65536)

        def pauseProducing(self):
            self.paused = True

        def resumeProducing(self):
            self.paused = False
            reactor.callLater(0, self.go)

        def stopProducing(self):
            self.paused = True

    class Site(LRPSite):
        def log(self, request):
            super().log(request)
            if request.path == b"/logged-slowly":
                # The log is slow: the answer must not be out before it is done.
                time.sleep(LOG_SECONDS)

        def handle(self, request):
            if request.path == b"/big":
                big = Big(request)
                request.registerProducer(big, True)
                big.go()
                return
            if request.path == b"/stream":
                for piece in (b"abc", b"", b"defgh"):
                    request.write(piece)
            elif request.path == b"/pieces":
                # Writes of every size, in one turn of the reactor, each of
                # its own byte: some reach the socket at once, the rest wait
                # in the transport once the socket is full; order must hold.
                for n, size in enumerate(PIECES):
                    request.write(bytes([65 + n % 26]) * size)
            elif request.path == b"/then-block":
                # The reactor is busy right after the answer: it must be on
                # the wire already.
                request.setHeader(b"content-length", b"6")
                request.write(b"early\n")
                request.finish()
                time.sleep(BLOCK_SECONDS)
                return
            elif request.path == b"/fail":
                raise RuntimeError("a bug")
            elif request.path == b"/long":
                request.setHeader(b"content-length", b"2")
                request.write(b"abc")
            else:
                body = {
                    b"/hello": b"hello\n",
                    b"/echo": request.content.read(),
                    b"/smuggled": b"SMUGGLED\n",
                }.get(request.path, b"not found\n")
                request.setHeader(b"content-length", b"%d" % len(body))
                request.write(body)
            request.finish()

    limits = Limits(
        header_timeout=5, max_header_size=4096, write_timeout=WRITE_TIMEOUT, max_connections=100
    )
    site = Site(reactor, limits=limits, max_body_size=1000)
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    # The same site over TLS, with Twisted's own test certificate.
    import os

    import twisted.test
    from twisted.internet import ssl

    with open(os.path.join(os.path.dirname(twisted.test.__file__), "server.pem"), "rb") as pem:
        certificate = ssl.PrivateCertificate.loadPEM(pem.read())
    tls = reactor.listenSSL(0, site, certificate.options(), interface="127.0.0.1")
    sys.stdout.write(f"{port.getHost().port} {tls.getHost().port}\n")
    sys.stdout.flush()
    reactor.run()


@pytest.fixture(scope="module")
def ports():
    process = subprocess.Popen(
        [sys.executable, __file__], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        ready, _, _ = select.select([process.stdout], [], [], 30)
        line = process.stdout.readline() if ready else b""
        assert line.replace(b" ", b"").strip().isdigit(), line
        yield [int(number) for number in line.split()]
    finally:
        process.kill()
        process.wait(10)
        process.stdout.close()


@pytest.fixture(scope="module")
def port(ports):
    return ports[0]


def _connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def _read_until(sock: socket.socket, end: bytes, data: bytes = b"") -> bytes:
    while not data.endswith(end):
        chunk = sock.recv(65536)
        assert chunk, data
        data += chunk
    return data


def test_keep_alive_and_pipelining(port):
    with _connect(port) as sock:
        sock.sendall(HELLO)
        assert _read_until(sock, b"hello\n").startswith(b"HTTP/1.1 200 OK\r\n")
        sock.sendall(HELLO + b"GET /nothing HTTP/1.1\r\nHost: x\r\n\r\n" + HELLO)
        answers = b""
        while answers.count(b"HTTP/1.1 ") < 3 or not answers.endswith(b"hello\n"):
            chunk = sock.recv(65536)
            assert chunk, answers
            answers += chunk
    assert answers.count(b"HTTP/1.1 200 OK") == 3
    assert answers.index(b"hello\n") < answers.index(b"not found\n") < answers.rindex(b"hello\n")


def test_expect_100_continue_and_chunked_bodies_both_ways(port):
    with _connect(port) as sock:
        sock.sendall(
            b"POST /echo HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        assert _read_until(sock, b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
        assert _read_until(sock, b"hello world").startswith(b"HTTP/1.1 200 ")
        sock.sendall(b"GET /stream HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = read_to_close(sock)
    head, body = answer.split(b"\r\n\r\n", 1)
    assert b"\r\nTransfer-Encoding: chunked\r\n" in head and b"\r\nConnection: close" in head
    assert body == b"3\r\nabc\r\n5\r\ndefgh\r\n0\r\n\r\n"


def _unchunked(body: bytes) -> bytes:
    pieces, at = [], 0
    while True:
        end = body.index(b"\r\n", at)
        size = int(body[at:end], 16)
        if not size:
            return b"".join(pieces)
        pieces.append(body[end + 2 : end + 2 + size])
        at = end + 4 + size


def test_writes_of_every_size_arrive_whole_and_in_order_to_a_slow_reader(port):
    with _connect(port) as sock:
        sock.sendall(b"GET /pieces HTTP/1.1\r\nHost: x\r\n\r\n")
        # Nothing read for a moment: the sockets' buffers fill up.
        assert not select.select([], [], [], 0.3)[0]
        received = bytearray()
        while not received.endswith(b"\r\n0\r\n\r\n"):
            chunk = sock.recv(1 << 20)
            assert chunk, bytes(received[:200])
            received += chunk
    head, body = bytes(received).split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert _unchunked(body) == b"".join(
        bytes([65 + n % 26]) * size for n, size in enumerate(PIECES)
    )


def test_an_answer_is_on_the_wire_before_the_reactor_turns_again(port):
    with _connect(port) as sock:
        sock.sendall(b"GET /then-block HTTP/1.1\r\nHost: x\r\n\r\n")
        # The server's reactor sleeps BLOCK_SECONDS right after answering: an
        # answer left to the reactor's next turn would come after that.
        sock.settimeout(BLOCK_SECONDS / 2)
        answer = _read_until(sock, b"early\n")
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n")


def test_an_answer_leaves_only_once_it_is_logged(port):
    with _connect(port) as sock:
        started = time.monotonic()
        sock.sendall(b"GET /logged-slowly HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = _read_until(sock, b"not found\n")
        # What a client has seen is in the metrics and the access log already.
        assert time.monotonic() - started >= LOG_SECONDS
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n")


def _tcp_state(sock: socket.socket) -> int:
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]


def _assert_cut_at_the_write_deadline(sock: socket.socket) -> None:
    """Ask for a large response, never read it, and see the server reset the connection in time."""
    sock.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
    started = time.monotonic()
    # Polled with a deadline: the server's reset moves the socket to TCP_CLOSE (7).
    deadline = started + 30
    while _tcp_state(sock) != 7 and time.monotonic() < deadline:
        time.sleep(0.05)
    elapsed = time.monotonic() - started
    assert _tcp_state(sock) == 7
    assert WRITE_TIMEOUT * 0.9 <= elapsed < WRITE_TIMEOUT + 10


@pytest.mark.skipif(not hasattr(socket, "TCP_INFO"), reason="TCP_INFO is Linux's")
def test_a_client_that_reads_nothing_is_cut_at_the_write_deadline(port):
    with _connect(port) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        _assert_cut_at_the_write_deadline(sock)


@pytest.mark.skipif(not hasattr(socket, "TCP_INFO"), reason="TCP_INFO is Linux's")
def test_a_tls_client_that_reads_nothing_is_cut_at_the_write_deadline(ports):
    import ssl

    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    sock = socket.create_connection(("127.0.0.1", ports[1]), timeout=10)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    with context.wrap_socket(sock) as tls:
        _assert_cut_at_the_write_deadline(tls)


# What is sent, what each answer holds (in order), and whether the connection closes.
EXCHANGES = {
    "HTTP/1.0 closes": (b"GET /hello HTTP/1.0\r\n\r\n", [b"Connection: close\r\n"], True),
    "HTTP/1.0 keep-alive": (
        b"GET /hello HTTP/1.0\r\nConnection: keep-alive\r\n\r\n" + HELLO,
        [b"\r\nConnection: keep-alive\r\n", b"hello\n"],
        False,
    ),
    "Connection: close": (
        b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" + HELLO,
        [b"\r\nConnection: close\r\n"],
        True,
    ),
    "chunked answer": (
        b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n" + HELLO,
        [b"\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n5\r\ndefgh\r\n0\r\n\r\n", b"hello\n"],
        False,
    ),
    "HTTP/1.0 answer ended by the close": (
        b"GET /stream HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
        [b"\r\nConnection: close\r\n\r\nabcdefgh"],
        True,
    ),
    "more than Content-Length": (
        b"GET /long HTTP/1.1\r\nHost: x\r\n\r\n" + HELLO,
        [b"\r\n\r\nab"],
        True,
    ),
    "a failing handler": (
        b"GET /fail HTTP/1.1\r\nHost: x\r\n\r\n" + HELLO,
        [b" 500 ", b"hello\n"],
        False,
    ),
    "chunked body with trailers": (
        b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5;ext=1\r\nhello\r\n4\r\n abc\r\n0\r\nX-Trailer: 1\r\n\r\n" + HELLO,
        [b"\r\n\r\nhello abc", b"hello\n"],
        False,
    ),
    "an Upgrade with a body": (
        b"POST /echo HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: h2c\r\nContent-Length: 3\r\n"
        b"\r\nabc" + HELLO,
        [b"\r\n\r\nabc", b"hello\n"],
        False,
    ),
}


@pytest.mark.parametrize("name", EXCHANGES)
def test_exchanges(port, name):
    raw, expected, closes = EXCHANGES[name]
    with _connect(port) as sock:
        sock.sendall(raw)
        if closes:
            data = read_to_close(sock)
        else:
            data = b""
            while data.count(b"HTTP/1.1 ") < len(expected) or not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                assert chunk, data
                data += chunk
    answers = [b"HTTP/1.1 " + part for part in data.split(b"HTTP/1.1 ")[1:]]
    assert len(answers) == len(expected), answers
    for answer, part in zip(answers, expected, strict=True):
        assert part in answer, answer


_PREFIX = b"GET /hello HTTP/1.1\r\nHost: x\r\nX: "
AT_LIMIT = _PREFIX + b"x" * (4096 - len(_PREFIX) - 4) + b"\r\n\r\n"  # the server's limit


@pytest.mark.parametrize(
    "raw, status",
    [
        (AT_LIMIT, b"200"),
        (AT_LIMIT[:-4] + b"x\r\n\r\n", b"431"),
        (b"GET /hello HTTP/1.1\r\nHost: x\r\nX: " + b"x" * 5000, b"431"),
        (b"GET /hello HTTP/1.1\r\n" + b"X: 1\r\n" * 501 + b"\r\n", b"431"),
    ],
)
def test_a_head_over_the_size_or_line_limit_gets_431(port, raw, status):
    with _connect(port) as sock:
        sock.sendall(raw)
        answer = _read_until(sock, b"hello\n") if status == b"200" else read_to_close(sock)
    assert answer.startswith(b"HTTP/1.1 " + status + b" "), answer


@pytest.mark.parametrize(
    "raw, reason",
    [
        (b"GET * HTTP/1.1\r\nHost: x\r\n\r\n", b"* is a request target of OPTIONS only"),
        (b"GET hello HTTP/1.1\r\nHost: x\r\n\r\n", b""),
        (b"CONNECT evil:443 HTTP/1.1\r\nHost: x\r\n\r\n", b"the request target must be a path"),
        (b"GET ftp://evil/x HTTP/1.1\r\nHost: x\r\n\r\n", b"the request target must be a path"),
        (
            b"GET http://user@evil/x HTTP/1.1\r\nHost: x\r\n\r\n",
            b"the request target must be a path",
        ),
        (b"GET / HTTP/1.1\r\nHost: a\r\nhost: a\r\n\r\n", b"more than one Host header"),
        (
            b"GET / HTTP/1.1\r\nHost: x\r\nX: a\r\n folded\r\n\r\n",
            b"a header line begins with whitespace",
        ),
        (b"GET / HTTP/1.1\nHost: x\n\n", b"lines must end with CRLF"),
        (b"GET / HTTP/1.1\r\nHost: x\n\r\n", b"lines must end with CRLF"),
        (b"GET / HTTP/1.1\r\nHost: x\rX: y\r\n\r\n", b"lines must end with CRLF"),
        (b"GET / HTTP/1.2\r\n\r\n", b""),
        (b"GET /\r\n\r\n", b"unsupported HTTP version"),
        (b"GET /hello HTTP/1.1\r\nX: y\r\n\r\n", b"no Host header"),
        (b"OPTIONS * HTTP/1.1\r\n\r\n", b"no Host header"),
        (b"FOO /hello HTTP/1.1\r\nHost: x\r\n\r\n", b"Bad request: "),
        (b"GET /hello  HTTP/1.1\r\nHost: x\r\n\r\n", b"one space apart"),
    ],
)
def test_bad_heads_get_400_and_close(port, raw, reason):
    with _connect(port) as sock:
        sock.sendall(raw + HELLO)
        answer = read_to_close(sock)
    assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n") and reason in answer
    assert b"\r\nConnection: close\r\n" in answer and answer.count(b"HTTP/1.1") == 1


SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
# Each head, with a body that, read another way, holds SMUGGLED.
CASES = {
    "CL+TE": b"Content-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "TE+CL": b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n",
    "two Content-Lengths": b"Content-Length: 0\r\nContent-Length: 5\r\n\r\nhello",
    "+5": b"Content-Length: +5\r\n\r\nhello",
    "-1": b"Content-Length: -1\r\n\r\n",
    "identity, chunked": b"Transfer-Encoding: identity, chunked\r\nContent-Length: 0\r\n\r\n0\r\n\r\n",
    "identity, chunked alone": b"Transfer-Encoding: identity, chunked\r\n\r\n0\r\n\r\n",
    "xchunked": b"Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
    "space before colon": b"Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
    "folded TE": b"Transfer-Encoding: x\r\n chunked\r\n\r\n0\r\n\r\n",
    "bare LF": b"Transfer-Encoding: chunked\n\r\n0\r\n\r\n",
    "bare CR": b"X: y\rTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "NUL": b"Transfer-Encoding: chunked\x00\r\n\r\n0\r\n\r\n",
    "0x5": b"Transfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n",
    "oversized chunk size": b"Transfer-Encoding: chunked\r\n\r\n" + b"f" * 17 + b"\r\n",
    "chunk size of 2**63": b"Transfer-Encoding: chunked\r\n\r\n8000000000000000\r\n",
    "two Hosts": b"Host: y\r\nContent-Length: 0\r\n\r\n",
    "obs-fold": b"X-A: a\r\n b\r\nContent-Length: 0\r\n\r\n",
}


@pytest.mark.parametrize("name", CASES)
def test_each_smuggling_case_gets_400_and_close(port, name):
    with _connect(port) as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\n" + CASES[name] + SMUGGLED + HELLO)
        started = time.monotonic()
        answer = read_to_close(sock)
    assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n"), answer
    assert b"\r\nConnection: close\r\n" in answer
    assert answer.count(b"HTTP/1.1 ") == 1 and b"SMUGGLED" not in answer
    assert time.monotonic() - started < 3  # at once, not at a deadline
    # The server is fine.
    with _connect(port) as sock:
        sock.sendall(HELLO)
        assert _read_until(sock, b"hello\n").startswith(b"HTTP/1.1 200 ")


if __name__ == "__main__":
    serve()
