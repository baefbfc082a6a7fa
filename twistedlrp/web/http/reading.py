"""
How the HTTP/1.1 protocol reads requests, over httptools (llhttp), which
refuses what a request smuggler sends (docs/serving.md has the table). It
cannot pause nor say where a message ended, so each message's end is found
here and the parser fed one message at a time (a pipelined request waits as
bytes); each part must end where the parser ends it, or the request gets
400. Sizes, the target, a second Host, C{identity, chunked}, the version and
runs of spaces in the request line are checked here too.
"""

from __future__ import annotations

import io
import re
import tempfile
import time

import httptools

from twistedlrp.web.http.request import Request
from twistedlrp.web.limits import short_answer

# Seconds an idle keep-alive connection (or a body that stopped coming) stays open.
KEEP_ALIVE_TIMEOUT = 60.0
# Seconds an oversized body is read and dropped after the 413 (not a reset).
LINGER_SECONDS = 5.0
MAX_CHUNK_SIZE = 2**63
# A chunk-size line (its size and extensions) longer than this gets 400.
MAX_CHUNK_LINE = 4096
# Bytes of pipelined requests held while one is answered, before reading pauses.
PIPELINE_BUFFER = 64 * 1024
# A body larger than this goes to a temporary file.
SPOOL_SIZE = 1024 * 1024

# What the connection reads now, in this order (nothing while a request is answered).
_HEAD, _LENGTH, _CHUNK_LINE, _CHUNK_DATA, _TRAILERS, _ANSWERING, _CLOSED = range(7)

# The request headers the protocol itself looks at.
_FRAMING = frozenset((b"host", b"transfer-encoding", b"content-length", b"expect"))
_OWS = (b" ", b"\t")
# An absolute-form target: its authority (no user info), and its path and query.
_ABSOLUTE = re.compile(rb"https?://([^/?@]+)((?:[/?].*)?)\Z", re.IGNORECASE | re.DOTALL)

_400 = b"400 Bad Request"
_NOT_A_PATH = (
    b"Bad request: the request target must be a path (/...), an http or https URL, "
    b"or * for OPTIONS.\n"
)


class _Answer(Exception):
    """C{_Answer(status, body)}: answer C{status} with the text C{body} and close."""


def _bad(text: bytes) -> _Answer:
    return _Answer(_400, b"Bad request: " + text + b"\n")


def _too_large() -> _Answer:
    return _Answer(b"431 Request Header Fields Too Large", b"Request header fields too large.\n")


def _refusal(exc: httptools.HttpParserError) -> _Answer:
    if isinstance(exc, httptools.HttpParserInvalidURLError):
        return _Answer(_400, _NOT_A_PATH)
    reason = str(exc)
    if reason == "Chunk size overflow":
        return _bad(b"chunk size too large.")
    if reason == "Unexpected whitespace after header value":
        return _bad(b"a header line begins with whitespace.")
    if "CR" in reason or "LF" in reason:
        return _bad(b"lines must end with CRLF.")
    return _bad(reason.encode("latin-1", "replace") + b".")


def origin_form(method: bytes, target: bytes) -> tuple[bytes, bytes | None]:
    """
    @return: C{(path, host)} for a C{target} that does not begin with C{/}:
        an absolute form's path and host, or C{(b"*", None)} for C{OPTIONS *}.
    @raise _Answer: 400 for any other target.
    """
    if target == b"*":
        if method == b"OPTIONS":
            return target, None
        raise _bad(b"* is a request target of OPTIONS only.")
    absolute = _ABSOLUTE.match(target)
    if absolute is None:
        raise _Answer(_400, _NOT_A_PATH)
    authority, path = absolute.groups()
    return (path if path.startswith(b"/") else b"/" + path), authority


class MessageReader:
    """The reading side of L{twistedlrp.web.http.protocol.HTTPConnection}."""

    request: Request | None = None
    _state = _HEAD
    _complete = False  # the parser ended one
    _synthetic = False
    _paused = False
    _advancing = False
    _peer_done = False  # the client closed its side
    _line: bytes | None = None  # the request line so far, until it is whole

    def _advance(self) -> None:
        """Parse what is buffered, up to the end of a request still to answer."""
        if self._advancing:
            return  # a response finished while its request was dispatched
        self._advancing = True
        try:
            while self._buffer and self._state < _ANSWERING:
                if not self._step():
                    break
                if self._complete:
                    self._complete = False
                    self._message_done()
        except _Answer as answer:
            self.answer_and_close(*answer.args)
        finally:
            self._advancing = False
        if self._state == _ANSWERING:
            if len(self._buffer) > PIPELINE_BUFFER and not self._paused:
                self._paused = True
                self.transport.pauseProducing()
        elif self._peer_done and self._state != _CLOSED:
            self._close_quietly()  # the rest of a request will never come

    def _step(self) -> bool:
        """Feed the parser the next part of the message. @return: False to wait for more."""
        state, buffer = self._state, self._buffer
        if state == _HEAD or state == _TRAILERS:
            if self._line == b"" and state == _HEAD:
                # Empty lines before a request line (RFC 9112 section 2.2).
                stripped = buffer.lstrip(b"\r\n")
                self._head_bytes += len(buffer) - len(stripped)
                buffer = stripped
            if self._line is not None and state == _HEAD:
                self._request_line(buffer)
            # The part ends at the first empty line (the parser refuses a bare LF).
            window = self._tail + buffer
            end = window.find(b"\r\n\r\n")
            take = len(buffer) if end == -1 else end + 4 - len(self._tail)
            self._head_bytes += take
            if self._head_bytes > self.limits.max_header_size:
                raise _too_large()
            self._tail = window[-3:] if end == -1 else b""
            self._buffer = buffer[take:]
            self._feed(buffer[:take])
            if end != -1 and (self.request is None if state == _HEAD else not self._complete):
                raise _bad(b"the head did not end where it should.")
        elif state == _LENGTH or state == _CHUNK_DATA:
            take = min(self._left, len(buffer))
            self._left -= take
            self._buffer = buffer[take:]
            self._feed(buffer[:take] if take < len(buffer) else buffer)
            if not self._left:
                if state == _CHUNK_DATA:
                    self._state = _CHUNK_LINE
                elif not self._complete:
                    raise _bad(b"the body did not end where it should.")
        else:
            return self._chunk_line(buffer)
        return True

    def _request_line(self, buffer: bytes) -> None:
        # llhttp takes runs of spaces between the parts, which a proxy may split otherwise.
        end = buffer.find(b"\n")
        line = self._line + (buffer if end == -1 else buffer[:end])
        if end == -1:
            self._line = line  # bounded: it is part of the head
        elif line.count(b" ") > 2:
            raise _bad(b"a request line is a method, a target and a version, one space apart.")
        else:
            self._line = None

    def _chunk_line(self, buffer: bytes) -> bool:
        end = buffer.find(b"\r\n")
        size_text = (buffer if end == -1 else buffer[:end]).split(b";", 1)[0]
        # The parser takes sizes up to 2**64 - 1, and says nothing before their data.
        if len(size_text.lstrip(b"0")) > 16:
            raise _bad(b"chunk size too large.")
        if end == -1:
            if len(buffer) > MAX_CHUNK_LINE:
                raise _bad(b"chunk size line too long.")
            return False
        try:
            size = int(size_text, 16)
        except ValueError:
            size = 0  # the parser refuses the line
        if size >= MAX_CHUNK_SIZE:
            raise _bad(b"chunk size too large.")
        self._buffer = buffer[end + 2 :]
        self._feed(buffer[: end + 2])
        if size:
            if not self.request.rejected and self._received + size > self.site.max_body_size:
                self._refuse_body()
            self._left = size + 2  # its data, and the CRLF after it
            self._state = _CHUNK_DATA
        else:
            self._state = _TRAILERS
            self._tail = b"\r\n"  # the size line's: an empty line ends the body
            self._head_bytes = 0
        return True

    def _feed(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._upgraded()
        except httptools.HttpParserCallbackError as e:
            if isinstance(e.__context__, _Answer):
                raise e.__context__ from None
            raise
        except httptools.HttpParserError as e:
            raise _refusal(e) from None

    def _upgraded(self) -> None:
        # llhttp ends a request with Upgrade at its head; no protocol is switched to: a new
        # parser reads on, after a head of our own with this one's framing if it has a body.
        self._parser = httptools.HttpRequestParser(self)
        if self._state in (_LENGTH, _CHUNK_LINE):
            self._complete = False
            framing = (
                b"Content-Length: %d" % self._left
                if self._state == _LENGTH
                else b"Transfer-Encoding: chunked"
            )
            self._synthetic = True
            try:
                self._parser.feed_data(b"POST / HTTP/1.1\r\n" + framing + b"\r\n\r\n")
            finally:
                self._synthetic = False

    def on_message_begin(self):
        if self._synthetic:
            return
        if self.request is not None:
            # The parser saw the end of a message before this protocol did.
            raise _bad(b"a message began inside another.")
        self._arrived = time.monotonic()
        self._url = b""
        self._headers = []
        self._host_seen = False
        self._te = self._cl = None
        self._expect_continue = False

    def on_url(self, url: bytes):
        self._url += url

    def on_header(self, name: bytes, value: bytes):
        if self._synthetic or self._state == _TRAILERS:
            return  # trailer fields are not headers (a proxy may not have seen them)
        headers = self._headers
        if len(headers) >= self.limits.max_headers:
            raise _too_large()
        key = name.lower()
        if value[-1:] in _OWS:
            value = value.rstrip(b" \t")
        if key in _FRAMING:
            if key == b"host":
                if self._host_seen:
                    raise _bad(b"more than one Host header.")
                self._host_seen = True
            elif key == b"transfer-encoding":
                self._te = value if self._te is None else self._te + b"," + value
            elif key == b"content-length":
                self._cl = value
            else:
                self._expect_continue = value.lower() == b"100-continue"
        headers.append((key, value))

    def on_headers_complete(self):
        if self._synthetic:
            return
        parser = self._parser
        version = parser.get_http_version()
        if version in ("1.1", "1.0"):
            proto = b"HTTP/" + version.encode()
        elif version[:1] in ("0", "1"):
            raise _bad(b"unsupported HTTP version.")
        else:
            raise _Answer(b"505 HTTP Version Not Supported", b"HTTP version not supported.\n")
        method = parser.get_method()
        target = self._url
        headers = self._headers
        authority = None
        if target[:1] != b"/":
            target, authority = origin_form(method, target)
            if authority is not None:
                # The host of an absolute-form target wins over the Host header.
                headers = [h for h in headers if h[0] != b"host"]
                headers.append((b"host", authority))
        if authority is None and not self._host_seen and proto == b"HTTP/1.1":
            raise _bad(b"no Host header (RFC 9112 section 3.2).")
        te = self._te
        if te is not None and [t.strip() for t in te.lower().split(b",")] != [b"chunked"]:
            raise _bad(b"the only transfer coding taken is chunked.")
        request = Request(self, method, target, proto, headers, self._arrived)
        # HTTP/1.0 with Transfer-Encoding: "close the connection after processing" (RFC 9112).
        request.persistent = (
            parser.should_keep_alive()
            and not self.draining
            and (te is None or proto != b"HTTP/1.0")
        )
        self.request = request
        self._on_due = None  # a whole head: no longer subject to the head deadline
        self.site.awaiting.pop(self, None)
        self._received = 0
        length = int(self._cl) if self._cl is not None else None
        if te is None and not length:
            request.content = io.BytesIO()
            return
        request.content = tempfile.SpooledTemporaryFile(SPOOL_SIZE)
        self._arm(KEEP_ALIVE_TIMEOUT, self._idle_timed_out)
        if te is not None:
            self._state = _CHUNK_LINE
        else:
            self._state, self._left = _LENGTH, length
        if length is not None and length > self.site.max_body_size:
            self._refuse_body()
        elif self._expect_continue and proto == b"HTTP/1.1" and not self._buffer:
            # The body will be read: the client may send it (unless it has).
            self.send(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes):
        request = self.request
        if request.rejected:
            return
        self._received += len(body)
        if self._received > self.site.max_body_size:
            self._refuse_body()
        else:
            request.content.write(body)

    def on_message_complete(self):
        self._complete = True

    def _refuse_body(self) -> None:
        """Answer 413 now; read (and drop) the rest of the body for a little while."""
        request = self.request
        request.rejected = True
        request.persistent = False
        request.code = 413
        body = b"Request body too large.\n"
        request.sentLength = len(body)
        request.content.close()  # (set with the head; never refused twice)
        request.content = None
        self.send(short_answer(b"413 Content Too Large", body))
        self.site.log(request)
        self._linger_call = self.reactor.callLater(LINGER_SECONDS, self.cut)
