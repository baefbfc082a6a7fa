"""
The HTTP/1.1 protocol over httptools (twistedlrp.web.http), in memory on a
fake clock: keep-alive, pipelining, 100-continue, the deadlines, 413, targets,
smuggling cases split anyhow, the drain, the write deadline and the request's API.
"""

from __future__ import annotations

import random

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.web.http import CACHED

from twistedlrp.web.http import reading
from twistedlrp.web.http.protocol import DRAIN_GRACE
from twistedlrp.web.limits import Limits
from twistedlrp.web.site import LRPSite

HELLO = b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n"


class Transport(StringTransport):
    aborted = False

    def abortConnection(self):
        self.aborted = True
        super().abortConnection()


class App(LRPSite):
    """Answers /hello at once, echoes /echo's body, streams /stream, holds /hold."""

    def __init__(self, reactor, **kwargs):
        super().__init__(reactor, **kwargs)
        self.handled, self.logged, self.held = [], [], []

    def handle(self, request):
        self.handled.append(request)
        if request.path == b"/hold":
            self.held.append(request)
            return
        if request.path == b"/stream":
            request.write(b"abc")
            request.write(b"")
            request.write(b"defgh")
        elif request.path == b"/echo":
            body = request.content.read()
            request.setHeader(b"content-length", b"%d" % len(body))
            request.write(body)
        elif request.path == b"/fail":
            raise RuntimeError("a bug")
        elif request.path == b"/long":
            request.setHeader(b"content-length", b"2")
            request.write(b"abc")
        else:
            request.setHeader(b"content-type", b"text/plain")
            request.setHeader(b"content-length", b"6")
            request.write(b"hello\n")
        request.finish()

    def log(self, request):
        self.logged.append(request)


def connect(limits=None, max_body_size=100):
    reactor = MemoryReactorClock()
    limits = limits or Limits(header_timeout=10, write_timeout=0)
    site = App(reactor, limits=limits, max_body_size=max_body_size)
    connection = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5000))
    transport = Transport(peerAddress=IPv4Address("TCP", "127.0.0.1", 5000))
    connection.makeConnection(transport)
    return reactor, site, connection, transport


def feed_in_pieces(raw: bytes, seed, most: int) -> tuple[App, Transport]:
    """Feed C{raw} to a new connection in pieces of random sizes up to C{most}."""
    rng = random.Random(seed)
    _, site, connection, transport = connect()
    while raw:
        size = rng.randint(1, most)
        connection.dataReceived(raw[:size])
        raw = raw[size:]
    return site, transport


def responses(data: bytes) -> list[bytes]:
    return [b"HTTP/1.1 " + part for part in data.split(b"HTTP/1.1 ")[1:]]


# -- answers, keep-alive, pipelining ---------------------------------------------


def test_a_request_is_answered_and_the_connection_kept():
    _, site, connection, transport = connect()
    connection.dataReceived(HELLO)
    answer = transport.value()
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"\r\nContent-Type: text/plain\r\n" in answer and b"Connection" not in answer
    assert answer.endswith(b"\r\n\r\nhello\n")
    assert not transport.disconnecting and connection.awaiting_head
    request = site.logged[0]
    assert request.method == b"GET" and request.uri == request.path == b"/hello"
    assert request.clientproto == b"HTTP/1.1" and request.query == b""
    assert request.getHeader(b"HOST") == b"x" and request.sentLength == 6
    assert request.getPeer().host == "127.0.0.1"


def test_pipelined_requests_are_read_one_at_a_time_and_answered_in_order():
    _, site, connection, transport = connect()
    connection.dataReceived(
        b"GET /hold HTTP/1.1\r\nHost: x\r\n\r\n" + HELLO + b"GET /echo HTTP/1.1\r\nHost: x\r\n"
    )
    assert [r.path for r in site.handled] == [b"/hold"]
    assert transport.value() == b""  # not parsed yet
    connection.dataReceived(b"Content-Length: 2\r\n\r\nhi")
    held = site.held[0]
    held.setHeader(b"content-length", b"4")
    held.write(b"held")
    held.finish()
    assert [r.path for r in site.handled] == [b"/hold", b"/hello", b"/echo"]
    bodies = [r.split(b"\r\n\r\n", 1)[1] for r in responses(transport.value())]
    assert bodies == [b"held", b"hello\n", b"hi"]


def test_a_pipeline_past_the_buffer_stops_the_reading_until_answered():
    _, site, connection, transport = connect()
    connection.dataReceived(b"GET /hold HTTP/1.1\r\nHost: x\r\n\r\n" + HELLO * 3000)
    assert transport.producerState == "paused"
    site.held[0].finish()
    assert transport.producerState == "producing"
    assert len(site.handled) == 3001


def test_head_gets_the_headers_of_get_and_no_body():
    for path in (b"/hello", b"/stream"):
        _, _, connection, transport = connect()
        connection.dataReceived(b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        get_head = transport.value().split(b"\r\n\r\n", 1)[0]
        _, _, connection, transport = connect()
        connection.dataReceived(b"HEAD " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n" + HELLO)
        answers = responses(transport.value())
        assert answers[0] == get_head + b"\r\n\r\n"
        assert answers[1].endswith(b"hello\n")


def test_expect_100_continue_is_answered_only_when_the_body_will_be_read():
    _, _, connection, transport = connect()
    connection.dataReceived(
        b"POST /echo HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n"
    )
    assert transport.value() == b"HTTP/1.1 100 Continue\r\n\r\n"
    connection.dataReceived(b"ok")
    assert transport.value().endswith(b"\r\n\r\nok")
    _, site, connection, transport = connect()
    connection.dataReceived(
        b"POST /echo HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 200\r\n\r\n"
    )
    assert transport.value().startswith(b"HTTP/1.1 413 ")
    assert site.logged[0].code == 413


def test_a_body_over_the_limit_gets_413_and_is_dropped_for_a_while():
    reactor, site, connection, transport = connect()
    connection.dataReceived(
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 101\r\n\r\n" + b"x" * 50
    )
    answer = transport.value()
    assert answer.startswith(b"HTTP/1.1 413 ") and answer.endswith(b"Request body too large.\n")
    assert b"\r\nConnection: close\r\n" in answer and not transport.disconnecting
    connection.dataReceived(b"x" * 30)
    assert not site.handled
    reactor.advance(reading.LINGER_SECONDS)
    assert transport.aborted


@pytest.mark.parametrize(
    "chunks",
    [[b"65\r\n"], [b"40\r\n" + b"x" * 64 + b"\r\n", b"40\r\n"], [b"40\r\n" + b"x" * 64, b"\r\n41"]],
)
def test_a_chunked_body_over_the_limit_gets_413_on_its_size_line(chunks):
    _, site, connection, transport = connect()
    connection.dataReceived(b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    for chunk in chunks:
        connection.dataReceived(chunk)
    if not transport.value():
        connection.dataReceived(b"\r\n")
    assert transport.value().startswith(b"HTTP/1.1 413 ")
    assert not site.handled


# -- the head and its limits ---------------------------------------------------------


def test_the_head_deadline_gives_408_once_bytes_came_and_closes_quietly_before():
    reactor, _, connection, transport = connect()
    reactor.advance(9)
    connection.dataReceived(b"GET /hello HTTP/1.1\r\n")
    reactor.advance(1)
    assert transport.value().startswith(b"HTTP/1.1 408 ")
    reactor, _, connection, transport = connect()
    reactor.advance(10)
    assert transport.value() == b"" and transport.disconnecting
    # Without a head deadline, a silent connection closes when idle.
    reactor, _, connection, transport = connect(Limits(header_timeout=0, write_timeout=0))
    reactor.advance(reading.KEEP_ALIVE_TIMEOUT - 1)
    assert not transport.disconnecting
    reactor.advance(1)
    assert transport.disconnecting and transport.value() == b""


def test_a_later_head_is_timed_from_its_first_byte_and_idle_connections_close():
    reactor, _, connection, transport = connect()
    connection.dataReceived(HELLO)
    reactor.advance(30)
    transport.clear()
    connection.dataReceived(b"GET /hello HTTP/1.1\r\n")
    reactor.advance(9.9)
    assert transport.value() == b""
    reactor.advance(0.2)
    assert transport.value().startswith(b"HTTP/1.1 408 ")
    reactor, _, connection, transport = connect()
    connection.dataReceived(HELLO)
    reactor.advance(reading.KEEP_ALIVE_TIMEOUT - 1)
    assert not transport.disconnecting
    reactor.advance(1)
    assert transport.disconnecting


def test_absolute_form_and_options_star():
    _, site, connection, transport = connect()
    connection.dataReceived(
        b"GET http://evil.example:8080/x?a=1 HTTP/1.1\r\nHost: x\r\n\r\n"
        b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\nGET HTTP://h HTTP/1.1\r\n\r\n"
    )
    first, star, bare = site.handled
    assert (first.uri, first.path, first.query) == (b"/x?a=1", b"/x", b"a=1")
    assert first.getHeader(b"host") == b"evil.example:8080" and first.args == {b"a": [b"1"]}
    assert star.uri == b"*" and bare.uri == b"/" and bare.getHeader(b"host") == b"h"


SMUGGLING = {
    "CL+TE": b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
    "TE+CL": b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n",
    "two Content-Lengths": b"Content-Length: 5\r\nContent-Length: 5\r\n",
    "+5": b"Content-Length: +5\r\n",
    "-1": b"Content-Length: -1\r\n",
    "identity, chunked": b"Transfer-Encoding: identity, chunked\r\n",
    "xchunked": b"Transfer-Encoding: xchunked\r\n",
    "space before colon": b"Transfer-Encoding : chunked\r\n",
    "folded TE": b"Transfer-Encoding:\r\n chunked\r\n",
    "NUL": b"X-A: a\x00b\r\nTransfer-Encoding: chunked\r\n",
    "bare CR": b"X-A: a\rTransfer-Encoding: chunked\r\n",
    "0x5": b"Transfer-Encoding: chunked\r\n\r\n0x5",
    "chunk size of 2**63": b"Transfer-Encoding: chunked\r\n\r\n8000000000000000",
    "chunk size of 20 digits": b"Transfer-Encoding: chunked\r\n\r\n" + b"f" * 20,
}


@pytest.mark.parametrize("name", SMUGGLING)
def test_each_smuggling_case_gets_400_and_close_however_it_is_split(name):
    # The chunk size cases end their head in SMUGGLING: their line ends here.
    raw = b"POST /echo HTTP/1.1\r\nHost: x\r\n" + SMUGGLING[name] + b"\r\n"
    raw += b"5\r\nhello\r\n0\r\n\r\n" + HELLO
    _, site, connection, transport = connect()
    connection.dataReceived(raw)
    answer = transport.value()
    assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n"), answer
    assert answer.count(b"HTTP/1.1 ") == 1 and transport.disconnecting
    assert not site.handled
    for seed in range(30):
        site, transport = feed_in_pieces(raw, seed, 8)
        assert transport.value() == answer and not site.handled


# -- closing -----------------------------------------------------------------------


def test_drain_closes_idle_connections_and_answers_busy_ones_with_close():
    reactor, site, busy, busy_transport = connect()
    busy.dataReceived(b"GET /hold HTTP/1.1\r\nHost: x\r\n\r\n")
    (idle, idle_transport), (fresh, fresh_transport) = [
        (site.buildProtocol(None), Transport()) for _ in range(2)
    ]
    idle.makeConnection(idle_transport)
    idle.dataReceived(HELLO)
    fresh.makeConnection(fresh_transport)
    drained = site.drain()
    assert idle_transport.disconnecting and not fresh_transport.disconnecting
    reactor.advance(DRAIN_GRACE)
    assert fresh_transport.disconnecting
    site.held[0].finish()
    assert b"\r\nConnection: close\r\n" in busy_transport.value() and busy_transport.disconnecting
    for connection in (busy, idle, fresh):
        connection.connectionLost(Failure(ConnectionError()))
    assert drained.called


def test_a_half_closed_client_gets_its_answer_then_the_close_and_eviction():
    _, site, connection, transport = connect()
    connection.dataReceived(b"GET /hold HTTP/1.1\r\nHost: x\r\n\r\n")
    connection.readConnectionLost()
    assert not transport.disconnecting
    site.held[0].finish()
    assert transport.value().startswith(b"HTTP/1.1 200 ") and transport.disconnecting
    _, site, connection, transport = connect()
    connection.dataReceived(b"GET /hel")
    assert connection.awaiting_head and connection.idle
    connection.evict()
    assert transport.aborted and connection.closing and not connection.awaiting_head
    connection.dataReceived(b"lo HTTP/1.1\r\n\r\n")
    assert not site.handled


def test_notify_finish_and_a_lost_connection():
    _, site, connection, _ = connect()
    connection.dataReceived(
        b"GET /hold HTTP/1.1\r\nHost: x\r\n\r\n" + b"GET /hold HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    first, second = site.held[0], None
    finished = first.notifyFinish()
    first.finish()
    assert finished.called and finished.result is None
    second, failures = site.held[1], []
    second.notifyFinish().addErrback(failures.append)
    connection.connectionLost(Failure(ConnectionError("gone")))
    assert failures and second.channel is None
    second.write(b"ignored")
    second.finish()


def test_the_write_deadline_cuts_a_client_that_reads_nothing():
    reactor = MemoryReactorClock()
    connection = App(reactor, limits=Limits(write_timeout=5)).buildProtocol(None)
    transport = Transport()
    connection.makeConnection(transport)
    assert connection.write_deadline and transport.producer is connection and transport.streaming
    connection.dataReceived(b"GET /hold HTTP/1.1\r\nHost: x\r\n\r\n")
    connection.pauseProducing()  # as the transport does when its buffer is full
    reactor.advance(4.9)
    assert not transport.aborted
    reactor.advance(0.1)
    assert transport.aborted and connection.closing


def test_a_producer_writes_through_the_request_with_framing():
    _, site, connection, transport = connect()
    connection.dataReceived(b"GET /hold HTTP/1.1\r\nHost: x\r\n\r\n")
    request = site.held[0]

    class Pull:
        def resumeProducing(self):
            request.write(b"data")

        def stopProducing(self):
            pass

    producer = Pull()
    request.registerProducer(producer, False)
    # The transport asks the connection, which asks the producer.
    assert connection.producer is producer
    assert transport.producer is connection and not transport.streaming
    transport.producer.resumeProducing()
    request.unregisterProducer()
    request.finish()
    assert connection.producer is None
    assert transport.producer is connection and transport.streaming
    assert transport.value().endswith(b"\r\n\r\n4\r\ndata\r\n0\r\n\r\n")


def test_last_modified_redirects_and_connection_close_from_the_response():
    _, site, connection, transport = connect()
    since = b"If-Modified-Since: Sun, 06 Nov 1994 08:49:37 GMT\r\n"
    connection.dataReceived(
        b"GET /hold HTTP/1.1\r\nHost: x\r\n" + since + b"\r\nGET /hold HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    request = site.held[0]
    assert request.setLastModified(784111777) is CACHED and request.code == 304
    request.finish()
    head = transport.value()
    assert head.startswith(b"HTTP/1.1 304 ") and b"Content-Length" not in head
    assert b"\r\nLast-Modified: Sun, 06 Nov 1994 08:49:37 GMT\r\n" in head
    transport.clear()
    request = site.held[1]
    request.setHeader(b"Connection", b"close")
    request.redirect(b"/elsewhere/")
    request.finish()
    head = transport.value()
    assert head.startswith(b"HTTP/1.1 302 Found\r\n") and b"\r\nLocation: /elsewhere/\r\n" in head
    assert transport.disconnecting


def test_twisted_web_static_files_are_served_through_the_request(tmp_path):
    from twisted.web import resource, static
    from twisted.web.server import NOT_DONE_YET

    (tmp_path / "a.txt").write_bytes(b"0123456789")
    (tmp_path / "sub").mkdir()
    files = static.File(str(tmp_path))
    _, site, connection, transport = connect()

    def handle(request):  # as the site's router does
        request.postpath = request.path.split(b"/")[1:]
        body = resource.getChildForRequest(files, request).render(request)
        if body is not NOT_DONE_YET:
            if body:
                request.setHeader(b"content-length", b"%d" % len(body))
                request.write(body)
            request.finish()
        while connection.producer is not None:  # a pull producer, as the reactor drives it
            transport.producer.resumeProducing()

    site.handle = handle
    connection.dataReceived(
        b"GET /a.txt HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /a.txt HTTP/1.1\r\nHost: x\r\nRange: bytes=2-4\r\n\r\n"
        b"GET /a.txt HTTP/1.1\r\nHost: x\r\nIf-Modified-Since: Fri, 01 Jan 2100 00:00:00 GMT\r\n\r\n"
        b"HEAD /a.txt HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /sub HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    whole, ranged, cached, head, directory = responses(transport.value())
    assert whole.startswith(b"HTTP/1.1 200 ") and whole.endswith(b"\r\n\r\n0123456789")
    assert b"\r\nLast-Modified: " in whole and b"\r\nContent-Type: text/plain" in whole
    assert ranged.startswith(b"HTTP/1.1 206 ") and ranged.endswith(b"\r\n\r\n234")
    assert b"\r\nContent-Range: bytes 2-4/10\r\n" in ranged
    assert cached.startswith(b"HTTP/1.1 304 ") and cached.endswith(b"\r\n\r\n")
    assert b"\r\nContent-Length: 10\r\n" in head and head.endswith(b"\r\n\r\n")
    assert directory.startswith(b"HTTP/1.1 302 ") and b"\r\nLocation: " in directory


def test_any_split_of_a_pipeline_gives_the_same_answers():
    pipeline = (
        b"\r\nGET /hello HTTP/1.1\r\nHost: x\r\n\r\n"
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
        b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3;x=y\r\nabc\r\n10\r\n" + b"d" * 16 + b"\r\n0\r\nT: 1\r\nU: 2\r\n\r\n"
        b"POST /echo HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: x\r\nContent-Length: 2\r\n\r\nup"
        b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        b"HEAD /stream HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /stream HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"
    )
    _, site, connection, transport = connect()
    connection.dataReceived(pipeline)
    expected = transport.value()
    assert not [r for r in site.handled if r.getHeader(b"T") or r.getHeader(b"U")]  # trailers
    assert expected.count(b"HTTP/1.1 200 OK") == 7 and expected.endswith(b"abcdefgh")
    for seed in range(200):
        assert feed_in_pieces(pipeline, seed, 40)[1].value() == expected
