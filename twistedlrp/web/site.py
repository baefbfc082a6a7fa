"""
The HTTP side of the server: connections, requests and where each goes.

A request is routed by path: the health endpoint and static files are
answered in the reactor; everything else goes to the WSGI container, which
runs Django in the thread pool. This module also enforces the limits of
docs/serving.md ("Limits"): a deadline for the request head (408), its size
and number of header lines (431), the number of open connections (the one
that waited longest for a request head makes room), the body size (413
before the body is read); it answers a request head with bare LF line ends
with 400, decides which forwarded headers to trust, writes the access log,
and drains connections at shut-down.
"""

from __future__ import annotations

import ipaddress
import resource as _resource
from collections import OrderedDict
from dataclasses import dataclass, field
from urllib.parse import unquote_to_bytes

from twisted.internet import defer, error, protocol
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.resource import Resource

from twistedlrp.web import static

log = Logger()
access_log = Logger(namespace="twistedlrp.access")

SERVER_HEADER = b"twistedlrp"
# Seconds an idle keep-alive connection stays open.
KEEP_ALIVE_TIMEOUT = 60
# Seconds we keep reading (and discarding) an oversized body after the 413,
# so the client reads our answer instead of a connection reset.
_LINGER_SECONDS = 5.0

# The defaults of the limits (the options say the same, docs/serving.md).
HEADER_TIMEOUT = 60.0  # --header-timeout: seconds to receive a whole request head
MAX_HEADER_SIZE = 64 * 1024  # --max-header-size: request line + headers, in bytes
MAX_HEADERS = 500  # header lines in one request head (twisted.web's own cap)
WRITE_TIMEOUT = 60.0  # --write-timeout: seconds a streaming response may wait for the client
# The default --max-connections is the soft open-file limit minus what the
# rest of the process may need at once: FD_RESERVE for the listening and
# job-service sockets, logs, the reactor's own descriptors, outbound HTTP,
# static files being sent and imports; FD_PER_THREAD for each pool thread's
# database connection (SQLite in WAL mode holds 3 files); FD_PER_WORKER for
# each worker's 5 pipes, twice (a recycled worker overlaps its successor).
FD_RESERVE = 128
FD_PER_THREAD = 4
FD_PER_WORKER = 10
# Seconds a refused or timed-out client has to read our short answer.
_ANSWER_SECONDS = 5.0
# 503 answers (connection limit, every connection busy) sent at once at most;
# beyond, a new connection is closed without one.
_MAX_BUSY_ANSWERS = 32
# Seconds between two warnings that the connection limit is reached.
_FULL_WARNING_INTERVAL = 60.0


def open_file_limit() -> int:
    """@return: the soft C{RLIMIT_NOFILE} of the process (2**20 if unlimited)."""
    soft, _ = _resource.getrlimit(_resource.RLIMIT_NOFILE)
    if soft == _resource.RLIM_INFINITY or soft > 2**20:
        return 2**20
    return soft


def default_max_connections(threads: int, workers: int, limit: int | None = None) -> int:
    """
    @return: the default C{--max-connections}: the open-file C{limit} (the
        process's soft limit by default) minus C{FD_RESERVE}, minus
        C{FD_PER_THREAD} per pool thread and C{FD_PER_WORKER} per worker
        process; at least half the limit.
    """
    if limit is None:
        limit = open_file_limit()
    reserve = FD_RESERVE + FD_PER_THREAD * threads + FD_PER_WORKER * workers
    return max(limit - reserve, limit // 2, 1)


@dataclass(frozen=True)
class Limits:
    """
    The limits of the HTTP side (docs/serving.md, "Limits"). A timeout of 0
    means none.
    """

    header_timeout: float = HEADER_TIMEOUT
    max_header_size: int = MAX_HEADER_SIZE
    max_headers: int = MAX_HEADERS
    max_connections: int = field(default_factory=lambda: default_max_connections(8, 2))
    write_timeout: float = WRITE_TIMEOUT

    @classmethod
    def from_options(cls, options) -> Limits:
        """@return: the limits that the C{twistd lrp} C{options} set."""
        max_connections = options.get("max-connections")
        if not max_connections:
            runs_workers = not (options.get("no-jobs") or options.get("jobs-connect"))
            workers = options.get("workers", 0) if runs_workers else 0
            max_connections = default_max_connections(options.get("threads", 8), workers)
        return cls(
            header_timeout=options.get("header-timeout", HEADER_TIMEOUT),
            max_header_size=options.get("max-header-size", MAX_HEADER_SIZE),
            max_connections=max_connections,
            write_timeout=options.get("write-timeout", WRITE_TIMEOUT),
        )


def _short_answer(status: bytes, body: bytes, extra: bytes = b"") -> bytes:
    """A whole response that ends the connection (written straight to the transport)."""
    return (
        b"HTTP/1.1 " + status + b"\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"Content-Length: "
        + str(len(body)).encode()
        + b"\r\n"
        + extra
        + b"Connection: close\r\n\r\n"
        + body
    )


class _Discard:
    """A request body sink that keeps nothing (for refused bodies)."""

    def write(self, data):
        pass

    def seek(self, *args):
        return 0

    def tell(self):
        return 0

    def read(self, *args):
        return b""

    def close(self):
        pass


class TrustedProxies:
    """The addresses whose X-Forwarded-* headers are believed."""

    def __init__(self, allowed: list[str]):
        self.everyone = "*" in allowed
        self.networks = [ipaddress.ip_network(a, strict=False) for a in allowed if a != "*"]

    def __contains__(self, address: str) -> bool:
        if self.everyone:
            return True
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in self.networks)


class LRPRequest(server.Request):
    """A request that enforces the body limit and knows its real client."""

    # Django parses bodies itself; twisted.web would parse form posts again.
    _parsePOSTFormSubmission = False
    defaultContentType = None
    lrp_rejected = False
    lrp_client = ""
    lrp_scheme = "http"

    def gotLength(self, length):
        self._lrp_received = 0
        site = self.channel.site
        if length is not None and length > site.max_body_size:
            self._refuse_body()
            return
        super().gotLength(length)

    def handleContentChunk(self, data):
        if self.lrp_rejected:
            return
        self._lrp_received += len(data)
        if self._lrp_received > self.channel.site.max_body_size:
            # A chunked body with no declared length grew past the limit.
            self.content.close()
            self._refuse_body()
            return
        self.content.write(data)

    def _refuse_body(self) -> None:
        self.lrp_rejected = True
        self.content = _Discard()
        channel = self.channel
        channel.persistent = False
        body = b"Request body too large.\n"
        channel.transport.write(_short_answer(b"413 Content Too Large", body))
        self.code = 413
        self.sentLength = len(body)
        # Read the rest of the body (and drop it) for a little while, then close.
        channel.site.reactor.callLater(_LINGER_SECONDS, channel.transport.abortConnection)

    def requestReceived(self, command, path, version):
        if self.lrp_rejected:
            self.method, self.uri, self.clientproto = command, path, version
            self.path = path.split(b"?", 1)[0]
            self.channel.site.log(self)
            self.channel.transport.loseConnection()
            return
        super().requestReceived(command, path, version)

    def process(self):
        site = self.channel.site
        self.site = site
        self.setHeader(b"server", SERVER_HEADER)
        self.setHeader(b"date", http.datetimeToString())
        self.lrp_client, self.lrp_scheme = site.client_of(self)
        self.prepath = []
        self.postpath = []
        try:
            body = site.root.route(self)
            if body is not server.NOT_DONE_YET:
                if body:
                    self.setHeader(b"content-length", b"%d" % len(body))
                    self.write(body)
                self.finish()
        except BaseException:
            self.processingFailed(Failure())

    def processingFailed(self, reason):
        log.failure("Error while routing {uri}", failure=reason, uri=self.uri)
        if self.startedWriting:
            self.channel.transport.abortConnection()
            return
        body = b"Internal Server Error\n"
        self.setResponseCode(500)
        self.setHeader(b"content-type", b"text/plain; charset=utf-8")
        self.setHeader(b"content-length", b"%d" % len(body))
        self.write(body)
        self.finish()
        return reason


class LRPChannel(http.HTTPChannel):
    """
    An HTTP connection the site keeps track of (to drain it at shut-down, and
    to count it against C{--max-connections}) that enforces the limits on
    request heads.

    @ivar awaiting_head: from the connection (or the end of the previous
        response) until a whole request head has arrived. Only such a
        connection may be closed to make room for a new one.
    """

    awaiting_head = False
    # Bytes of the current request head in complete lines, line ends included.
    _head_bytes = 0
    # Whether a byte of the current request has arrived.
    _head_begun = False
    # The head deadline (a DelayedCall), running while awaiting_head.
    _head_call = None
    # Answered or cut already: it is on its way out.
    closing = False

    def connectionMade(self):
        super().connectionMade()
        limits = self.site.limits
        # One line may be as long as the whole head; the head's size, and
        # the number of its header lines, are checked here (431).
        self.MAX_LENGTH = limits.max_header_size
        self.totalHeadersSize = limits.max_header_size
        self.maxHeaders = limits.max_headers
        self.site.channel_opened(self)
        self._await_head()
        # The first request head is timed from the connection.
        self._start_head_deadline()

    def connectionLost(self, reason):
        self._stop_head_deadline()
        self.site.channel_gone(self)
        super().connectionLost(reason)
        self.site.channel_closed()

    # -- the request head ------------------------------------------------

    def _await_head(self) -> None:
        self.awaiting_head = True
        self._head_bytes = 0
        self._head_begun = False
        self.site.waiting_for_head(self)

    def _start_head_deadline(self) -> None:
        timeout = self.site.limits.header_timeout
        if timeout and self._head_call is None and not self.closing:
            self._head_call = self.callLater(timeout, self._head_timed_out)

    def _stop_head_deadline(self) -> None:
        if self._head_call is not None:
            if self._head_call.active():
                self._head_call.cancel()
            self._head_call = None

    def _head_timed_out(self) -> None:
        self._head_call = None
        if not self.awaiting_head or self.closing:
            return
        if self._head_begun:
            self.answer_and_close(b"408 Request Timeout", b"Request head not received in time.\n")
        else:
            # Nothing of a request arrived: nothing to answer.
            self._close_quietly()

    def dataReceived(self, data):
        if self.awaiting_head and data and not self.closing:
            self._head_begun = True
            # A request after the first on this connection is timed from its
            # first byte (until then the keep-alive timeout applies).
            self._start_head_deadline()
        super().dataReceived(data)
        if (
            self.awaiting_head
            and self.line_mode
            and not self._busyReceiving
            and not self.closing
            and not self.transport.disconnecting
        ):
            # What is left is an incomplete line of the head.
            pending = self._buffer
            if b"\n" in pending:
                self._bare_line_feed()
            elif self._head_bytes + len(pending) > self.site.limits.max_header_size:
                self._head_too_large()

    def lineReceived(self, line):
        if self.awaiting_head:
            self._head_bytes += len(line) + 2
            if self._head_bytes > self.site.limits.max_header_size:
                return self._head_too_large()
            if b"\n" in line:
                return self._bare_line_feed()
        return super().lineReceived(line)

    def headerReceived(self, line):
        if self._receivedHeaderCount >= self.maxHeaders:
            self._head_too_large()
            return False
        return super().headerReceived(line)

    def lineLengthExceeded(self, line):
        if self.awaiting_head:
            return self._head_too_large()
        return super().lineLengthExceeded(line)

    def allHeadersReceived(self):
        # A whole head: a real request, no longer subject to the head deadline
        # and no longer one to close for room.
        self.awaiting_head = False
        self._stop_head_deadline()
        self.site.request_started(self)
        super().allHeadersReceived()

    def requestDone(self, request):
        if self.persistent and not self.closing:
            # Before twisted.web replays pipelined data into dataReceived.
            self._await_head()
        super().requestDone(request)
        if self.awaiting_head and self._buffer:
            # Answered while its bytes were being parsed: the bytes after it
            # (still in the line buffer) begin the next request.
            self._head_begun = True
            self._start_head_deadline()

    def _head_too_large(self) -> None:
        self.answer_and_close(
            b"431 Request Header Fields Too Large", b"Request header fields too large.\n"
        )

    def _bare_line_feed(self) -> None:
        self.answer_and_close(b"400 Bad Request", b"Bad request: lines must end with CRLF.\n")

    def _respondToBadRequestAndDisconnect(self):
        # twisted.web's own answer is a bare status line, without Connection: close.
        self.answer_and_close(b"400 Bad Request", b"Bad request.\n")

    # -- closing -----------------------------------------------------------

    def _leave(self) -> None:
        self.closing = True
        self.awaiting_head = False
        self.persistent = False
        self._stop_head_deadline()
        self.site.request_started(self)

    def answer_and_close(self, status: bytes, body: bytes) -> None:
        """
        Answer C{status} with a short text C{body} and close the connection,
        unless a response is under way already (then only close). A client
        that does not read the answer is cut after a few seconds.
        """
        if self.closing or self.transport is None or self.transport.disconnecting:
            return
        under_way = any(
            request.startedWriting or getattr(request, "lrp_rejected", False)
            for request in self.requests
        )
        self._leave()
        if not under_way:
            self.transport.write(_short_answer(status, body))
        self.loseConnection()
        if self._abortingCall is None:
            self._abortingCall = self.callLater(_ANSWER_SECONDS, self.forceAbortClient)

    def _close_quietly(self) -> None:
        self._leave()
        self.loseConnection()
        if self._abortingCall is None:
            self._abortingCall = self.callLater(_ANSWER_SECONDS, self.forceAbortClient)

    def evict(self) -> None:
        """
        Cut this connection (it waits for a request head; room is needed),
        and free its descriptor now: the reactor would close it only on its
        next turn, and one turn may accept hundreds of connections.
        """
        self._leave()
        transport = self.transport
        transport.abortConnection()
        # The socket's own transport, under TLS if any (tcp and unix ones
        # ignore a second connectionLost, the one abortConnection scheduled).
        while getattr(transport, "socket", None) is None and getattr(transport, "transport", None):
            transport = transport.transport
        if getattr(transport, "socket", None) is not None:
            transport.connectionLost(Failure(error.ConnectionAborted()))

    def _send100Continue(self):
        if self.requests and self.requests[-1].lrp_rejected:
            return
        super()._send100Continue()

    @property
    def idle(self) -> bool:
        return not self.requests


class _Busy(protocol.Protocol):
    """
    A connection over C{--max-connections} while every open one is busy
    with a request: answered 503 at once. The request is read and dropped
    for a moment so that the client reads the answer instead of a reset.
    """

    def __init__(self, site):
        self._site = site
        self._cut = None

    def connectionMade(self):
        self._site._busy_answers += 1
        body = b"Server busy: too many open connections. Retry shortly.\n"
        self.transport.write(_short_answer(b"503 Service Unavailable", body, b"Retry-After: 1\r\n"))
        half_close = getattr(self.transport, "loseWriteConnection", None)
        if half_close is None:  # TLS
            self.transport.loseConnection()
        else:
            half_close()
        self._cut = self._site.reactor.callLater(2.0, self.transport.abortConnection)

    def dataReceived(self, data):
        pass

    def connectionLost(self, reason):
        self._site._busy_answers -= 1
        if self._cut is not None and self._cut.active():
            self._cut.cancel()


class Router(Resource):
    """Send a request to the health endpoint, static files or the application."""

    isLeaf = True

    def __init__(self, health_path: str, health, statics: list, application):
        super().__init__()
        self._health_path = health_path.encode()
        self._health = health
        # Longest prefix first, so /static/admin/ wins over /static/.
        self._statics = sorted(
            ((prefix.encode(), static.make_static(directory)) for prefix, directory in statics),
            key=lambda item: -len(item[0]),
        )
        self._application = application

    def route(self, request):
        path = request.path
        if path == self._health_path:
            return self._health.render(request)
        for prefix, files in self._statics:
            if path.startswith(prefix) or path + b"/" == prefix:
                if request.method not in (b"GET", b"HEAD"):
                    request.setResponseCode(405)
                    request.setHeader(b"allow", b"GET, HEAD")
                    return b"Method Not Allowed\n"
                rest = path[len(prefix) :].lstrip(b"/")
                request.prepath = [s for s in prefix.split(b"/") if s]
                segments = [unquote_to_bytes(s) for s in rest.split(b"/")] if rest else [b""]
                return static.serve(files, request, segments)
        return self._application.render(request)


class LRPSite(server.Site):
    """
    The twisted.web Site of the server.

    @ivar channels: the open connections.
    """

    protocol = LRPChannel
    requestFactory = LRPRequest

    def __init__(
        self,
        reactor,
        root: Router,
        *,
        max_body_size: int,
        proxy_headers: bool,
        forwarded_allow_ips: list[str],
        access_log_path: str | None,
        limits: Limits | None = None,
    ):
        super().__init__(root, timeout=KEEP_ALIVE_TIMEOUT, reactor=reactor)
        self.limits = limits if limits is not None else Limits()
        self.root = root
        self.noisy = False
        self.displayTracebacks = False
        self.max_body_size = max_body_size
        self.proxy_headers = proxy_headers
        self.trusted = TrustedProxies(forwarded_allow_ips)
        self.channels: set[LRPChannel] = set()
        # The connections awaiting a request head, longest waiting first.
        self._awaiting: OrderedDict[LRPChannel, None] = OrderedDict()
        # Cut to make room, but not gone yet (the reactor closes them next).
        self._evicted: set[LRPChannel] = set()
        self.evictions = 0
        self.refusals = 0
        self._busy_answers = 0  # 503 answers being sent
        self._warned_full_at: float | None = None
        self._drained: defer.Deferred | None = None
        self._access_log_path = access_log_path
        self._access_file = None
        self._flush_call = None

    # -- connections ------------------------------------------------------

    @property
    def open_connections(self) -> int:
        """The open connections, not counting those cut to make room."""
        return len(self.channels) - len(self._evicted)

    def buildProtocol(self, addr):
        if self.open_connections >= self.limits.max_connections:
            if not self._make_room():
                self.refusals += 1
                self._warn_full()
                if self._busy_answers >= _MAX_BUSY_ANSWERS:
                    return None  # closed at once
                return _Busy(self)
            self.evictions += 1
            self._warn_full()
        return super().buildProtocol(addr)

    def _make_room(self) -> bool:
        """Cut the connection that has waited longest for a request head, if any."""
        while self._awaiting:
            channel, _ = self._awaiting.popitem(last=False)
            if channel.closing or channel.transport is None:
                continue
            self._evicted.add(channel)
            channel.evict()
            return True
        return False

    def _warn_full(self) -> None:
        now = self.reactor.seconds()
        if self._warned_full_at is not None and now - self._warned_full_at < _FULL_WARNING_INTERVAL:
            return
        self._warned_full_at = now
        log.warn(
            "{max} HTTP connections are open (--max-connections): each new one closes "
            "the connection that waited longest for a request head ({evicted} so far), "
            "or gets 503 when all are busy ({refused} so far)",
            max=self.limits.max_connections,
            evicted=self.evictions,
            refused=self.refusals,
        )

    def channel_opened(self, channel: LRPChannel) -> None:
        self.channels.add(channel)

    def channel_gone(self, channel: LRPChannel) -> None:
        self.channels.discard(channel)
        self._evicted.discard(channel)
        self._awaiting.pop(channel, None)

    def waiting_for_head(self, channel: LRPChannel) -> None:
        """C{channel} awaits a request head from now on: it joins the end of the line."""
        self._awaiting.pop(channel, None)
        self._awaiting[channel] = None

    def request_started(self, channel: LRPChannel) -> None:
        """C{channel} has a whole request head now, or is closing."""
        self._awaiting.pop(channel, None)

    # -- addresses ------------------------------------------------------

    def client_of(self, request) -> tuple[str, str]:
        """
        @return: the client address and URL scheme of C{request}, from the
            forwarded headers only when the peer is a trusted proxy.
        """
        peer = request.getClientAddress()
        if isinstance(peer, IPv4Address | IPv6Address):
            client, trusted = peer.host, self.proxy_headers and peer.host in self.trusted
        else:
            # A UNIX socket peer is a local proxy (nginx, say).
            client, trusted = "", self.proxy_headers
        scheme = "https" if request.isSecure() else "http"
        if not trusted:
            return client, scheme
        headers = request.requestHeaders
        forwarded_for = headers.getRawHeaders(b"x-forwarded-for")
        if forwarded_for:
            hops = [
                hop.strip()
                for hop in b",".join(forwarded_for).decode("latin-1").split(",")
                if hop.strip()
            ]
            # Walk back from the nearest hop: the first one that is not a
            # trusted proxy is the client; earlier entries may be forged. A
            # hop that is not an IP address ("unknown", or junk) ends the
            # walk: the last proxy we trust did not know its client, so
            # that proxy (or the peer) stays the client.
            for hop in reversed(hops):
                try:
                    address = str(ipaddress.ip_address(hop))
                except ValueError:
                    break
                client = address
                if address not in self.trusted:
                    break
        proto = headers.getRawHeaders(b"x-forwarded-proto")
        if proto:
            value = proto[-1].decode("latin-1").split(",")[-1].strip().lower()
            if value in ("http", "https"):
                scheme = value
        return client, scheme

    # -- access log -----------------------------------------------------

    def startFactory(self):
        super().startFactory()
        path = self._access_log_path
        if path and path != "-" and self._access_file is None:
            self._access_file = open(path, "a", encoding="utf-8")
            self._flush_call = self.reactor.callLater(1, self._flush_access_log)

    def stopFactory(self):
        super().stopFactory()
        self.close_access_log()

    def _flush_access_log(self):
        if self._access_file is not None:
            self._access_file.flush()
            self._flush_call = self.reactor.callLater(1, self._flush_access_log)

    def close_access_log(self):
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        if self._access_file is not None:
            self._access_file.close()
            self._access_file = None

    def _openLogFile(self, path):
        return None

    def log(self, request):
        if not self._access_log_path:
            return
        line = _combined_line(request, self._logDateTime or http.datetimeToLogString())
        if self._access_file is not None:
            self._access_file.write(line + "\n")
        elif self._access_log_path == "-":
            access_log.info("{line}", line=line)

    # -- shut-down ------------------------------------------------------

    def drain(self) -> defer.Deferred:
        """
        Close idle connections now and the busy ones once their response is
        sent (each answered with C{Connection: close}).

        @return: a Deferred that fires when no connection is left.
        """
        for channel in list(self.channels):
            channel.persistent = False
            channel.setTimeout(None)
            if channel.idle:
                channel.transport.loseConnection()
            else:
                for request in channel.requests:
                    if not request.startedWriting:
                        request.setHeader(b"connection", b"close")
        self._drained = defer.Deferred()
        self.channel_closed()
        return self._drained

    def channel_closed(self) -> None:
        if self._drained is not None and not self.channels and not self._drained.called:
            self._drained.callback(None)

    def abort_all(self) -> None:
        """Cut every remaining connection (the graceful deadline has passed)."""
        for channel in list(self.channels):
            channel.transport.abortConnection()


def _quote(value: bytes | str | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    return value.replace("\\", "\\\\").replace('"', '\\"')


def _combined_line(request, timestamp: str) -> str:
    length = request.sentLength or "-"
    return '{} - - {} "{} {} {}" {} {} "{}" "{}"'.format(
        request.lrp_client or "-",
        timestamp,
        _quote(request.method),
        _quote(request.uri),
        _quote(request.clientproto),
        request.code,
        length,
        _quote(request.getHeader(b"referer") or "-"),
        _quote(request.getHeader(b"user-agent") or "-"),
    )
