"""
One HTTP connection of the site (L{LRPChannel}): twisted.web's channel with
the limits and answers of docs/serving.md on request heads and framing, and
what the site needs to drain it and to make room for a new connection.
"""

from __future__ import annotations

import socket

from twisted.internet import error, protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http

from twistedlrp import compat
from twistedlrp.web import ports
from twistedlrp.web.accesslog import mask_tokens, quote
from twistedlrp.web.limits import ANSWER_SECONDS, UNSENT_LOWAT, short_answer

log = Logger()

# Seconds a connection accepted just before shut-down has to send its first request.
DRAIN_GRACE = 1.0
# A chunk size this large (2**63, beyond a signed 64-bit length) gets 400.
MAX_CHUNK_SIZE = 2**63


class LRPChannel(compat.HTTPChannelHooks, http.HTTPChannel):
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
    # Whether the request line, a Host and a Transfer-Encoding header arrived.
    _request_line_seen = False
    _host_seen = False
    _chunked_seen = False
    # The host of an absolute-form request target, which becomes the Host.
    _authority: bytes | None = None
    # Whether a byte of the current request has arrived.
    _head_begun = False
    # Header lines of the current request head.
    _header_lines = 0
    # The head deadline (a DelayedCall), running while awaiting_head.
    _head_call = None
    # Answered or cut already: it is on its way out.
    closing = False
    # Requests answered on this connection.
    answered = 0
    # The server is stopping: every answer from now on closes the connection.
    draining = False
    # The shut-down's grace for a first request (a DelayedCall).
    _drain_call = None
    # Cuts a connection that does not read its last answer (a DelayedCall).
    _cut_call = None

    def connectionMade(self):
        super().connectionMade()
        limits = self.site.limits
        # One line may be as long as the whole head; the head's size, and
        # the number of its header lines, are checked here (431).
        self.MAX_LENGTH = limits.max_header_size
        self.totalHeadersSize = limits.max_header_size
        self.maxHeaders = limits.max_headers
        self.site.channel_opened(self)
        self._watch_writes(limits.write_timeout)
        self._await_head()
        # The first request head is timed from the connection.
        self._start_head_deadline()

    # -- the write deadline ------------------------------------------------

    # Whether the transport cuts a client that reads nothing (--write-timeout).
    write_deadline = False
    # The request last received on this connection (named when it is cut).
    lrp_last_request = None

    def _watch_writes(self, timeout: float) -> None:
        transport = ports.socket_transport(self.transport)
        watch = getattr(transport, "watch_writes", None)
        if not timeout or watch is None:
            return
        watch(timeout, self._write_stalled)
        self.write_deadline = True
        # The kernel keeps at most UNSENT_LOWAT bytes that the peer's window
        # does not let out yet (by default, megabytes on loopback), so a
        # send stops taking data soon after the client stops reading.
        lowat = getattr(socket, "TCP_NOTSENT_LOWAT", None)
        sock = transport.socket
        if lowat is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, lowat, UNSENT_LOWAT)
            except OSError:
                pass

    def _write_stalled(self) -> None:
        """The client has taken none of the response for --write-timeout: cut it."""
        if self.transport is None:
            return
        request = self.lrp_last_request
        log.warn(
            "{what}: the client read nothing for {timeout:g} s (--write-timeout); "
            "the connection is cut{freed}",
            what=(
                f"{request.method.decode('latin-1')} {mask_tokens(quote(request.uri))}"
                if request is not None
                else "A response"
            ),
            timeout=self.site.limits.write_timeout,
            freed=" and its thread freed" if getattr(request, "lrp_streaming", False) else "",
        )
        self._leave()
        self.transport.abortConnection()

    # A connection's two addresses do not change: twisted.web asks for them
    # at every request, and the local one costs a getsockname() call.
    _host = _peer = None
    # (client address, trusted proxy, scheme) of the peer (LRPSite.client_of).
    lrp_peer = None

    def getHost(self):
        if self._host is None:
            self._host = super().getHost()
        return self._host

    def getPeer(self):
        if self._peer is None:
            self._peer = super().getPeer()
        return self._peer

    def connectionLost(self, reason):
        self._stop_head_deadline()
        for call in (self._drain_call, self._cut_call):
            if call is not None and call.active():
                call.cancel()
        self.site.channel_gone(self)
        super().connectionLost(reason)
        self.site.channel_closed()

    # -- the request head ------------------------------------------------

    def _await_head(self) -> None:
        self.awaiting_head = True
        self._head_bytes = 0
        self._header_lines = 0
        self._head_begun = False
        self._request_line_seen = False
        self._host_seen = False
        self._chunked_seen = False
        self._authority = None
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
            and not self.parsing
            and not self.closing
            and not self.transport.disconnecting
        ):
            # What is left is an incomplete line of the head.
            pending = self.partial_line
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
            if not self._request_line_seen:
                # twisted.web skips one empty line before a request line.
                if line:
                    self._request_line_seen = True
                    line = self._origin_form(line)
                    if line is None:
                        return None
            elif line[:1] in (b" ", b"\t"):
                # obs-fold (RFC 9112 section 5.2): a server may reject it with 400.
                return self.answer_and_close(
                    b"400 Bad Request", b"Bad request: a header line begins with whitespace.\n"
                )
        return super().lineReceived(line)

    def _origin_form(self, line: bytes) -> bytes | None:
        """
        @return: the request line C{line} with its target as a path (an
            absolute-form target is reduced to its path and query, and its
            host becomes the C{Host}: RFC 9112 sections 3.2.2 and 3.3), or
            C{*} for C{OPTIONS}; C{None} after answering 400 to any other
            target that does not begin with C{/}.
        """
        parts = line.split(b" ")
        if len(parts) != 3:
            return line  # twisted.web answers 400
        method, target, version = parts
        if target[:1] == b"/":
            return line
        if target == b"*":
            if method == b"OPTIONS":
                return line
            self.answer_and_close(
                b"400 Bad Request", b"Bad request: * is a request target of OPTIONS only.\n"
            )
            return None
        scheme, separator, rest = target.partition(b"://")
        if separator and scheme.lower() in (b"http", b"https"):
            end = len(rest)
            for mark in (b"/", b"?"):
                found = rest.find(mark)
                if found != -1:
                    end = min(end, found)
            authority, path = rest[:end], rest[end:]
            if authority and b"@" not in authority:
                self._authority = authority
                if not path.startswith(b"/"):
                    path = b"/" + path
                return b" ".join((method, path, version))
        self.answer_and_close(
            b"400 Bad Request",
            b"Bad request: the request target must be a path (/...), an http or https URL, "
            b"or * for OPTIONS.\n",
        )
        return None

    def headerReceived(self, line):
        if self._header_lines >= self.maxHeaders:
            self._head_too_large()
            return False
        self._header_lines += 1
        bad = None
        if line[:5].lower() == b"host:":
            bad = b"more than one Host header" if self._host_seen else None
            self._host_seen = True
        elif line[:18].lower() == b"transfer-encoding:":
            # twisted.web skips "identity" and takes a second header: a body
            # framed so, or by its Content-Length, could hide a request that
            # a proxy in front frames otherwise (RFC 9112 section 6.3).
            if self._chunked_seen or line[18:].strip(b" \t").lower() != b"chunked":
                bad = b"the only transfer coding is chunked, once"
            self._chunked_seen = True
        if bad is not None:
            self.answer_and_close(b"400 Bad Request", b"Bad request: %s.\n" % bad)
            return False
        return super().headerReceived(line)

    def rawDataReceived(self, data):
        super().rawDataReceived(data)
        # twisted.web takes any chunk size; one no body can have is refused
        # now, before the client sends (or pretends to send) that much.
        remaining = self.chunk_left
        if not remaining or self.closing or not self.requests:
            return
        request = self.requests[-1]
        if remaining >= MAX_CHUNK_SIZE:
            self.answer_and_close(b"400 Bad Request", b"Bad request: chunk size too large.\n")
        elif (
            not request.lrp_rejected and request.lrp_received + remaining > self.site.max_body_size
        ):
            request.refuse_body()

    def lineLengthExceeded(self, line):
        if self.awaiting_head:
            return self._head_too_large()
        return super().lineLengthExceeded(line)

    def allHeadersReceived(self):
        if self._authority is not None:
            # The host of an absolute-form target wins over the Host header.
            self.requests[-1].requestHeaders.setRawHeaders(b"host", [self._authority])
        # A whole head: a real request, no longer subject to the head deadline
        # and no longer one to close for room.
        self.awaiting_head = False
        self._stop_head_deadline()
        self.site.request_started(self)
        super().allHeadersReceived()

    def requestDone(self, request):
        self.answered += 1
        if self.persistent and not self.closing:
            # Before twisted.web replays pipelined data into dataReceived.
            self._await_head()
        super().requestDone(request)
        if self.awaiting_head and self.partial_line:
            # Bytes after it (answered while they were parsed) begin the next.
            self._head_begun = True
            self._start_head_deadline()

    def checkPersistence(self, request, version):
        persistent = super().checkPersistence(request, version)
        if self.draining:
            # Read after the drain began: answered, then the connection closes.
            request.responseHeaders.setRawHeaders(b"connection", [b"close"])
            return False
        return persistent

    def _head_too_large(self) -> None:
        self.answer_and_close(
            b"431 Request Header Fields Too Large", b"Request header fields too large.\n"
        )

    def _bare_line_feed(self) -> None:
        self.answer_and_close(b"400 Bad Request", b"Bad request: lines must end with CRLF.\n")

    def answer_bad_request(self):
        # twisted.web's own answer is a bare status line, without Connection: close.
        self.answer_and_close(b"400 Bad Request", b"Bad request.\n")

    # -- closing -----------------------------------------------------------

    def close_for_drain(self) -> None:
        """
        The server stops, and this connection has no request in progress:
        closed now between two requests (a client retries); before its
        first, given L{DRAIN_GRACE} seconds (its request is likely on its
        way); a head under way is answered within the head deadline.
        """
        if self.answered and not self._head_begun:
            self.transport.loseConnection()
        elif not self._head_begun:
            self._drain_call = self.callLater(DRAIN_GRACE, self._drain_grace_over)

    def _drain_grace_over(self) -> None:
        self._drain_call = None
        if self.awaiting_head and not self._head_begun and not self.closing:
            self._close_quietly()

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
            self.transport.write(short_answer(status, body))
        self._lose_within_seconds()

    def _close_quietly(self) -> None:
        self._leave()
        self._lose_within_seconds()

    def _lose_within_seconds(self) -> None:
        self.loseConnection()
        if self._cut_call is None:
            self._cut_call = self.callLater(ANSWER_SECONDS, self.forceAbortClient)

    def evict(self) -> None:
        """
        Cut this connection (it awaits a request head; room is needed) and
        free its descriptor now: one reactor turn may accept hundreds.
        """
        self._leave()
        self.transport.abortConnection()
        # The socket's own transport, under TLS if any (tcp and unix ones
        # ignore a second connectionLost, the one abortConnection scheduled).
        transport = ports.socket_transport(self.transport)
        if transport is not None:
            transport.connectionLost(Failure(error.ConnectionAborted()))

    def may_continue(self) -> bool:
        return not (self.requests and self.requests[-1].lrp_rejected)

    @property
    def idle(self) -> bool:
        return not self.requests


class BusyAnswer(protocol.Protocol):
    """
    A connection over C{--max-connections} while every open one is busy:
    answered 503 at once, its request read and dropped for a moment so
    that the client reads the answer instead of a reset.
    """

    def __init__(self, site):
        self._site = site
        self._cut = None

    def connectionMade(self):
        self._site.busy_answers += 1
        body = b"Server busy: too many open connections. Retry shortly.\n"
        self.transport.write(short_answer(b"503 Service Unavailable", body, b"Retry-After: 1\r\n"))
        half_close = getattr(self.transport, "loseWriteConnection", None)
        if half_close is None:  # TLS
            self.transport.loseConnection()
        else:
            half_close()
        self._cut = self._site.reactor.callLater(2.0, self.transport.abortConnection)

    def dataReceived(self, data):
        pass

    def connectionLost(self, reason):
        self._site.busy_answers -= 1
        if self._cut is not None and self._cut.active():
            self._cut.cancel()
