"""
The site (L{LRPSite}, the factory of the HTTP connections: it caps them, trusts
forwarded headers or not, logs and drains) and where a request goes (L{Router}).
"""

from __future__ import annotations

import functools
import ipaddress
import time
from collections import OrderedDict
from urllib.parse import unquote_to_bytes

from twisted.internet import defer, protocol
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.logger import Logger
from twisted.web.http import datetimeToString
from twisted.web.server import NOT_DONE_YET

from twistedlrp.ordered_service import cancel_call
from twistedlrp.web import static
from twistedlrp.web.accesslog import AccessLog
from twistedlrp.web.http.protocol import HTTPConnection
from twistedlrp.web.limits import FULL_WARNING_INTERVAL, MAX_BUSY_ANSWERS, Limits, short_answer

log = Logger()

SERVER_HEADER = b"twistedlrp"

# Formatted once a second (per request, it took 2 % of the reactor's time).
_http_date = functools.lru_cache(maxsize=1)(datetimeToString)


def http_date() -> bytes:
    """@return: the current time as an HTTP date."""
    return _http_date(int(time.time()))


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


class Router:
    """
    Send a request to the health or metrics endpoint, static files or a
    progress stream (answered in the reactor), or to the application.
    """

    def __init__(self, health_path: str, health, statics: list, application, events=None):
        # The endpoints at a path of their own (the metrics endpoint joins, if on).
        self.endpoints = {health_path.encode(): health}
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
        endpoint = self.endpoints.get(path)
        if endpoint is not None:
            return endpoint.render(request)
        if path == b"*":
            # OPTIONS * (the server in general): nothing more to say.
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
                return files.serve(request, segments)
        if self.events is not None and path.startswith(self.events.prefix):
            return self.events.render(request)
        return self._application.render(request)


class LRPSite(protocol.Factory):
    protocol = HTTPConnection
    noisy = False
    metrics = None  # the HTTP metrics (web/metrics.py), if on

    def __init__(
        self,
        reactor,
        root: Router | None = None,
        *,
        max_body_size: int = 10 * 2**20,
        proxy_headers: bool = False,
        forwarded_allow_ips: list[str] = (),
        access_log_path: str | None = None,
        limits: Limits | None = None,
        access_log_format: str = "combined",
    ):
        self.reactor = reactor
        self.limits = limits if limits is not None else Limits()
        self.max_body_size = max_body_size
        self.channels: set[HTTPConnection] = set()
        self._drained: defer.Deferred | None = None
        self.root = root
        self.proxy_headers = proxy_headers
        self.trusted = TrustedProxies(forwarded_allow_ips)
        # The connections awaiting a request head, longest waiting first.
        self.awaiting: OrderedDict[HTTPConnection, None] = OrderedDict()
        # Cut to make room, but not gone yet (the reactor closes them next).
        self._evicted: set[HTTPConnection] = set()
        self.evictions = 0
        self.refusals = 0
        self.busy_answers = 0  # 503 answers being sent
        self._warned_full_at: float | None = None
        self.access_log = AccessLog(reactor, access_log_path, access_log_format)

    def handle(self, request) -> None:
        """Answer C{request} (now, or later with C{request.finish()})."""
        request.setHeader(b"server", SERVER_HEADER)
        request.setHeader(b"date", http_date())
        request.client, request.scheme = self.client_of(request)
        body = self.root.route(request)
        if body is not NOT_DONE_YET:
            request.answer(body)

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
        if not self.awaiting:  # (a connection leaves it as it closes)
            return False
        channel, _ = self.awaiting.popitem(last=False)
        self._evicted.add(channel)
        channel.evict()
        return True

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

    def channel_gone(self, channel: HTTPConnection) -> None:
        """C{channel} is closed; the last one left in a drain ends it."""
        self.channels.discard(channel)
        self._evicted.discard(channel)
        if self._drained is not None and not self.channels and not self._drained.called:
            self._drained.callback(None)

    def client_of(self, request) -> tuple[str, str]:
        """@return: the client address and URL scheme (forwarded by a trusted proxy)."""
        channel = request.channel
        # The peer, and whether it is trusted, do not change on a connection.
        known = channel.judged
        if known is None:
            peer = request.getClientAddress()
            if isinstance(peer, IPv4Address | IPv6Address):
                known = (peer.host, self.proxy_headers and peer.host in self.trusted)
            else:
                # A UNIX socket peer is a local proxy (nginx, say).
                known = ("", self.proxy_headers)
            known += ("https" if request.isSecure() else "http",)
            channel.judged = known
        client, trusted, scheme = known
        if not trusted:
            return client, scheme
        forwarded = b",".join(v for k, v in request.headers if k == b"x-forwarded-for")
        hops = [hop for hop in map(str.strip, forwarded.decode("latin-1").split(",")) if hop]
        # From the nearest hop back, the first that is not a trusted proxy is the client
        # (earlier ones may be forged); a hop not an IP address: the proxy did not know.
        for hop in reversed(hops):
            try:
                address = str(ipaddress.ip_address(hop))
            except ValueError:
                break
            client = address
            if address not in self.trusted:
                break
        proto = request.getHeader(b"x-forwarded-proto")
        if proto:
            value = proto.decode("latin-1").split(",")[-1].strip().lower()
            if value in ("http", "https"):
                scheme = value
        return client, scheme

    def startFactory(self):
        # Closed by the web service once its requests are drained, not when
        # its ports stop listening: those in flight then are logged too.
        self.access_log.open()

    def log(self, request):
        """C{request} was answered (its response is finished, or refused with 413)."""
        if self.metrics is not None:
            self.metrics.observe(request)
        self.access_log.write(request)

    def drain(self) -> defer.Deferred:
        """Close the connections once answered: @return: a Deferred fired when none is left."""
        for channel in list(self.channels):
            channel.drain()
        streams = getattr(self.root, "events", None)
        if streams is not None:
            # Progress streams never end by themselves soon enough.
            streams.close_all()
        self._drained = defer.Deferred()
        if not self.channels:
            self._drained.callback(None)
        return self._drained

    def abort_all(self) -> None:
        """Cut every remaining connection (the graceful deadline has passed)."""
        for channel in list(self.channels):
            channel.cut()


class BusyAnswer(protocol.Protocol):
    """A connection over C{--max-connections} while all are busy: answered 503 (not reset)."""

    def __init__(self, site):
        self._site = site
        self._cut = None

    def connectionMade(self):
        self._site.busy_answers += 1
        body = b"Server busy: too many open connections. Retry shortly.\n"
        self.transport.write(short_answer(b"503 Service Unavailable", body, b"Retry-After: 1\r\n"))
        # A half-close, where the transport has one (not TLS).
        getattr(self.transport, "loseWriteConnection", self.transport.loseConnection)()
        self._cut = self._site.reactor.callLater(2.0, self.transport.abortConnection)

    def dataReceived(self, data):
        pass

    def connectionLost(self, reason):
        self._site.busy_answers -= 1
        cancel_call(self._cut)
