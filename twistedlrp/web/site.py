"""
The HTTP side of the server: the site, its requests and where each goes (the
health endpoint and static files in the reactor, the rest to the WSGI
container). It enforces the connection and body limits of docs/serving.md
(the head's are the channel's, L{twistedlrp.web.channel}), decides which
forwarded headers to trust, logs each response and drains at shut-down.
"""

from __future__ import annotations

import functools
import ipaddress
import time
from collections import OrderedDict
from time import monotonic
from urllib.parse import unquote_to_bytes

from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.resource import Resource

from twistedlrp.web import static
from twistedlrp.web.accesslog import AccessLog
from twistedlrp.web.channel import BusyAnswer, LRPChannel
from twistedlrp.web.limits import FULL_WARNING_INTERVAL, MAX_BUSY_ANSWERS, Limits, short_answer

log = Logger()

SERVER_HEADER = b"twistedlrp"

# Formatting the Date header for every request took 2 % of the reactor's
# time under load: it is formatted once a second.
_http_date = functools.lru_cache(maxsize=1)(http.datetimeToString)


def http_date() -> bytes:
    """@return: the current time as an HTTP date."""
    return _http_date(int(time.time()))


def finish_with_text(request, code: int, body: bytes) -> None:
    """Answer C{request} with status C{code} and the plain text C{body}, and finish it."""
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"text/plain; charset=utf-8")
    request.setHeader(b"content-length", b"%d" % len(body))
    request.write(body)
    request.finish()


# Seconds an idle keep-alive connection stays open.
KEEP_ALIVE_TIMEOUT = 60
# Seconds we keep reading (and discarding) an oversized body after the 413,
# so the client reads our answer instead of a connection reset.
_LINGER_SECONDS = 5.0


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

    defaultContentType = None
    lrp_rejected = False
    lrp_client = ""
    lrp_scheme = "http"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Made when the request line arrives: the access log's duration
        # counts from there, as nginx's $request_time does.
        self.lrp_arrived = time.monotonic()

    lrp_started: float | None = None  # monotonic seconds, once the head is in

    # Bytes of the body received so far.
    lrp_received = 0

    def gotLength(self, length):
        self.lrp_received = 0
        site = self.channel.site
        if length is not None and length > site.max_body_size:
            self.refuse_body()
            return
        super().gotLength(length)

    def handleContentChunk(self, data):
        if self.lrp_rejected:
            return
        self.lrp_received += len(data)
        if self.lrp_received > self.channel.site.max_body_size:
            # A chunked body with no declared length grew past the limit.
            self.refuse_body()
            return
        self.content.write(data)

    def refuse_body(self) -> None:
        """Answer 413 now, and read (and drop) the rest of the body for a little while."""
        if self.content is not None:
            self.content.close()
        self.lrp_rejected = True
        # The rest of the body is dropped as it comes (handleContentChunk).
        self.content = None
        channel = self.channel
        channel.persistent = False
        body = b"Request body too large.\n"
        channel.transport.write(short_answer(b"413 Content Too Large", body))
        self.code = 413
        self.sentLength = len(body)
        # Read the rest of the body (and drop it) for a little while, then close.
        channel.site.reactor.callLater(_LINGER_SECONDS, channel.transport.abortConnection)

    def requestReceived(self, command, path, version):
        if self.channel.closing and not self.lrp_rejected:
            return  # answered 400 already
        if self.lrp_rejected:
            self.method, self.uri, self.clientproto = command, path, version
            self.path = path.split(b"?", 1)[0]
            self.channel.site.log(self)
            self.channel.transport.loseConnection()
            return
        super().requestReceived(command, path, version)

    def process(self):
        self.lrp_started = monotonic()
        self.channel.lrp_last_request = self
        site = self.channel.site
        self.site = site
        self.setHeader(b"server", SERVER_HEADER)
        self.setHeader(b"date", http_date())
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
        finish_with_text(self, 500, b"Internal Server Error\n")
        return reason


class Router(Resource):
    """Send a request to the health endpoint, static files or the application."""

    isLeaf = True
    # The metrics endpoint (web/metrics.py), if on.
    metrics_path: bytes | None = None
    metrics = None

    def __init__(self, health_path: str, health, statics: list, application, events=None):
        super().__init__()
        self._health_path = health_path.encode()
        self._health = health
        # The jobs' progress streams (web/progress_stream.py), answered in the reactor.
        self.events = events
        # Longest prefix first, so /static/admin/ wins over /static/.
        self._statics = sorted(
            ((prefix.encode(), static.make_static(directory)) for prefix, directory in statics),
            key=lambda item: -len(item[0]),
        )
        self._application = application
        # What Django's SecurityMiddleware would add, on every static answer.
        self._static_headers = static.security_headers() if self._statics else []

    def route(self, request):
        path = request.path
        if path == self._health_path:
            return self._health.render(request)
        if path == self.metrics_path:
            return self.metrics.render(request)
        if path == b"*":
            # OPTIONS * (the channel answers * with another method 400): the
            # server in general, which has nothing more to say.
            request.setHeader(b"content-length", b"0")
            return b""
        for prefix, files in self._statics:
            if path.startswith(prefix) or path + b"/" == prefix:
                for name, value in self._static_headers:
                    request.setHeader(name, value)
                if request.method not in (b"GET", b"HEAD"):
                    request.setResponseCode(405)
                    request.setHeader(b"allow", b"GET, HEAD")
                    return b"Method Not Allowed\n"
                rest = path[len(prefix) :].lstrip(b"/")
                request.prepath = [s for s in prefix.split(b"/") if s]
                segments = [unquote_to_bytes(s) for s in rest.split(b"/")] if rest else [b""]
                return static.serve(files, request, segments)
        if self.events is not None and self.events.matches(path):
            return self.events.render(request)
        return self._application.render(request)


class LRPSite(server.Site):
    """
    The twisted.web Site of the server.

    @ivar channels: the open connections.
    """

    protocol = LRPChannel
    requestFactory = LRPRequest
    metrics = None  # the HTTP metrics (web/metrics.py), if on

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
        access_log_format: str = "combined",
    ):
        # Django parses bodies itself; twisted.web would parse form posts
        # again (and answer 400 to a multipart body it cannot parse).
        super().__init__(
            root, timeout=KEEP_ALIVE_TIMEOUT, reactor=reactor, parsePOSTFormSubmission=False
        )
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
        self.busy_answers = 0  # 503 answers being sent
        self._warned_full_at: float | None = None
        self._drained: defer.Deferred | None = None
        self.access_log = AccessLog(reactor, access_log_path, access_log_format)

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
                if self.busy_answers >= MAX_BUSY_ANSWERS:
                    return None  # closed at once
                return BusyAnswer(self)
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
        if self._warned_full_at is not None and now - self._warned_full_at < FULL_WARNING_INTERVAL:
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
        channel = request.channel
        # The peer, and whether it is trusted, do not change on a connection.
        known = channel.lrp_peer
        if known is None:
            peer = request.getClientAddress()
            if isinstance(peer, IPv4Address | IPv6Address):
                known = (peer.host, self.proxy_headers and peer.host in self.trusted)
            else:
                # A UNIX socket peer is a local proxy (nginx, say).
                known = ("", self.proxy_headers)
            known += ("https" if request.isSecure() else "http",)
            channel.lrp_peer = known
        client, trusted, scheme = known
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
        self.access_log.open()

    def stopFactory(self):
        super().stopFactory()
        self.access_log.close()

    def log(self, request):
        if self.metrics is not None:
            self.metrics.observe(request)
        self.access_log.write(request)

    # -- shut-down ------------------------------------------------------

    def drain(self) -> defer.Deferred:
        """
        Close idle connections (L{LRPChannel.close_for_drain}) and the busy
        ones once their response is sent (each answered with
        C{Connection: close}).

        @return: a Deferred that fires when no connection is left.
        """
        for channel in list(self.channels):
            channel.draining = True
            channel.setTimeout(None)
            if channel.idle:
                channel.close_for_drain()
            else:
                channel.persistent = False
                for request in channel.requests:
                    if not request.startedWriting:
                        request.setHeader(b"connection", b"close")
        streams = getattr(self.root, "events", None)
        if streams is not None:
            # Progress streams never end by themselves soon enough.
            streams.close_all()
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
