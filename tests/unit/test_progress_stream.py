"""
One job progress stream (twistedlrp/web/progress_stream.py) on a fake clock, with a
fake request and a job client whose answers the test gives: the heartbeat
comment after 15 s of silence, a client that stops reading (only the final
state is queued; cut after --write-timeout, unless it reads again), a job
service that cannot be reached, an unknown job, and close_all at shut-down.
"""

from __future__ import annotations

from types import SimpleNamespace

from twisted.internet import defer
from twisted.internet.task import Clock

from twistedlrp.jobs.errors import JobServiceUnavailable, UnknownJob
from twistedlrp.jobs.protocol.wire import seen_mark
from twistedlrp.web import progress_stream
from twistedlrp.web.progress_stream import HEARTBEAT, MIN_INTERVAL, JobEvents, _Stream

JOB_ID = "6f1c2a34-5b6d-4e7f-8a9b-0c1d2e3f4a5b"


class Client:
    """Each request waits for the test's answer: C{answer(info)} or C{fail(error)}."""

    def __init__(self):
        self.calls: list[tuple[str, dict, defer.Deferred]] = []

    async def request(self, op, kw, timeout=None):
        d = defer.Deferred()
        self.calls.append((op, kw, d))
        return await d

    def answer(self, state="running", current=0, total=3):
        op, kw, d = self.calls[-1]
        d.callback(job(state, current, total))

    def fail(self, error):
        self.calls[-1][2].errback(error)


def job(state="running", current=0, total=3) -> dict:
    return {
        "id": JOB_ID,
        "name": "testapp.jobs.steps",
        "state": state,
        "progress": [current, total, f"step {current}"],
        "result": {"ok": True} if state == "succeeded" else None,
    }


class Request:
    """What a stream uses of a twisted.web request."""

    def __init__(self, write_timeout=60.0):
        self.headers = {}
        self.written = b""
        self.finished = False
        self.producer = None
        self.aborted = False
        self._finish = defer.Deferred()
        transport = SimpleNamespace(abortConnection=self._abort)
        limits = SimpleNamespace(write_timeout=write_timeout)
        self.channel = SimpleNamespace(transport=transport, site=SimpleNamespace(limits=limits))

    def setHeader(self, name, value):
        self.headers[name] = value

    def registerProducer(self, producer, streaming):
        assert streaming
        self.producer = producer

    def unregisterProducer(self):
        self.producer = None

    def notifyFinish(self):
        return self._finish

    def write(self, data):
        assert not self.finished
        self.written += data

    def finish(self):
        self.finished = True
        self._finish.callback(None)

    def _abort(self):
        self.aborted = True
        self._finish.errback(ConnectionError("aborted"))

    def take(self) -> bytes:
        data, self.written = self.written, b""
        return data


def open_stream(write_timeout=60.0):
    clock, client, request = Clock(), Client(), Request(write_timeout)
    streams = JobEvents(clock, lambda: client, max_streams=10)
    stream = _Stream(streams, request, client, JOB_ID)
    streams.streams.add(stream)
    stream.start()
    assert request.take() == b"retry: 2000\n\n"
    assert request.headers[b"content-type"] == b"text/event-stream; charset=utf-8"
    return clock, client, request, streams, stream


def test_changes_only_then_the_end():
    clock, client, request, streams, stream = open_stream()
    assert client.calls[0][0] == "status"
    client.answer(current=0)
    assert request.take().startswith(b'event: progress\ndata: {"id":"' + JOB_ID.encode())
    # Then waits for a change, one after another, at most every MIN_INTERVAL.
    assert len(client.calls) == 1
    clock.advance(MIN_INTERVAL)
    wait = {
        "job_id": JOB_ID,
        "timeout": progress_stream.WAIT_TIMEOUT,
        "seen": seen_mark(job(current=0)),
    }
    assert client.calls[1][:2] == ("wait", wait)
    clock.advance(1)
    client.answer(current=0)
    assert request.take() == b""  # nothing changed: nothing sent
    # The answer came after MIN_INTERVAL: the next question goes at once.
    assert len(client.calls) == 3
    client.answer(current=1)
    assert b'"current":1' in request.take()
    clock.advance(MIN_INTERVAL)
    client.answer(state="succeeded", current=3)
    data = request.take()
    assert b'"state":"succeeded"' in data and b'"finished":true' in data
    assert request.finished and request.producer is None
    assert not streams.streams and len(client.calls) == 4
    assert not clock.getDelayedCalls()


def test_a_heartbeat_after_a_quiet_while():
    clock, client, request, _, stream = open_stream()
    client.answer()
    request.take()
    clock.advance(HEARTBEAT - 1)
    assert request.take() == b""
    clock.advance(1)
    assert request.take() == b": keep-alive\n\n"
    # An event puts the next heartbeat off.
    clock.advance(HEARTBEAT - 1)
    client.answer(current=2)
    assert b'"current":2' in request.take()
    clock.advance(HEARTBEAT - 1)
    assert len(client.calls) == 3
    assert request.take() == b""
    clock.advance(1)
    assert request.take() == b": keep-alive\n\n"
    stream.close()


def test_a_client_that_stops_reading_gets_the_end_only_and_is_cut():
    clock, client, request, streams, stream = open_stream(write_timeout=30)
    client.answer()
    request.take()
    stream.pauseProducing()
    clock.advance(MIN_INTERVAL)
    client.answer(current=1)
    assert request.take() == b""  # not queued while the client does not read
    clock.advance(MIN_INTERVAL)
    client.answer(current=2)
    clock.advance(MIN_INTERVAL)
    assert request.take() == b""
    # It reads again in time: no cut, and the latest state comes next.
    stream.resumeProducing()
    clock.advance(30)
    assert not request.aborted
    client.answer(current=2)
    assert b'"current":2' in request.take()
    # The final word is queued even while it does not read...
    stream.pauseProducing()
    clock.advance(MIN_INTERVAL)
    client.answer(state="succeeded", current=3)
    assert b'"state":"succeeded"' in request.take() and request.finished
    assert not streams.streams


def test_a_client_that_never_reads_again_is_cut_after_the_write_timeout():
    clock, client, request, streams, stream = open_stream(write_timeout=30)
    client.answer()
    stream.pauseProducing()
    for _ in range(119):
        clock.advance(MIN_INTERVAL)
        client.answer(current=1)
    assert not request.aborted
    clock.advance(MIN_INTERVAL)
    assert request.aborted and not streams.streams
    # It was resting between two questions: nothing more is asked.
    clock.advance(MIN_INTERVAL)
    assert len(client.calls) == 120
    assert not clock.getDelayedCalls()


def test_an_unreachable_service_then_an_unknown_job():
    clock, client, request, streams, stream = open_stream()
    client.fail(JobServiceUnavailable("the job service at unix:x could not be reached"))
    assert request.take().startswith(b'event: unavailable\ndata: {"error":"the job service')
    assert len(client.calls) == 1
    clock.advance(progress_stream._UNAVAILABLE_DELAY)
    assert client.calls[1][0] == "status"
    client.fail(UnknownJob(f"no job {JOB_ID}"))
    assert (
        request.take() == b'event: refused\ndata: {"error":"no job ' + JOB_ID.encode() + b'"}\n\n'
    )
    assert request.finished and not streams.streams


def test_a_client_that_goes_away_and_close_all():
    clock, client, request, streams, stream = open_stream()
    client.answer()
    clock.advance(MIN_INTERVAL)
    request._finish.errback(ConnectionError("gone"))
    assert stream.done and not streams.streams and not clock.getDelayedCalls()
    client.answer(current=1)  # the wait in flight: nothing written, nothing asked
    assert request.take().count(b"event:") == 1 and len(client.calls) == 2

    clock, client, request, streams, stream = open_stream()
    client.answer()
    clock.advance(MIN_INTERVAL)
    streams.close_all()
    assert request.finished and not streams.streams
    client.answer(current=1)
    assert len(client.calls) == 2 and not clock.getDelayedCalls()
