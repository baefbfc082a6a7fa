"""
One request and its response, framed by C{Content-Length} when given, else
chunked (HTTP/1.1) or by the close (HTTP/1.0); no body for HEAD, 1xx, 204, 304.
"""

from __future__ import annotations

import functools
import math
from http import HTTPStatus
from urllib.parse import parse_qs

from twisted.internet import defer
from twisted.internet.interfaces import ISSLTransport
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.http import CACHED, datetimeToString, stringToDatetime

from twistedlrp.web.accesslog import masked

_log = Logger()

_REASONS = {status.value: status.phrase.encode() for status in HTTPStatus}
_REASONS[413] = b"Content Too Large"  # RFC 9110's name (Python < 3.13 has the old one)
_STATUS_LINES = {code: b"HTTP/1.1 %d %s\r\n" % (code, reason) for code, reason in _REASONS.items()}
# Responses that never have a body, whatever their headers say.
_NO_BODY = frozenset((204, 304))


# Header names as sent: lower case is capitalised (Content-Type), others kept.
@functools.lru_cache(maxsize=1024)  # the names are the application's: bounded
def _spelled(name: bytes) -> bytes:
    return name.title() if name.islower() else name


class Request:
    """
    C{uri}: the target in origin form (or C{b"*"}); C{headers}: C{(lower-case
    name, value)} in order; C{content}: the body (a file at offset 0); C{arrived},
    C{started}: monotonic times; C{client}, C{scheme}: as the site trusts
    forwarded headers; C{channel}: the connection (C{None} once lost).
    """

    code = 200
    reason: bytes | None = None
    client = ""
    scheme = "http"
    started: float | None = None
    streaming = False
    rejected = False
    persistent = True
    finished = False
    startedWriting = False
    sentLength = 0  # bytes of the body sent
    lastModified: int | None = None
    content = None
    _chunked = False
    _left: int | None = None
    _body_allowed = True
    _producer = None
    _waiters: list | None = None
    # Called with the reason if the connection is lost first (notifyFinish without a Deferred).
    on_lost = None

    def __init__(self, channel, method: bytes, target: bytes, version: bytes, headers, arrived):
        self.channel = channel
        self.method = method
        self.uri = target
        self.path, _, self.query = target.partition(b"?")
        self.clientproto = version
        self.headers = headers
        self.arrived = arrived
        self.prepath: list[bytes] = []
        self.postpath: list[bytes] = []
        self._response: dict[bytes, tuple[bytes, list[bytes]]] = {}
        # What is written before the response finishes or streams: sent once
        # it is counted and logged, so that a client that has its answer
        # finds it in the metrics and the access log.
        self._held: list[bytes] | None = []

    def getHeader(self, name: bytes) -> bytes | None:
        """@return: the last value of the request header C{name}, or C{None}."""
        name = name.lower()
        return next((value for key, value in reversed(self.headers) if key == name), None)

    @property
    def args(self) -> dict[bytes, list[bytes]]:
        """The query's arguments (C{name: [values]})."""
        return parse_qs(self.query, keep_blank_values=True)

    def getHost(self):
        return self.channel.host

    def getPeer(self):
        """@return: the peer's address (a proxy's, behind one: see C{client})."""
        return self.channel.peer

    getClientAddress = getPeer

    def isSecure(self) -> bool:
        """@return: whether the connection is TLS."""
        return self.channel is not None and ISSLTransport.providedBy(self.channel.transport)

    def setResponseCode(self, code: int, message: bytes | None = None) -> None:
        self.code = code
        # The usual phrase: the status line is made once per process.
        self.reason = None if message == _REASONS.get(code) else message

    def setHeader(self, name: bytes, value: bytes) -> None:
        self._response[name.lower()] = (name, [value])

    def addHeader(self, name: bytes, value: bytes) -> None:
        self._response.setdefault(name.lower(), (name, []))[1].append(value)

    def removeHeader(self, name: bytes) -> None:
        self._response.pop(name.lower(), None)

    def responseHeader(self, name: bytes) -> bytes | None:
        """@return: the last value of the response header C{name}, or C{None}."""
        known = self._response.get(name.lower())
        return known[1][-1] if known else None

    # Answer 302 to a URL (as twisted.web.static redirects a directory).
    redirect = http.Request.redirect

    def setLastModified(self, when: float):
        """Set C{Last-Modified}; @return: C{CACHED} (and 304) if the client's copy is not older."""
        when = int(math.ceil(when))
        if self.lastModified is None or self.lastModified < when:
            self.lastModified = when
            self.setHeader(b"last-modified", datetimeToString(when))
        since = self.getHeader(b"if-modified-since")
        if since:
            try:
                since_time = stringToDatetime(since.split(b";", 1)[0])
            except ValueError:
                return None
            if since_time >= self.lastModified:
                self.setResponseCode(304)
                return CACHED
        return None

    def answer(self, body: bytes) -> None:
        """Send C{body} (if any) as the whole body, with its C{Content-Length}, and finish."""
        if body:
            self.setHeader(b"content-length", b"%d" % len(body))
            self.write(body)
        self.finish()

    def answer_text(self, code: int, body: bytes) -> None:
        """Answer C{code} with the plain text C{body}, and finish."""
        self.setResponseCode(code)
        self.setHeader(b"content-type", b"text/plain; charset=utf-8")
        self.answer(body)

    def _head(self) -> bytes:
        """@return: the status line and headers; decides how the body is framed."""
        self.startedWriting = True
        channel = self.channel
        code = self.code
        headers = self._response
        headers.pop(b"transfer-encoding", None)  # ours to decide
        if code < 200 or code in _NO_BODY:
            self._body_allowed = False
            headers.pop(b"content-length", None)
        else:
            if self.method == b"HEAD":
                self._body_allowed = False
            length = headers.get(b"content-length")
            if length is not None:
                try:
                    if self._body_allowed:
                        self._left = int(length[1][-1])
                except ValueError:
                    self.persistent = False
            elif self.clientproto == b"HTTP/1.1":
                self._chunked = True
                headers[b"transfer-encoding"] = (b"Transfer-Encoding", [b"chunked"])
            else:
                self.persistent = False  # the close ends the body
        connection = headers.get(b"connection")
        if connection is not None and b"close" in b",".join(connection[1]).lower():
            self.persistent = False
        if channel.closing:  # (a drain made the request not persistent already)
            self.persistent = False
        if not self.persistent:
            headers[b"connection"] = (b"Connection", [b"close"])
        elif self.clientproto == b"HTTP/1.0":
            headers[b"connection"] = (b"Connection", [b"keep-alive"])
        if self.reason is None and code in _STATUS_LINES:
            lines = [_STATUS_LINES[code]]
        else:
            reason = self.reason or _REASONS.get(code, b"Unknown")
            lines = [b"HTTP/1.1 %d %s\r\n" % (code, reason)]
        for name, values in headers.values():
            name = _spelled(name)
            for value in values:
                lines += (name, b": ", value, b"\r\n")
        lines.append(b"\r\n")
        return b"".join(lines)

    def write(self, data: bytes) -> None:
        """Send C{data} as (more of) the body, after the head on the first call."""
        channel = self.channel
        if self.finished or channel is None or channel.transport is None:
            return
        head = b"" if self.startedWriting else self._head()
        if not self._body_allowed:
            data = b""
        left = self._left
        if left is not None:
            if len(data) > left:
                # More would be read as the next response.
                _log.warn(
                    "{method} {uri}: the response is longer than its Content-Length; "
                    "cut there, and the connection closed",
                    method=self.method.decode("latin-1"),
                    uri=masked(self.uri),
                )
                data = data[:left]
                self.persistent = False
            self._left = left - len(data)
        self.sentLength += len(data)
        if self._chunked and data:
            self._out(head, b"%x\r\n" % len(data), data, b"\r\n")
        elif head or data:
            self._out(head, data)

    def _out(self, *pieces: bytes) -> None:
        """Send C{pieces}, or hold them until the response is logged (L{send_held})."""
        if self._held is not None:
            self._held += pieces
        elif sum(map(len, pieces)) < 65536:
            self.channel.send(b"".join(pieces))
        else:
            self.channel.send(*pieces)  # not copied into one string

    def send_held(self) -> None:
        """Send what was held (the response streams, or is counted and logged)."""
        held, self._held = self._held, None
        if held and self.channel is not None:
            self._out(*held)

    def finish(self) -> None:
        """End the response; the connection goes on to the next request, or closes."""
        channel = self.channel
        if self.finished or channel is None:
            return
        if not self.startedWriting:
            # (The head drops it again from a response that has no body.)
            if self.method != b"HEAD" and b"content-length" not in self._response:
                self.setHeader(b"content-length", b"0")
            self.write(b"")
        elif self._chunked and self._body_allowed:
            self._out(b"0\r\n\r\n")
        if self._left:
            self.persistent = False  # fewer bytes than Content-Length said
        self.unregisterProducer()
        self.finished = True
        channel.request_done(self)
        waiters, self._waiters = self._waiters, None
        for waiter in waiters or ():
            waiter.callback(None)

    def registerProducer(self, producer, streaming: bool) -> None:
        """Have C{producer} write the body, with the transport's flow control."""
        self.send_held()
        self._producer = producer
        self.channel.register_producer(producer, streaming)

    def unregisterProducer(self) -> None:
        if self._producer is not None:
            self._producer = None
            if self.channel is not None:
                self.channel.unregister_producer()

    def notifyFinish(self) -> defer.Deferred:
        """@return: a Deferred fired when the response ends, or failed if the connection is lost."""
        d = defer.Deferred()
        if self.finished:
            d.callback(None)
        elif self.channel is None:
            d.errback(Failure(ConnectionError("the connection was lost")))
        else:
            if self._waiters is None:
                self._waiters = []
            self._waiters.append(d)
        return d

    def connection_lost(self, reason: Failure) -> None:
        self.channel = None
        self._producer = None
        if self.on_lost is not None:
            self.on_lost(reason)
        waiters, self._waiters = self._waiters, None
        for waiter in waiters or ():
            waiter.errback(reason)
