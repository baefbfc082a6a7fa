"""
The live progress of one job as Server-Sent Events, answered by the reactor:
C{GET /-/jobs/<id>/events?token=...} (L{twistedlrp.progress}). Each stream asks
the job service with C{wait(seen=...)} at most every L{MIN_INTERVAL} seconds
and sends an C{event: progress} on each change until the job finishes.
"""

from __future__ import annotations

import json
import re

from twisted.internet import defer, task
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.web.server import NOT_DONE_YET
from zope.interface import implementer

from twistedlrp import progress
from twistedlrp.jobs.errors import JobServiceUnavailable
from twistedlrp.jobs.protocol.wire import seen_mark
from twistedlrp.ordered_service import cancel_call
from twistedlrp.progress import EVENTS_PREFIX, BadToken, check_token, describe

log = Logger()

# A wait answers at once when the job changes here, else after this long.
WAIT_TIMEOUT = 2.0
# A job may report progress far more often than a bar needs to move.
MIN_INTERVAL = 0.25
HEARTBEAT = 15.0
# The browser's reconnection delay (milliseconds) after a broken stream.
RETRY_MS = 2000
# After the job service failed to answer, before asking again.
_UNAVAILABLE_DELAY = 2.0

_PREFIX = EVENTS_PREFIX.encode()
_PATH = re.compile(rb"^" + re.escape(_PREFIX) + rb"([0-9a-fA-F-]{36})/events$")


class JobEvents:
    """The event streams of one web process; C{client()} returns its job client, if any."""

    prefix = _PREFIX  # of the paths routed here (/-/jobs/)

    def __init__(self, reactor, client, max_streams: int | None = None):
        self.reactor = reactor
        self._client = client
        self._max_streams = max_streams
        self.streams: set[_Stream] = set()

    @property
    def max_streams(self) -> int:
        """@return: the most streams open at once (C{LRP_PROGRESS_MAX_STREAMS} unless given)."""
        return progress.max_streams() if self._max_streams is None else self._max_streams

    def render(self, request) -> bytes | object:
        """@return: an error body (403, 404, 405, 503), or C{NOT_DONE_YET} with the stream begun."""
        found = _PATH.match(request.path)
        if found is None:
            return _answer(request, 404, b"Not Found\n")
        if request.method != b"GET":
            request.setHeader(b"allow", b"GET")
            return _answer(request, 405, b"Method Not Allowed\n")
        job_id = found.group(1).decode().lower()
        token = (request.args.get(b"token") or [b""])[0].decode("latin-1")
        try:
            check_token(token, job_id, check_user=False)
        except BadToken as e:
            return _answer(request, 403, f"Forbidden: {e}.\n".encode())
        client = self._client()
        if client is None:
            return _answer(request, 503, b"No job client in this process.\n")
        if len(self.streams) >= self.max_streams:
            request.setHeader(b"retry-after", b"5")
            return _answer(request, 503, b"Too many open progress streams; poll instead.\n")
        stream = _Stream(self, request, client, job_id)
        self.streams.add(stream)
        stream.start()
        return NOT_DONE_YET

    def describe(self) -> dict:
        return {"open": len(self.streams), "max": self.max_streams}

    def close_all(self) -> None:
        """End every stream (they must not hold the drain at shut-down)."""
        for stream in list(self.streams):
            stream.close()


def _answer(request, code: int, body: bytes) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"text/plain; charset=utf-8")
    request.setHeader(b"cache-control", b"no-store")
    return body


@implementer(IPushProducer)
class _Stream:
    """One client's stream of one job's events."""

    done = False
    _last: dict | None = None
    _paused = False
    _cut_call = _heartbeat = _sleep = None

    def __init__(self, events: JobEvents, request, client, job_id: str):
        self.events = events
        self.reactor = events.reactor
        self.request = request
        self.client = client
        self.job_id = job_id

    def start(self) -> None:
        request = self.request
        request.setHeader(b"content-type", b"text/event-stream; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        # nginx buffers responses unless told not to.
        request.setHeader(b"x-accel-buffering", b"no")
        request.registerProducer(self, True)
        request.notifyFinish().addBoth(lambda _: self._end())
        self._write(b"retry: %d\n\n" % RETRY_MS)
        self._heartbeat = self.reactor.callLater(HEARTBEAT, self._beat)
        defer.ensureDeferred(self._follow()).addErrback(self._failed)

    async def _follow(self) -> None:
        op, kw = "status", {"job_id": self.job_id}
        while not self.done:
            asked = self.reactor.seconds()
            try:
                info = await self.client.request(op, kw)
            except Exception as e:
                if self.done:
                    return
                if not isinstance(e, JobServiceUnavailable):
                    # Unknown job, or the service refused: nothing will change.
                    self._event("refused", {"error": str(e)})
                    self.close()
                    return
                self._event("unavailable", {"error": str(e)})
                await self._pause(_UNAVAILABLE_DELAY)
                continue
            if self.done:
                return
            shown = describe(info)
            # While the client is not reading, only the last word is worth queueing.
            if shown != self._last and (not self._paused or shown["finished"]):
                self._last = shown
                self._event("progress", shown)
            if shown["finished"]:
                self.close()
                return
            op = "wait"
            kw = {"job_id": self.job_id, "timeout": WAIT_TIMEOUT, "seen": seen_mark(info)}
            rest = MIN_INTERVAL - (self.reactor.seconds() - asked)
            if rest > 0:
                await self._pause(rest)

    def _pause(self, seconds: float) -> defer.Deferred:
        """@return: a Deferred firing after C{seconds}, or at once when the stream ends."""
        self._sleep = task.deferLater(self.reactor, seconds, lambda: None)
        return self._sleep.addErrback(lambda failure: failure.trap(defer.CancelledError))

    def _event(self, name: str, data: dict) -> None:
        text = json.dumps(data, separators=(",", ":"), allow_nan=False)
        self._write(f"event: {name}\ndata: {text}\n\n".encode())

    def _write(self, data: bytes) -> None:
        if self.done:
            return
        self.request.write(data)
        if self._heartbeat is not None and self._heartbeat.active():
            self._heartbeat.reset(HEARTBEAT)

    def _beat(self) -> None:  # (never after _end, which cancels it)
        self._write(b": keep-alive\n\n")
        self._heartbeat = self.reactor.callLater(HEARTBEAT, self._beat)

    def _failed(self, failure) -> None:
        log.failure("The progress stream of job {job} failed", failure=failure, job=self.job_id)
        self.close()

    def close(self) -> None:
        """End the stream (the response is finished, the connection kept)."""
        if self.done:
            return
        self._end()
        self.request.unregisterProducer()
        self.request.finish()

    def _end(self) -> None:
        self.done = True
        self.events.streams.discard(self)
        cancel_call(self._heartbeat)
        cancel_call(self._cut_call)
        self._heartbeat = self._cut_call = None
        if self._sleep is not None:
            self._sleep.cancel()

    # IPushProducer: a client that stops reading is cut after --write-timeout.
    def pauseProducing(self) -> None:
        self._paused = True
        timeout = self.request.channel.site.limits.write_timeout  # the connection pauses it
        if timeout and self._cut_call is None:
            self._cut_call = self.reactor.callLater(timeout, self._cut)

    def resumeProducing(self) -> None:
        self._paused = False
        cancel_call(self._cut_call)
        self._cut_call = None

    def stopProducing(self) -> None:
        self._end()

    def _cut(self) -> None:
        self._cut_call = None
        log.info(
            "Cut the progress stream of job {job}: its client read nothing for "
            "--write-timeout seconds",
            job=self.job_id,
        )
        self._end()
        transport = self.request.channel and self.request.channel.transport
        if transport is not None:
            transport.abortConnection()
