"""
The limits of the HTTP side on a fake clock, in memory: the request-head
deadline (408), the head's size and header count (431), bare LF line ends
(400), the connection cap (the connection that waited longest for a head
makes room; 503 when none does), forwarded hops that are not addresses, the
default --max-connections, and the write deadline of a streaming response.
"""

import threading
from types import SimpleNamespace

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.server import NOT_DONE_YET

from twistedlrp.options import Options
from twistedlrp.web import limits
from twistedlrp.web.limits import Limits, default_max_connections
from twistedlrp.web.site import BusyAnswer, LRPSite, Router
from twistedlrp.web.wsgi import _WSGIResponse

REQUEST = b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n"


class Answer:
    """A resource answering at once, or holding every request (C{hold})."""

    def __init__(self, hold=False):
        self.hold = hold
        self.held = []

    def render(self, request):
        if self.hold:
            self.held.append(request)
            return NOT_DONE_YET
        return b"ok\n"


class Transport(StringTransport):
    """A StringTransport that says it was aborted, and may be half-closed."""

    aborted = False
    write_closed = False

    def abortConnection(self):
        self.aborted = True
        super().abortConnection()

    def loseWriteConnection(self):
        self.write_closed = True

    def unregisterProducer(self):
        # A real transport lets twisted.web unregister twice (once per close).
        self.producer = None


def make_site(clock, application=None, **limits):
    root = Router("/-/health", Answer(), [], application or Answer())
    return LRPSite(
        clock,
        root,
        max_body_size=1000,
        proxy_headers=True,
        forwarded_allow_ips=["127.0.0.1", "10.0.0.0/8"],
        access_log_path=None,
        limits=Limits(max_connections=limits.pop("max_connections", 100), **limits),
    )


def connect(site, port=40000):
    peer = IPv4Address("TCP", "127.0.0.1", port)
    channel = site.buildProtocol(peer)
    transport = Transport(peerAddress=peer)
    channel.makeConnection(transport)
    return channel, transport


def lose(channel):
    from twisted.internet.error import ConnectionDone

    channel.connectionLost(Failure(ConnectionDone()))


def status(transport) -> bytes:
    return transport.value().split(b"\r\n", 1)[0]


# -- the request-head deadline ------------------------------------------------


def test_a_slow_head_gets_408_at_the_deadline_though_bytes_keep_coming():
    clock = Clock()
    site = make_site(clock, header_timeout=10)
    channel, transport = connect(site)
    channel.dataReceived(b"GET / HTTP/1.1\r\n")
    for _ in range(9):
        clock.advance(1)
        channel.dataReceived(b"X")  # a byte a second resets no deadline
    assert not transport.disconnecting
    clock.advance(1)
    assert status(transport) == b"HTTP/1.1 408 Request Timeout"
    assert b"Connection: close\r\n" in transport.value()
    assert transport.disconnecting
    # A client that does not read the answer is cut a little later.
    clock.advance(limits.ANSWER_SECONDS)
    assert transport.aborted


def test_a_connection_that_sends_nothing_is_closed_without_an_answer():
    clock = Clock()
    site = make_site(clock, header_timeout=10)
    channel, transport = connect(site)
    clock.advance(9.9)
    assert not transport.disconnecting
    clock.advance(0.1)
    assert transport.disconnecting
    assert transport.value() == b""


def test_the_deadline_stops_once_the_head_is_complete():
    clock = Clock()
    application = Answer(hold=True)
    site = make_site(clock, application, header_timeout=10)
    channel, transport = connect(site)
    channel.dataReceived(REQUEST)
    clock.advance(30)  # the view takes its time: no 408
    assert transport.value() == b"" and not transport.disconnecting
    request = application.held[0]
    request.write(b"done\n")
    request.finish()
    assert status(transport) == b"HTTP/1.1 200 OK"


def test_each_request_on_a_keep_alive_connection_is_timed_from_its_first_byte():
    clock = Clock()
    site = make_site(clock, header_timeout=10)
    channel, transport = connect(site)
    clock.advance(9)
    channel.dataReceived(REQUEST)
    assert status(transport) == b"HTTP/1.1 200 OK"
    transport.clear()
    # Idle between requests: the keep-alive timeout applies, not the head deadline.
    clock.advance(30)
    assert not transport.disconnecting
    channel.dataReceived(b"GET / HTTP/1.1\r\n")
    clock.advance(9.9)
    assert not transport.disconnecting
    clock.advance(0.1)
    assert status(transport) == b"HTTP/1.1 408 Request Timeout"


def test_a_pipelined_partial_head_is_timed_too():
    clock = Clock()
    site = make_site(clock, header_timeout=10)
    channel, transport = connect(site)
    channel.dataReceived(REQUEST + b"GET /second HTTP/1.1\r\nHo")
    assert status(transport) == b"HTTP/1.1 200 OK"
    clock.advance(10)
    assert transport.value().count(b"HTTP/1.1 ") == 2
    assert b"HTTP/1.1 408 Request Timeout" in transport.value()


def test_header_timeout_zero_is_no_deadline():
    clock = Clock()
    site = make_site(clock, header_timeout=0)
    channel, transport = connect(site)
    channel.dataReceived(b"GET / HTTP/1.1\r\n")
    clock.advance(59)
    assert not transport.disconnecting


# -- the size of the head ------------------------------------------------------


def _head_of(size: int) -> bytes:
    """A request head of exactly C{size} bytes, final CRLF included."""
    start = b"GET / HTTP/1.1\r\nHost: x\r\nX-Pad: "
    end = b"\r\n\r\n"
    return start + b"a" * (size - len(start) - len(end)) + end


@pytest.mark.parametrize("split", [False, True])
def test_a_head_over_max_header_size_gets_431(split):
    clock = Clock()
    site = make_site(clock, max_header_size=4096)
    channel, transport = connect(site)
    channel.dataReceived(_head_of(4096))
    assert status(transport) == b"HTTP/1.1 200 OK"
    channel, transport = connect(site)
    head = _head_of(4097)
    if split:
        for i in range(0, len(head), 100):
            channel.dataReceived(head[i : i + 100])
    else:
        channel.dataReceived(head)
    assert status(transport) == b"HTTP/1.1 431 Request Header Fields Too Large"
    assert transport.value().endswith(b"\r\n\r\nRequest header fields too large.\n")
    assert transport.disconnecting


def test_an_endless_line_gets_431_without_being_kept():
    clock = Clock()
    site = make_site(clock, max_header_size=4096)
    channel, transport = connect(site)
    channel.dataReceived(b"GET / HTTP/1.1\r\nX-Long: ")
    for _ in range(5):
        channel.dataReceived(b"b" * 1000)
    assert status(transport) == b"HTTP/1.1 431 Request Header Fields Too Large"


def test_too_many_header_lines_get_431():
    clock = Clock()
    site = make_site(clock)
    channel, transport = connect(site)
    channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-A: b\r\n" * 499 + b"\r\n")
    assert status(transport) == b"HTTP/1.1 200 OK"
    channel, transport = connect(site)
    channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-A: b\r\n" * 500 + b"\r\n")
    assert status(transport) == b"HTTP/1.1 431 Request Header Fields Too Large"


# -- bad request heads --------------------------------------------------------


@pytest.mark.parametrize(
    "chunks",
    [
        [b"GET / HTTP/1.1\nHost: x\n\n"],
        [b"GET / HTTP/1.1\n", b"Host: x\n", b"\n"],
        [b"GET / HTTP/1.1\r\nHost: x\nX-Other: y\r\n\r\n"],
    ],
)
def test_bare_line_feeds_get_400(chunks):
    clock = Clock()
    site = make_site(clock)
    channel, transport = connect(site)
    for chunk in chunks:
        channel.dataReceived(chunk)
    assert status(transport) == b"HTTP/1.1 400 Bad Request"
    assert b"Connection: close\r\n" in transport.value()
    assert transport.disconnecting


def test_a_cr_at_the_end_of_a_packet_is_not_a_bare_line_feed():
    clock = Clock()
    site = make_site(clock)
    channel, transport = connect(site)
    for chunk in (b"GET / HTTP/1.1\r", b"\nHost: x\r", b"\n\r", b"\n"):
        channel.dataReceived(chunk)
    assert status(transport) == b"HTTP/1.1 200 OK"


class Seen(Answer):
    """Answers at once, keeping what each request looked like."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def render(self, request):
        self.seen.append((request.uri, [v for k, v in request.headers if k == b"host"]))
        return b"ok\n"


def test_an_absolute_form_target_reaches_the_application_as_a_path_with_its_host():
    application = Seen()
    channel, transport = connect(make_site(Clock(), application))
    channel.dataReceived(
        b"GET http://evil.example/x?y=1 HTTP/1.1\r\nHost: good\r\n\r\n"
        b"GET HTTPS://h HTTP/1.1\r\n\r\n"
    )
    assert application.seen == [(b"/x?y=1", [b"evil.example"]), (b"/", [b"h"])]
    assert transport.value().count(b"HTTP/1.1 200 OK") == 2


@pytest.mark.parametrize(
    "head",
    [
        b"GET * HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET x HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET http://a@b/ HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: x\r\nHost: x\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: x\r\nA: b\r\n c\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: x\r\n\tc\r\n\r\n",
        b"POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + b"1" * 17 + b"\r\n",
    ],
)
def test_heads_the_application_never_sees_get_400(head):
    application = Seen()
    channel, transport = connect(make_site(Clock(), application))
    channel.dataReceived(head)
    assert status(transport) == b"HTTP/1.1 400 Bad Request"
    assert transport.disconnecting
    assert application.seen == []
    assert b"Connection: close\r\n" in transport.value()


def test_options_star_is_answered_without_the_application():
    application = Seen()
    channel, transport = connect(make_site(Clock(), application))
    channel.dataReceived(b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status(transport) == b"HTTP/1.1 200 OK"
    assert b"content-length: 0\r\n" in transport.value().lower()
    assert application.seen == [] and not transport.disconnecting


def test_a_chunk_over_the_body_limit_gets_413_on_its_size_line():
    application = Seen()
    channel, transport = connect(make_site(Clock(), application))  # 1000 bytes at most
    channel.dataReceived(
        b"POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"100\r\n" + b"a" * 256 + b"\r\n3e9\r\n"
    )
    assert status(transport) == b"HTTP/1.1 413 Content Too Large"
    assert application.seen == []


def test_twisted_web_s_own_400_says_connection_close():
    clock = Clock()
    site = make_site(clock)
    channel, transport = connect(site)
    channel.dataReceived(b"NOT A REQUEST LINE AT ALL\r\n")
    assert status(transport) == b"HTTP/1.1 400 Bad Request"
    assert b"Content-Length: " in transport.value()
    assert b"Connection: close\r\n" in transport.value()


@pytest.mark.parametrize(
    "content_type, body",
    [
        (b"application/x-www-form-urlencoded", b"a=1&b=2"),
        (b"multipart/form-data; boundary=x", b"--x\r\nnot a part"),
    ],
)
def test_a_form_body_is_left_to_the_application_unparsed(content_type, body):
    clock = Clock()
    application = Answer(hold=True)
    site = make_site(clock, application)
    channel, transport = connect(site)
    channel.dataReceived(
        b"POST /form HTTP/1.1\r\nHost: x\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n%s"
        % (content_type, len(body), body)
    )
    (request,) = application.held
    assert request.args == {}
    assert request.content.read() == body
    assert transport.value() == b""


# -- the connection cap -------------------------------------------------------


def test_at_the_cap_the_connection_waiting_longest_for_a_head_makes_room():
    clock = Clock()
    application = Answer(hold=True)
    site = make_site(clock, application, max_connections=3)
    busy, busy_transport = connect(site, 1)
    busy.dataReceived(REQUEST)  # a real request, held by the view
    clock.advance(1)
    oldest, oldest_transport = connect(site, 2)
    oldest.dataReceived(b"GET / HTTP/1.1\r\nX-")
    clock.advance(1)
    newer, newer_transport = connect(site, 3)
    assert site.open_connections == 3
    clock.advance(1)
    fresh, fresh_transport = connect(site, 4)
    assert oldest_transport.aborted
    assert not (busy_transport.disconnecting or newer_transport.disconnecting)
    assert site.open_connections == 3
    assert site.evictions == 1
    lose(oldest)
    assert len(site.channels) == 3
    # The fresh connection is served.
    fresh.dataReceived(REQUEST)
    assert len(application.held) == 2


def test_an_idle_keep_alive_connection_makes_room_too():
    clock = Clock()
    site = make_site(clock, max_connections=2)
    idle, idle_transport = connect(site, 1)
    idle.dataReceived(REQUEST)
    assert status(idle_transport) == b"HTTP/1.1 200 OK"
    clock.advance(1)
    slow, slow_transport = connect(site, 2)
    slow.dataReceived(b"GET")
    connect(site, 3)
    assert idle_transport.aborted
    assert not slow_transport.disconnecting


def test_at_the_cap_with_every_connection_busy_a_new_one_gets_503():
    clock = Clock()
    application = Answer(hold=True)
    site = make_site(clock, application, max_connections=2)
    for port in (1, 2):
        channel, _ = connect(site, port)
        channel.dataReceived(REQUEST)
    refused = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 3))
    assert isinstance(refused, BusyAnswer)
    transport = Transport()
    refused.makeConnection(transport)
    assert status(transport) == b"HTTP/1.1 503 Service Unavailable"
    assert b"Retry-After: 1\r\n" in transport.value()
    assert transport.write_closed
    clock.advance(2)
    assert transport.aborted
    assert site.refusals == 1


def test_the_cap_warns_once_a_minute(monkeypatch):
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        clock = Clock()
        site = make_site(clock, max_connections=1)
        for port in range(5):
            connect(site, port)
        clock.advance(61)
        connect(site, 10)
    finally:
        globalLogPublisher.removeObserver(events.append)
    warnings = [e for e in events if e.get("log_level") == LogLevel.warn and "max" in e]
    assert len(warnings) == 2


# -- forwarded hops -----------------------------------------------------------


class ForwardedRequest:
    def __init__(self, forwarded_for, peer="127.0.0.1", channel=None):
        self.headers = [(b"x-forwarded-for", forwarded_for)]
        self._peer = IPv4Address("TCP", peer, 5555)
        self.channel = channel or SimpleNamespace(judged=None)
        self.peer_asked = 0

    def getHeader(self, name):
        return None

    def getClientAddress(self):
        self.peer_asked += 1
        return self._peer

    def isSecure(self):
        return False


@pytest.mark.parametrize(
    "forwarded, client",
    [
        (b"203.0.113.9", "203.0.113.9"),
        (b"6.6.6.6, 203.0.113.9", "203.0.113.9"),
        (b"203.0.113.9, 10.0.0.2", "203.0.113.9"),
        # A hop that is not an address ends the walk: the proxy before it
        # (or the peer) stays the client.
        (b"unknown", "127.0.0.1"),
        (b"<script>", "127.0.0.1"),
        (b"203.0.113.9, unknown", "127.0.0.1"),
        (b"6.6.6.6, <script>, 10.0.0.2", "10.0.0.2"),
        (b"2001:DB8::1", "2001:db8::1"),
    ],
)
def test_a_forwarded_hop_that_is_not_an_address_never_becomes_the_client(forwarded, client):
    site = make_site(Clock())
    assert site.client_of(ForwardedRequest(forwarded)) == (client, "http")


def test_the_peer_is_judged_once_per_connection_and_each_request_forwards_its_own():
    site = make_site(Clock())
    channel = SimpleNamespace(judged=None)
    first = ForwardedRequest(b"203.0.113.9", channel=channel)
    second = ForwardedRequest(b"198.51.100.7", channel=channel)
    assert site.client_of(first) == ("203.0.113.9", "http")
    assert site.client_of(second) == ("198.51.100.7", "http")
    assert (first.peer_asked, second.peer_asked) == (1, 0)
    # Another connection is judged afresh: an untrusted peer's header is ignored.
    stranger = ForwardedRequest(b"203.0.113.9", peer="192.0.2.50")
    assert site.client_of(stranger) == ("192.0.2.50", "http")


# -- the defaults -------------------------------------------------------------


def test_default_max_connections_is_the_file_limit_minus_a_reserve():
    assert default_max_connections(8, 2, limit=1024) == 1024 - 128 - 4 * 8 - 10 * 2
    assert default_max_connections(8, 2, limit=65536) == 65536 - 180
    # A small limit still leaves half of it to connections.
    assert default_max_connections(64, 16, limit=256) == 128


def test_limits_from_options():
    options = Options()
    options.parseOptions(["--threads", "4", "--workers", "3"])
    limits = Limits.from_options(options)
    assert limits.header_timeout == 60 and limits.write_timeout == 60
    assert limits.max_header_size == 64 * 1024
    assert limits.max_connections == default_max_connections(4, 3)
    options = Options()
    options.parseOptions(
        [
            "--no-jobs",
            "--header-timeout=2.5",
            "--max-header-size=8192",
            "--max-connections=77",
            "--write-timeout=0",
        ]
    )
    limits = Limits.from_options(options)
    assert (limits.header_timeout, limits.max_header_size, limits.max_connections) == (
        2.5,
        8192,
        77,
    )
    assert limits.write_timeout == 0
    options = Options()
    options.parseOptions(["--no-jobs"])
    assert Limits.from_options(options).max_connections == default_max_connections(8, 0)


# -- the write deadline of a streaming response --------------------------------


class InlineReactor:
    """Runs what a pool thread hands the reactor at once, in that thread."""

    def __init__(self):
        self.calls = []

    def callFromThread(self, fn, *args):
        self.calls.append(fn.__name__)
        fn(*args)


class StreamRequest:
    def __init__(self, reads=False):
        self.aborted = False
        transport = SimpleNamespace(abortConnection=lambda: setattr(self, "aborted", True))
        self.channel = SimpleNamespace(transport=transport)
        self.written = []
        self.responseHeaders = Headers()
        self.code = 200
        self.reads = reads
        self.finished = False

    def setResponseCode(self, code, reason=b""):
        self.code = code

    def setHeader(self, name, value):
        self.responseHeaders.setRawHeaders(name, [value])

    def addHeader(self, name, value):
        self.responseHeaders.addRawHeader(name, value)

    def removeHeader(self, name):
        self.responseHeaders.removeHeader(name)

    def responseHeader(self, name):
        return (self.responseHeaders.getRawHeaders(name) or [None])[-1]

    def registerProducer(self, producer, streaming):
        if not self.reads:
            # The client reads nothing: the transport pauses the producer at once.
            producer.pauseProducing()

    def unregisterProducer(self):
        pass

    def write(self, data):
        self.written.append(data)

    def finish(self):
        self.finished = True


def _stream_app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return iter([b"first\n", b"second\n", b"third\n"])


def test_a_client_that_reads_nothing_frees_the_thread_after_the_write_deadline():
    reactor = InlineReactor()
    request = StreamRequest()

    def application(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])
        return iter([b"first\n", b"second\n", b"third\n"])

    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/stream"}
    response = _WSGIResponse(reactor, request, application, environ, write_timeout=0.05)
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        thread = threading.Thread(target=response.run)
        thread.start()
        thread.join(5)
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert not thread.is_alive()
    assert request.written == []
    assert reactor.calls[-1] == "_cut" and request.aborted
    assert response.disconnected
    warnings = [e for e in events if e.get("log_level") == LogLevel.warn]
    assert len(warnings) == 1
    assert "did not read the response" in str(warnings[0]["reason"])
    assert not [e for e in events if e.get("log_level") in (LogLevel.error, LogLevel.critical)]


# -- what each response costs less -------------------------------------------------------


def test_the_date_header_is_the_current_second_and_follows_the_clock(monkeypatch):
    from email.utils import parsedate_to_datetime

    from twistedlrp.web import site as site_module

    now = [1_800_000_000.2]
    monkeypatch.setattr(site_module.time, "time", lambda: now[0])
    first = site_module.http_date()
    assert parsedate_to_datetime(first.decode()).timestamp() == 1_800_000_000
    now[0] += 0.5
    assert site_module.http_date() == first
    now[0] += 1.0
    assert parsedate_to_datetime(site_module.http_date().decode()).timestamp() == 1_800_000_001


def test_each_request_on_a_connection_sees_its_addresses_asked_for_once():
    class AsksHost:  # as the WSGI container does, for SERVER_NAME and SERVER_PORT
        def render(self, request):
            request.getHost()
            return b"ok\n"

    site = make_site(Clock(), application=AsksHost())
    channel, transport = connect(site)
    asked = []
    real_host = transport.getHost
    transport.getHost = lambda: asked.append("host") or real_host()
    real_peer = transport.getPeer
    transport.getPeer = lambda: asked.append("peer") or real_peer()
    channel.dataReceived(REQUEST * 3)
    assert transport.value().count(b"HTTP/1.1 200") == 3
    assert sorted(asked) == ["host", "peer"]


def test_an_error_while_routing_is_answered_500_in_plain_text():
    class Broken:
        def render(self, request):
            raise RuntimeError("a bug in routing")

    site = make_site(Clock(), application=Broken())
    channel, transport = connect(site)
    errors = []
    globalLogPublisher.addObserver(errors.append)
    try:
        channel.dataReceived(REQUEST)
    finally:
        globalLogPublisher.removeObserver(errors.append)
    answer = transport.value()
    assert answer.startswith(b"HTTP/1.1 500 ")
    assert b"content-type: text/plain; charset=utf-8" in answer.lower()
    assert b"content-length: 22" in answer.lower()
    assert answer.endswith(b"\r\n\r\nInternal Server Error\n")
    assert b"\r\nserver: " in answer.lower() and b"\r\ndate: " in answer.lower()
    assert any("Error while routing" in str(e.get("log_format")) for e in errors)


def test_with_the_transport_keeping_the_deadline_the_thread_waits_for_its_cut():
    # The transport cuts a client --write-timeout after its last progress; a
    # slow client may take longer than that in all, so the thread waits.
    reactor, request = InlineReactor(), StreamRequest()
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/stream"}
    response = _WSGIResponse(
        reactor, request, _stream_app, environ, write_timeout=0.05, reactor_deadline=True
    )
    thread = threading.Thread(target=response.run)
    thread.start()
    thread.join(0.5)
    assert thread.is_alive()
    response.connection_lost(None)  # the transport's cut
    thread.join(5)
    assert not thread.is_alive()
    assert "_cut" not in reactor.calls and request.written == []


def test_small_chunks_reach_the_reactor_together_and_in_order():
    reactor, request = InlineReactor(), StreamRequest(reads=True)

    def application(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])
        return (b"%d\n" % i for i in range(1000))

    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/stream"}
    _WSGIResponse(reactor, request, application, environ).run()
    assert b"".join(request.written) == b"".join(b"%d\n" % i for i in range(1000))
    assert request.finished
    assert reactor.calls[0] == "_start_stream" and reactor.calls[-1] == "_finish_stream"


def test_a_stream_beyond_the_stream_threads_is_answered_503_before_its_head():
    from twistedlrp.web.limits import StreamSlots

    slots = StreamSlots(1)
    assert slots.take()  # another thread streams
    reactor, request = InlineReactor(), StreamRequest(reads=True)
    closed = []

    def application(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])

        def chunks():
            try:
                yield b"never sent\n"
            finally:
                closed.append(True)

        return chunks()

    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/stream"}
    _WSGIResponse(reactor, request, application, environ, streams=slots).run()
    assert request.code == 503
    assert request.responseHeaders.getRawHeaders(b"retry-after") == [b"1"]
    assert (
        b"".join(request.written) == b"Server busy: too many streaming responses. Retry shortly.\n"
    )
    assert closed == [True]
    assert (slots.taken, slots.refused) == (1, 1)
    slots.give_back()
    # With a free slot it streams, and gives the slot back at the end.
    request = StreamRequest(reads=True)
    _WSGIResponse(InlineReactor(), request, _stream_app, environ, streams=slots).run()
    assert request.code == 200 and b"".join(request.written) == b"first\nsecond\nthird\n"
    assert slots.taken == 0


# -- the access log --------------------------------------------------------------


@pytest.mark.parametrize(
    "text, masked",
    [
        ("/-/jobs/1/events?token=abc.def", "/-/jobs/1/events?token=[masked]"),
        ("/x?a=1&TOKEN=abc&b=2", "/x?a=1&TOKEN=[masked]&b=2"),
        ("/x?a=1;token=abc#f", "/x?a=1;token=[masked]#f"),
        ("/x?mytoken=abc&token=", "/x?mytoken=abc&token=[masked]"),
        ("/token=abc", "/token=abc"),
        ("-", "-"),
    ],
)
def test_the_access_log_masks_token_values(text, masked):
    from twistedlrp.web.accesslog import mask_tokens

    assert mask_tokens(text) == masked


def test_a_cut_for_the_write_timeout_names_the_request_without_its_token():
    application = Answer(hold=True)
    channel, transport = connect(make_site(Clock(), application, write_timeout=5))
    channel.dataReceived(b"GET /-/jobs/1/events?token=SECRET HTTP/1.1\r\nHost: x\r\n\r\n")
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        channel._write_stalled()
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert transport.aborted
    (warning,) = [e for e in events if e.get("log_level") == LogLevel.warn]
    assert warning["what"] == "GET /-/jobs/1/events?token=[masked]"
    assert warning["freed"] == ""


def test_a_response_longer_than_its_content_length_is_cut_and_logged():
    class Long:
        def render(self, request):
            request.setHeader(b"content-length", b"2")
            request.write(b"abc")
            request.finish()
            return NOT_DONE_YET

    channel, transport = connect(make_site(Clock(), Long()))
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        channel.dataReceived(REQUEST + REQUEST)
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert transport.value().endswith(b"\r\n\r\nab") and transport.disconnecting
    assert transport.value().count(b"HTTP/1.1 200") == 1
    (warning,) = [e for e in events if e.get("log_level") == LogLevel.warn]
    assert "longer than its Content-Length" in warning["log_format"]
    assert warning["uri"] == "/hello"
