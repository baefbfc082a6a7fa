"""
The write deadline of a connection (web/http/writing.py) on a fake clock: a
connection that its transport pauses is cut --write-timeout after the last
progress (a resume, or on Linux a byte the peer acknowledged), counted from
the pause; and the share of the pool that streaming responses may take
(web/limits.py StreamSlots).
"""

import struct
import sys
import threading

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from twistedlrp.options import Options
from twistedlrp.web.http import writing
from twistedlrp.web.limits import Limits, StreamSlots, default_stream_threads
from twistedlrp.web.site import LRPSite

TIMEOUT = 10.0


class FakeSocket:
    """What the deadline reads of a socket: the bytes its peer acknowledged."""

    family = None  # neither TCP family: no TCP_NOTSENT_LOWAT

    def __init__(self):
        self.acked = 0

    def getsockopt(self, level, option, size):
        return bytes(120) + struct.pack("=Q", self.acked)


class Transport(StringTransport):
    """A transport whose socket says what its peer acknowledged."""

    aborted = False

    def __init__(self):
        super().__init__(peerAddress=IPv4Address("TCP", "127.0.0.1", 5000))
        self.socket = FakeSocket()

    def abortConnection(self):
        self.aborted = True
        super().abortConnection()


class Holding(LRPSite):
    """Holds every request unanswered."""

    def handle(self, request):
        self.held = request


def watched(timeout=TIMEOUT):
    """@return: the clock, a connection answering a request, its transport, and its cuts."""
    clock = MemoryReactorClock()
    site = Holding(clock, limits=Limits(header_timeout=0, write_timeout=timeout))
    connection = site.buildProtocol(None)
    transport = Transport()
    connection.makeConnection(transport)
    connection.dataReceived(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
    stalls = []
    connection._write_stalled = lambda: stalls.append(clock.seconds())
    return clock, connection, transport, stalls


def _checks(clock, connection):
    return [c for c in clock.getDelayedCalls() if c.func == connection._check_flow]


def test_a_transport_paused_for_the_timeout_is_cut():
    clock, connection, transport, stalls = watched()
    assert transport.producer is connection and transport.streaming
    clock.advance(3)
    connection.pauseProducing()  # the transport's buffer is full
    clock.advance(TIMEOUT - 0.01)
    assert stalls == []
    clock.advance(0.01)
    assert stalls == [3 + TIMEOUT]


def test_each_resume_restarts_the_count():
    clock, connection, transport, stalls = watched()
    connection.pauseProducing()
    clock.advance(6)
    connection.resumeProducing()  # all that waited went out at 6
    connection.pauseProducing()
    clock.advance(TIMEOUT - 0.01)
    assert stalls == []
    clock.advance(0.01)
    assert stalls == [6 + TIMEOUT]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="acknowledgements: Linux")
def test_bytes_the_peer_acknowledges_are_progress():
    # A client that reads slowly: the kernel's buffer drains, Twisted's does not.
    clock, connection, transport, stalls = watched()
    connection.pauseProducing()
    for _ in range(8):
        clock.advance(TIMEOUT / 2)
        transport.socket.acked += 100
    assert stalls == []
    last_ack = clock.seconds()
    # Small steps: Clock runs every call that falls due at the step's end time.
    for _ in range(int((TIMEOUT + TIMEOUT / writing.STALL_CHECKS) / 0.5)):
        clock.advance(0.5)
    assert len(stalls) == 1
    # Seen at most a quarter of the timeout late.
    assert last_ack + TIMEOUT <= stalls[0] <= last_ack + TIMEOUT * 1.25


def test_a_connection_never_paused_starts_no_deadline():
    clock, connection, transport, stalls = watched()
    for _ in range(100):
        connection.request.write(b"response")
        clock.advance(1)
    assert _checks(clock, connection) == []
    clock.advance(10 * TIMEOUT)
    assert stalls == []


def test_no_timeout_no_deadline():
    clock, connection, transport, stalls = watched(timeout=0)
    connection.pauseProducing()
    assert _checks(clock, connection) == []
    clock.advance(10 * TIMEOUT)
    assert stalls == [] and not connection.write_deadline


def test_a_lost_connection_stops_the_deadline():
    clock, connection, transport, stalls = watched()
    connection.pauseProducing()
    connection.connectionLost(Failure(ConnectionError("gone")))
    clock.advance(2 * TIMEOUT)
    assert stalls == []
    assert _checks(clock, connection) == []


def test_pauses_and_resumes_pass_on_to_the_response_producer():
    clock, connection, transport, stalls = watched()
    events = []

    class Push:
        def pauseProducing(self):
            events.append("pause")

        def resumeProducing(self):
            events.append("resume")

        def stopProducing(self):
            events.append("stop")

    connection.pauseProducing()
    connection.request.registerProducer(Push(), True)  # paused already: paused at once
    connection.resumeProducing()
    connection.pauseProducing()
    clock.advance(TIMEOUT)
    assert stalls == [TIMEOUT]
    connection.connectionLost(Failure(ConnectionError("gone")))
    assert events == ["pause", "resume", "pause", "stop"]


def test_a_closing_connection_whose_client_reads_nothing_is_cut():
    clock, connection, transport, stalls = watched()
    connection.request.setHeader(b"connection", b"close")
    connection.request.finish()
    assert transport.disconnecting and transport.producer is None
    clock.advance(TIMEOUT)
    assert stalls == [TIMEOUT]


# -- the share of the pool that streams may take ------------------------------


def test_stream_slots_refuse_beyond_the_limit_and_count_refusals():
    slots = StreamSlots(2)
    assert slots.take() and slots.take()
    assert not slots.take()
    assert (slots.taken, slots.refused) == (2, 1)
    slots.give_back()
    assert slots.take()
    assert slots.should_warn() and not slots.should_warn()


def test_stream_slots_are_safe_across_threads():
    slots = StreamSlots(3)
    most = []
    lock = threading.Lock()

    def stream():
        for _ in range(2000):
            if slots.take():
                with lock:
                    most.append(slots.taken)
                slots.give_back()

    threads = [threading.Thread(target=stream) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert slots.taken == 0
    assert max(most) <= 3


def test_the_default_stream_threads_are_half_the_pool():
    assert [default_stream_threads(n) for n in (1, 2, 3, 8, 16)] == [1, 1, 1, 4, 8]
    options = Options()
    options.parseOptions(["--no-jobs", "--threads", "6"])
    assert Limits.from_options(options).stream_threads == 3
    options = Options()
    options.parseOptions(["--no-jobs", "--threads", "6", "--stream-threads", "5"])
    assert Limits.from_options(options).stream_threads == 5
