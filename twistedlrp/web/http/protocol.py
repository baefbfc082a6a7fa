"""The HTTP/1.1 server protocol over httptools; its factory is L{twistedlrp.web.site.LRPSite}."""

from __future__ import annotations

import functools
import time

import httptools
from twisted.internet import protocol
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.logger import Logger
from zope.interface import implementer

from twistedlrp.jobs.protocol.limits import abort_now
from twistedlrp.ordered_service import cancel_call
from twistedlrp.web.accesslog import masked
from twistedlrp.web.http.reading import (
    _ANSWERING,
    _CLOSED,
    _HEAD,
    KEEP_ALIVE_TIMEOUT,
    MessageReader,
)
from twistedlrp.web.http.request import Request
from twistedlrp.web.http.writing import WriteFlow
from twistedlrp.web.limits import ANSWER_SECONDS, short_answer

log = Logger()

# Seconds a connection accepted just before shut-down has to send its first request.
DRAIN_GRACE = 1.0


@implementer(IHalfCloseableProtocol)
class HTTPConnection(WriteFlow, MessageReader, protocol.Protocol):
    """
    One HTTP/1.1 connection, its requests read one at a time and handed to the
    site's C{handle}. C{awaiting_head}: no whole head yet (only such a connection
    is closed to make room); C{closing}: answered or cut already.
    """

    draining = False
    answered = 0
    last_request: Request | None = None  # named when the connection is cut
    _head_begun = False
    _timer = None
    _due = 0.0
    _on_due = None
    _cut_call = None
    _linger_call = None
    _drain_call = None
    # (client address, trusted proxy, scheme) of the peer (LRPSite.client_of).
    judged = None

    def connectionMade(self):
        self.site = site = self.factory
        self.reactor = site.reactor
        self.limits = site.limits
        self._parser = httptools.HttpRequestParser(self)
        self._buffer = b""
        site.channels.add(self)
        self._start_flow()
        self._await_head()
        self._time_head()  # the first request head is timed from the connection

    # A connection's addresses do not change (getsockname() costs a call).
    @functools.cached_property
    def host(self):
        return self.transport.getHost()

    @functools.cached_property
    def peer(self):
        return self.transport.getPeer()

    @property
    def idle(self) -> bool:
        return self.request is None

    @property
    def awaiting_head(self) -> bool:
        return self._state == _HEAD and self.request is None

    @property
    def closing(self) -> bool:
        return self._state == _CLOSED

    # Call on_due() in seconds, instead of what was due: one DelayedCall per connection, moved lazily.
    def _arm(self, seconds: float, on_due) -> None:
        due = self.reactor.seconds() + seconds
        self._due, self._on_due = due, on_due
        if self._timer is None:
            self._timer = self.reactor.callLater(seconds, self._timer_fired)
        elif self._timer.getTime() > due:
            self._timer.reset(seconds)

    def _timer_fired(self) -> None:
        self._timer = None
        if self._on_due is None:
            return
        left = self._due - self.reactor.seconds()
        if left > 0:
            self._timer = self.reactor.callLater(left, self._timer_fired)
            return
        on_due, self._on_due = self._on_due, None
        on_due()

    def _time_head(self) -> None:
        if self.limits.header_timeout:
            self._arm(self.limits.header_timeout, self._head_timed_out)
        else:
            self._arm(KEEP_ALIVE_TIMEOUT, self._idle_timed_out)

    def _head_timed_out(self) -> None:
        if self.awaiting_head:
            if self._head_begun:
                self.answer_and_close(
                    b"408 Request Timeout", b"Request head not received in time.\n"
                )
            else:
                self._close_quietly()  # nothing of a request came: nothing to answer

    def _idle_timed_out(self) -> None:
        if self.request is None or _HEAD < self._state < _ANSWERING:  # idle, or reading a body
            self._close_quietly()

    def _write_stalled(self) -> None:
        """The client took none of the response for --write-timeout: cut it."""
        request = self.last_request
        log.warn(
            "{what}: the client read nothing for {timeout:g} s (--write-timeout); "
            "the connection is cut{freed}",
            what=(
                f"{request.method.decode('latin-1')} {masked(request.uri)}"
                if request is not None
                else "A response"
            ),
            timeout=self.limits.write_timeout,
            freed=" and its thread freed" if getattr(request, "streaming", False) else "",
        )
        self._leave()
        self.cut()

    def _await_head(self) -> None:
        self._state = _HEAD
        self._head_begun = False
        self._head_bytes = 0
        self._tail = self._line = b""
        # It joins the end of the line of connections awaiting a head.
        self.site.awaiting.pop(self, None)
        self.site.awaiting[self] = None

    def dataReceived(self, data: bytes):
        if self._state == _CLOSED:
            return
        if self.awaiting_head:
            if not self._head_begun:
                self._head_begun = True
                if self.answered:
                    # A later request is timed from its first byte.
                    self._time_head()
        elif self._state != _ANSWERING:
            self._arm(KEEP_ALIVE_TIMEOUT, self._idle_timed_out)
        self._buffer = self._buffer + data if self._buffer else data
        self._advance()

    def _message_done(self) -> None:
        request = self.request
        self._state = _ANSWERING
        self._on_due = None
        if request.rejected:
            self._close_quietly()
            return
        request.content.seek(0)
        self.last_request = request
        request.started = time.monotonic()
        try:
            self.site.handle(request)
        except Exception:
            log.failure("Error while routing {uri}", uri=request.uri)
            if request.startedWriting:
                self.cut()
            elif not request.finished:
                # The application's headers go; the server's own (Server, Date) stay.
                for name in [n for n in request._response if n not in (b"server", b"date")]:
                    request.removeHeader(name)
                request.answer_text(500, b"Internal Server Error\n")

    def request_done(self, request: Request) -> None:
        """C{request}'s response is finished (L{Request.finish})."""
        self.answered += 1
        self.request = None
        self.site.log(request)
        request.send_held()
        if self.closing:
            return
        if not request.persistent:
            self._close_quietly()
            return
        self._await_head()
        if self._paused:
            self._paused = False
            self.transport.resumeProducing()
        if self._buffer:
            # Pipelined: its bytes are here already.
            self._head_begun = True
            self._time_head()
        else:
            self._arm(KEEP_ALIVE_TIMEOUT, self._idle_timed_out)
        self._advance()  # (which closes if the client sent all it will)

    def answer_and_close(self, status: bytes, body: bytes) -> None:
        """Answer C{status} with a short text C{body}, unless a response is under way, and close."""
        if self.closing or self.transport is None or self.transport.disconnecting:
            return
        request = self.request
        if request is None or not (request.startedWriting or request.rejected):
            self.send(short_answer(status, body))
        self._close_quietly()

    def _leave(self) -> None:
        self._state = _CLOSED
        self._buffer = b""
        self._on_due = None
        self.site.awaiting.pop(self, None)

    def _close_quietly(self) -> None:
        self._leave()
        self._lose()
        if self._cut_call is None:
            self._cut_call = self.reactor.callLater(ANSWER_SECONDS, self.cut)

    def readConnectionLost(self):
        # The client sent all it will: its request (if whole) is answered.
        self._peer_done = True
        if self.request is None or self._state != _ANSWERING:
            self._close_quietly()
        elif self.request._producer is not None:
            # A stream whose client left: nobody reads it.
            self.cut()

    def writeConnectionLost(self):
        pass

    def connectionLost(self, reason=protocol.connectionDone):
        self._leave()
        self._stop_flow()
        for call in (self._timer, self._cut_call, self._linger_call, self._drain_call):
            cancel_call(call)
        request, self.request = self.request, None
        if request is not None and not request.finished:
            request.connection_lost(reason)
        self.site.channel_gone(self)

    def drain(self) -> None:
        """
        The server stops: a busy connection closes after its response; an
        idle one between two requests closes now (a client retries); before
        its first, it gets L{DRAIN_GRACE} seconds (its request is likely on
        its way); a head under way is answered, within the head deadline.
        """
        self.draining = True
        if self.request is not None:
            self.request.persistent = False
        elif self.answered and not self._head_begun:
            self._lose()
        elif not self._head_begun:
            self._drain_call = self.reactor.callLater(DRAIN_GRACE, self._drain_grace_over)

    def _drain_grace_over(self) -> None:
        self._drain_call = None
        if self.awaiting_head and not self._head_begun:
            self._close_quietly()

    def evict(self) -> None:
        """Cut this connection to make room, freeing its descriptor now (not next turn)."""
        self._leave()
        abort_now(self.transport)
