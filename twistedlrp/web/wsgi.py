"""
The WSGI container: the application runs in a pool thread, and a response
that is not streamed reaches the reactor in one C{callFromThread}
(C{twisted.web.wsgi} makes a blocking round trip per C{write}). Streaming
responses (any iterable that is not a list) are written chunk by chunk with
flow control, by at most C{--stream-threads} threads at once.
"""

from __future__ import annotations

import functools
import io
import threading
from urllib.parse import unquote_to_bytes

from twisted.logger import Logger
from twisted.web.server import NOT_DONE_YET

from twistedlrp.web.limits import WRITE_TIMEOUT, StreamSlots
from twistedlrp.web.pool import Replies

log = Logger()

# Seconds between two looks at the reactor while a stream waits for a slow client.
_WAIT_SLICE = 5.0
# Bytes of a stream handed to the reactor and not written yet, at most.
_QUEUED_BYTES = 64 * 1024


class _ErrorStream(io.TextIOBase):
    """C{wsgi.errors}: what the application writes there goes to the log."""

    def write(self, text):
        text = text.rstrip("\n") if isinstance(text, str) else repr(text)
        if text:
            log.error("{text}", text=text)


_ERRORS = _ErrorStream()


class _TooSlow(ConnectionError):
    """A streaming response could not be written within the write deadline."""


class _NoStreamSlot(Exception):
    """Every thread that may stream a response does (--stream-threads)."""


@functools.lru_cache(maxsize=1024)  # the names are the clients': bounded
def _key(name: bytes) -> str | None:
    # A name with "_" would collide with its "-" twin (a forged X_Forwarded_For).
    if b"_" in name:
        return None
    key = name.decode("latin-1").upper().replace("-", "_")
    return key if key in ("CONTENT_TYPE", "CONTENT_LENGTH") else "HTTP_" + key


def build_environ(request, remote_addr: str, scheme: str, multiprocess: bool = False) -> dict:
    """@return: the PEP 3333 environ of C{request}, built in the reactor thread."""
    host = request.getHost()
    server_port = str(getattr(host, "port", "") or "")
    environ = {
        "SCRIPT_NAME": "",
        "REQUEST_METHOD": request.method.decode("latin-1"),
        "PATH_INFO": unquote_to_bytes(request.path).decode("latin-1"),
        "QUERY_STRING": request.query.decode("latin-1"),
        "SERVER_NAME": getattr(host, "host", None) or "localhost",
        "SERVER_PORT": server_port or ("443" if scheme == "https" else "80"),
        "SERVER_PROTOCOL": request.clientproto.decode("latin-1"),
        "REMOTE_ADDR": remote_addr,
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": scheme,
        "wsgi.input": request.content,
        "wsgi.errors": _ERRORS,
        "wsgi.multithread": True,
        "wsgi.multiprocess": multiprocess,
        "wsgi.run_once": False,
    }
    for name, value in request.headers:
        key = _key(name)
        if key is None:
            continue
        text = value.decode("latin-1")
        known = environ.get(key)
        environ[key] = text if known is None else known + "," + text
    if "CONTENT_LENGTH" not in environ:
        # Django reads exactly CONTENT_LENGTH bytes: give a chunked body's size.
        size = request.content.seek(0, 2)
        request.content.seek(0)
        if size:
            environ["CONTENT_LENGTH"] = str(size)
    return environ


class WSGIResource:
    """Answers every request with C{application}, in a thread of C{pool}."""

    def __init__(self, reactor, pool, application, on_saturated, streams=None, multiprocess=False):
        self.multiprocess = multiprocess
        self._reactor = Replies(reactor)
        self._pool = pool
        self._application = application
        self._on_saturated = on_saturated
        self.streams: StreamSlots | None = streams

    def render(self, request):
        environ = build_environ(request, request.client, request.scheme, self.multiprocess)
        channel = request.channel
        response = _WSGIResponse(
            self._reactor,
            request,
            self._application,
            environ,
            channel.limits.write_timeout or None,
            streams=self.streams,
            reactor_deadline=channel.write_deadline,
        )
        if not self._pool.submit(response.run):
            return self._on_saturated(request)
        request.on_lost = response.connection_lost
        return NOT_DONE_YET


class _WSGIResponse:
    """One application call: runs in a pool thread, answers in the reactor."""

    _status: str | None = None
    _headers: list | None = None
    _streaming = False
    disconnected = False
    _resumed: threading.Event | None = None  # made when the response streams

    def __init__(
        self,
        reactor,
        request,
        application,
        environ,
        write_timeout=WRITE_TIMEOUT,
        streams: StreamSlots | None = None,
        reactor_deadline: bool = False,
    ):
        self._reactor = reactor
        self._write_timeout = write_timeout
        self._streams = streams
        # The connection cuts a client that reads nothing: wait for that.
        self._reactor_deadline = reactor_deadline
        self._request = request
        self._application = application
        self._environ = environ
        self._written: list[bytes] = []

    def connection_lost(self, reason=None):
        self.disconnected = True
        if self._resumed is not None:
            self._resumed.set()
            self._room.set()

    stopProducing = connection_lost  # of the IPushProducer below

    def _send_headers(self, status: str, headers: list) -> None:
        request = self._request
        code_text, _, reason = status.partition(" ")
        request.setResponseCode(int(code_text), reason.encode("latin-1"))
        for name, _ in headers:
            if name.lower() in ("server", "date"):
                request.removeHeader(name.encode("latin-1"))
        for name, value in headers:
            request.addHeader(name.encode("latin-1"), value.encode("latin-1"))

    def _deliver(self, status: str, headers: list, body: bytes) -> None:
        request = self._request
        if self.disconnected:
            return
        self._send_headers(status, headers)
        # Request drops it from a response without a body.
        if request.responseHeader(b"content-length") is None:
            request.setHeader(b"content-length", b"%d" % len(body))
        request.write(body)
        request.finish()

    def _start_stream(self, status: str, headers: list, done: threading.Event) -> None:
        if not self.disconnected:
            self._request.streaming = True
            self._send_headers(status, headers)
            self._request.registerProducer(self, True)
        done.set()

    def _flush(self) -> None:
        with self._lock:
            chunks, self._queued = self._queued, []
            self._queued_bytes = 0
            self._room.set()
        if not self.disconnected:
            self._request.write(b"".join(chunks))

    def _finish_stream(self) -> None:
        self._request.streaming = False
        if not self.disconnected:
            self._request.finish()  # (which unregisters this producer)

    def _cut(self) -> None:
        transport = self._request.channel and self._request.channel.transport
        if transport is not None:
            transport.abortConnection()

    # IPushProducer, so a slow client slows a streaming response down.
    def pauseProducing(self):
        self._resumed.clear()

    def resumeProducing(self):
        self._resumed.set()

    def start_response(self, status, headers, exc_info=None):
        if exc_info is not None:
            if self._streaming:
                raise exc_info[1].with_traceback(exc_info[2])
        elif self._status is not None:
            raise RuntimeError("start_response() was called twice without exc_info")
        if not isinstance(status, str) or len(status) < 4 or not status[:3].isdigit():
            raise ValueError(f"bad WSGI status {status!r}")
        self._status = status
        self._headers = list(headers)
        return self._legacy_write

    def _legacy_write(self, data: bytes) -> None:
        if not self._streaming:
            self._begin_stream()
        self._stream(data)

    def _begin_stream(self) -> None:
        if self._status is None:
            raise RuntimeError("the application wrote before calling start_response()")
        if self._streams is not None and not self._streams.take():
            raise _NoStreamSlot()
        self._streaming = True
        self._resumed = threading.Event()
        self._resumed.set()
        self._room = threading.Event()
        self._room.set()
        self._lock = threading.Lock()
        self._queued: list[bytes] = []
        self._queued_bytes = 0
        done = threading.Event()
        self._reactor.callFromThread(self._start_stream, self._status, self._headers, done)
        if not done.wait(self._write_timeout):
            raise _TooSlow("the reactor did not take a response chunk")
        for chunk in self._written:
            self._stream(chunk)
        self._written = []

    def _stream(self, data: bytes) -> None:
        if self.disconnected or not data:
            return
        self._wait_for_client()
        if self.disconnected:
            return
        # Not waiting for the reactor (most of a stream's cost): small chunks go out together.
        with self._lock:
            schedule = not self._queued  # else a flush is on its way
            self._queued.append(data)
            self._queued_bytes += len(data)
            full = self._queued_bytes >= _QUEUED_BYTES
            if full:
                self._room.clear()
        if schedule:
            self._reactor.callFromThread(self._flush)
        if full and not self._room.wait(self._write_timeout):
            raise _TooSlow("the reactor did not take a response chunk")

    def _wait_for_client(self) -> None:
        if not self._reactor_deadline:
            if not self._resumed.wait(self._write_timeout):
                raise _TooSlow("the client did not read the response")
            return
        # The transport's cut wakes this thread; until then the client reads, however slowly.
        while not self._resumed.wait(_WAIT_SLICE):
            if not getattr(self._reactor, "running", True):
                raise _TooSlow("the reactor stopped while the client did not read the response")

    def run(self) -> None:
        if self.disconnected:
            return
        what = {"method": self._environ["REQUEST_METHOD"], "path": self._environ["PATH_INFO"]}
        result = None
        try:
            result = self._application(self._environ, self.start_response)
            buffered = (
                isinstance(result, list | tuple) or getattr(result, "streaming", None) is False
            )
            for chunk in result:
                if self.disconnected:
                    break
                if not isinstance(chunk, bytes):
                    raise TypeError(f"the application yielded {type(chunk).__name__}, not bytes")
                if buffered and not self._streaming:
                    self._written.append(chunk)
                elif chunk:
                    self._legacy_write(chunk)
            if self._status is None:
                raise RuntimeError("the application returned without calling start_response()")
        except _NoStreamSlot:
            streams = self._streams
            if streams.should_warn():
                log.warn(
                    "{limit} threads stream responses already (--stream-threads): "
                    "{method} {path} is answered 503 ({refused} so far)",
                    limit=streams.limit,
                    refused=streams.refused,
                    **what,
                )
            body = b"Server busy: too many streaming responses. Retry shortly.\n"
            self._answer("503 Service Unavailable", body, ("Retry-After", "1"))
            return
        except _TooSlow as e:
            log.warn(
                "Streaming {method} {path}: {reason} within {timeout:g} s; "
                "the connection is cut and the thread freed",
                reason=e,
                timeout=self._write_timeout,
                **what,
            )
            self.disconnected = True
            self._reactor.callFromThread(self._cut)
            return
        except BaseException:
            log.failure("Error in the WSGI application for {method} {path}", **what)
            if self._streaming:
                self._reactor.callFromThread(lambda: self.disconnected or self._cut())
            else:
                self._answer("500 Internal Server Error", b"Internal Server Error\n")
            return
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                try:
                    close()
                except BaseException:
                    log.failure("Error while closing the WSGI response")
            if self._streaming and self._streams is not None:
                self._streams.give_back()
        if self._streaming:
            self._reactor.callFromThread(self._finish_stream)
        else:
            self._reactor.callFromThread(
                self._deliver, self._status, self._headers, b"".join(self._written)
            )

    def _answer(self, status: str, body: bytes, *headers: tuple[str, str]) -> None:
        headers = [("Content-Type", "text/plain; charset=utf-8"), *headers]
        self._reactor.callFromThread(self._deliver, status, headers, body)
