"""
Request smuggling, against a real server: each request below frames its
body in a way a proxy in front could read differently (two lengths, a
transfer coding that is not plain chunked, a header name or line end that
some parsers forgive, a chunk size that is not plain hex), and carries a
second request in what a lenient parser would take for the next message.
Each is answered 400 and its connection closed (docs/serving.md,
"Limits"), and the request hidden in it never reaches the site; the last
cases are framed correctly, and there too the body is never a request.
"""

from __future__ import annotations

import os
import socket

import pytest

from support import LRPProcess, read_to_close, wait_for

# What a lenient parser would take for the next request on the connection;
# each test puts a mark of its own in place of the zeros.
SMUGGLED = b"GET /hello?smuggled=00000000 HTTP/1.1\r\nHost: x\r\n\r\n"


def _post(headers: bytes, body: bytes) -> bytes:
    return b"POST /body HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n" + body + SMUGGLED


def _chunked(body: bytes) -> bytes:
    return _post(b"Transfer-Encoding: chunked\r\n", body)


FIVE = b"abcde"
EMPTY_CHUNKED = b"0\r\n\r\n"

BAD = {
    # Two framings at once (RFC 9112 section 6.1 lets a server refuse it).
    "CL+TE": _post(b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n", EMPTY_CHUNKED),
    "TE+CL": _post(b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n", EMPTY_CHUNKED),
    "two CL, same": _post(b"Content-Length: 5\r\nContent-Length: 5\r\n", FIVE),
    "two CL, different": _post(b"Content-Length: 5\r\nContent-Length: 0\r\n", FIVE),
    "CL list": _post(b"Content-Length: 5, 5\r\n", FIVE),
    "CL +5": _post(b"Content-Length: +5\r\n", FIVE),
    "CL -1": _post(b"Content-Length: -1\r\n", FIVE),
    "CL 0x5": _post(b"Content-Length: 0x5\r\n", FIVE),
    "CL empty": _post(b"Content-Length: \r\n", FIVE),
    # A transfer coding other than chunked alone (section 6.3: 400).
    "TE identity, chunked": _post(b"Transfer-Encoding: identity, chunked\r\n", EMPTY_CHUNKED),
    "TE xchunked": _post(b"Transfer-Encoding: xchunked\r\n", EMPTY_CHUNKED),
    "TE chunked, x": _post(b"Transfer-Encoding: chunked, x\r\n", EMPTY_CHUNKED),
    "TE chunked, chunked": _post(b"Transfer-Encoding: chunked, chunked\r\n", EMPTY_CHUNKED),
    "TE identity": _post(b"Transfer-Encoding: identity\r\n", FIVE),
    "TE identity + CL": _post(b"Transfer-Encoding: identity\r\nContent-Length: 5\r\n", FIVE),
    "TE chunked then identity": _post(
        b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n", EMPTY_CHUNKED
    ),
    "TE identity then chunked": _post(
        b"Transfer-Encoding: identity\r\nTransfer-Encoding: chunked\r\n", EMPTY_CHUNKED
    ),
    "TE empty + CL": _post(b"Transfer-Encoding: \r\nContent-Length: 5\r\n", FIVE),
    "TE vertical tab": _post(b"Transfer-Encoding:\x0bchunked\r\n", EMPTY_CHUNKED),
    "Expect + CL + TE": _post(
        b"Expect: 100-continue\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n",
        EMPTY_CHUNKED,
    ),
    # Header names and lines that some parsers forgive.
    "space before the colon": _post(
        b"Transfer-Encoding : chunked\r\nContent-Length: 5\r\n", EMPTY_CHUNKED
    ),
    "tab before the colon": _post(b"Transfer-Encoding\t: chunked\r\n", EMPTY_CHUNKED),
    "space before CL's colon": _post(b"Content-Length : 5\r\n", FIVE),
    "folded TE": _post(b"Transfer-Encoding:\r\n chunked\r\nContent-Length: 5\r\n", EMPTY_CHUNKED),
    "space before a header name": _post(b" Transfer-Encoding: chunked\r\n", EMPTY_CHUNKED),
    "space in a header name": _post(b"X A: 1\r\nContent-Length: 5\r\n", FIVE),
    "a line without a colon": _post(b"XA\r\nContent-Length: 5\r\n", FIVE),
    "an empty header name": _post(b": x\r\nContent-Length: 5\r\n", FIVE),
    "NUL in a header": _post(b"X-A: a\x00b\r\nContent-Length: 5\r\n", FIVE),
    "NUL after chunked": _post(b"Transfer-Encoding: chunked\x00\r\nContent-Length: 5\r\n", FIVE),
    # Line ends other than CRLF.
    "bare LF": b"POST /body HTTP/1.1\nHost: x\nContent-Length: 5\n\n" + FIVE + SMUGGLED,
    "one bare LF": b"POST /body HTTP/1.1\r\nHost: x\r\nContent-Length: 5\nX: y\r\n\r\n"
    + FIVE
    + SMUGGLED,
    "bare CR": b"POST /body HTTP/1.1\r\nHost: x\rContent-Length: 5\r\n\r\n" + FIVE + SMUGGLED,
    "bare CR in a value": _post(b"X-A: a\rb\r\nContent-Length: 5\r\n", FIVE),
    # Chunk sizes that are not plain hex, or no body can have.
    "chunk size 0x5": _chunked(b"0x5\r\nabcde\r\n0\r\n\r\n"),
    "chunk size of 20 hex digits": _chunked(b"f" * 20 + b"\r\nabcde\r\n0\r\n\r\n"),
    "chunk size +5": _chunked(b"+5\r\nabcde\r\n0\r\n\r\n"),
    "chunk size -5": _chunked(b"-5\r\nabcde\r\n0\r\n\r\n"),
    "chunk size after a space": _chunked(b" 5\r\nabcde\r\n0\r\n\r\n"),
    "chunk size 5_0": _chunked(b"5_0\r\nabcde\r\n0\r\n\r\n"),
    "chunk size with junk": _chunked(b"5 x\r\nabcde\r\n0\r\n\r\n"),
    "chunk longer than its size": _chunked(b"3\r\nabcde\r\n0\r\n\r\n"),
    "chunked with bare LFs": _chunked(b"5\nabcde\n0\n\n"),
    "chunk extension with a bare LF": _chunked(b"5;a\nb\r\nabcde\r\n0\r\n\r\n"),
    # Request lines and Host headers (issue 18's audit).
    "two Host headers": b"GET /hello HTTP/1.1\r\nHost: x\r\nHost: y\r\nContent-Length: 0\r\n\r\n"
    + SMUGGLED,
    "GET *": b"GET * HTTP/1.1\r\nHost: x\r\n\r\n" + SMUGGLED,
    "two spaces in the request line": b"GET  /hello HTTP/1.1\r\nHost: x\r\n\r\n" + SMUGGLED,
    "HTTP/1.10": b"GET /hello HTTP/1.10\r\nHost: x\r\n\r\n" + SMUGGLED,
    "lower-case http/1.1": b"GET /hello http/1.1\r\nHost: x\r\n\r\n" + SMUGGLED,
}

CLOSE = b"Connection: close\r\n"
# Framed correctly: the body (or what follows a request that closes) is
# never a request. Each with the body length /body reports (None: /hello).
GOOD = {
    "CL body holding a request": (
        b"POST /body HTTP/1.1\r\nHost: x\r\n"
        + CLOSE
        + b"Content-Length: %d\r\n\r\n" % len(SMUGGLED)
        + SMUGGLED,
        len(SMUGGLED),
    ),
    "chunked body holding a request": (
        b"POST /body HTTP/1.1\r\nHost: x\r\n"
        + CLOSE
        + b"Transfer-Encoding: CHUNKED\r\n\r\n"
        + b"%x\r\n" % len(SMUGGLED)
        + SMUGGLED
        + b"\r\n0\r\n\r\n",
        len(SMUGGLED),
    ),
    "GET with a body": (
        b"GET /hello HTTP/1.1\r\nHost: x\r\n"
        + CLOSE
        + b"Content-Length: %d\r\n\r\n" % len(SMUGGLED)
        + SMUGGLED,
        None,
    ),
    # RFC 9112 section 6.1: processed, then the connection closes.
    "HTTP/1.0 with TE chunked": (
        b"POST /body HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + SMUGGLED,
        0,
    ),
    # RFC 9112 section 3.2.2: reduced to its path; the site's ALLOWED_HOSTS decides.
    "absolute form, another host": (
        b"GET http://evil.example/hello HTTP/1.1\r\nHost: x\r\n" + CLOSE + b"\r\n" + SMUGGLED,
        None,
    ),
}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("smuggling")
    # The access log goes to the server's output, a line as each response ends.
    server = LRPProcess("--no-jobs", "--threads", "2", "--access-log", "-", tmp=tmp)
    server.start()
    yield server
    server.kill()


def _exchange(server, raw: bytes) -> bytes:
    """
    Send C{raw} with a mark of its own in its smuggled request, then check
    that the site never saw that request.

    @return: everything the server sent after C{raw} until it closed.
    @raise AssertionError: if it kept the connection open for 10 s, or the
        smuggled request was answered.
    """
    mark = os.urandom(4).hex().encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(raw.replace(b"smuggled=00000000", b"smuggled=" + mark))
        data = read_to_close(sock)
    # A request sent after it is logged after it, had it been answered.
    after = f"/hello?after={mark.decode()}"
    assert server.get(after).status == 200
    wait_for(lambda: after in server.output(), 10, message="the access log line")
    assert f"smuggled={mark.decode()}" not in server.output()
    return data


def _statuses(answer: bytes) -> list[bytes]:
    return [part.split(b"\r\n", 1)[0] for part in answer.split(b"HTTP/1.")[1:]]


@pytest.mark.parametrize("raw", BAD.values(), ids=BAD.keys())
def test_ambiguous_framing_gets_400_and_close(server, raw):
    answer = _exchange(server, raw)
    assert _statuses(answer) == [b"1 400 Bad Request"], answer
    assert b"\r\nConnection: close\r\n" in answer


@pytest.mark.parametrize("raw, length", GOOD.values(), ids=GOOD.keys())
def test_a_request_in_a_well_framed_body_is_only_data(server, raw, length):
    answer = _exchange(server, raw)
    statuses = _statuses(answer)
    assert len(statuses) == 1 and statuses[0].endswith(b" 200 OK"), answer
    assert answer.endswith(b"hello\n" if length is None else b'{"length": %d}' % length), answer
