"""
The write deadline of a connection's transport (web/ports.py) on a fake
clock: bytes that cannot go out are cut --write-timeout after the last
progress (a byte sent, or on Linux a byte the peer acknowledged), counted
from the write that could not go out; and the share of the pool that
streaming responses may take (web/limits.py StreamSlots).
"""

import struct
import sys
import threading

import pytest
from twisted.internet.task import Clock

from twistedlrp.options import Options
from twistedlrp.web import ports
from twistedlrp.web.limits import Limits, StreamSlots, default_stream_threads

TIMEOUT = 10.0


class FakeSocket:
    """What the deadline reads of a socket: the bytes its peer acknowledged."""

    family = None  # neither TCP family: no TCP_NOTSENT_LOWAT

    def __init__(self):
        self.acked = 0

    def getsockopt(self, level, option, size):
        return bytes(120) + struct.pack("=Q", self.acked)


class FakeDescriptor:
    """The parts of Twisted's FileDescriptor the deadline uses; C{accept} bytes go out per send."""

    SEND_LIMIT = 128 * 1024
    TLS = False
    disconnecting = False
    _writeDisconnected = False

    def __init__(self, clock):
        self.reactor = clock
        self.socket = FakeSocket()
        self.connected = True
        self.dataBuffer = b""
        self.offset = 0
        self._tempDataBuffer = []
        self._tempDataLen = 0
        self.accept = 0

    def write(self, data):
        self._tempDataBuffer.append(data)
        self._tempDataLen += len(data)

    def writeSequence(self, iovec):
        for data in iovec:
            self.write(data)

    def writeSomeData(self, data):
        return min(len(data), self.accept)

    def doWrite(self):
        """A turn of the reactor with the socket writable (as FileDescriptor.doWrite)."""
        self.dataBuffer = bytes(self.dataBuffer[self.offset :]) + b"".join(self._tempDataBuffer)
        self.offset = 0
        self._tempDataBuffer, self._tempDataLen = [], 0
        self.offset += self.writeSomeData(self.dataBuffer)
        if self.offset == len(self.dataBuffer):
            self.dataBuffer, self.offset = b"", 0

    def connectionLost(self, reason):
        self.connected = False


class Transport(ports._WatchedWrites, FakeDescriptor):
    pass


def watched(timeout=TIMEOUT):
    clock = Clock()
    transport = Transport(clock)
    stalls = []
    transport.watch_writes(timeout, lambda: stalls.append(clock.seconds()))
    return clock, transport, stalls


def test_bytes_that_cannot_go_out_are_cut_at_the_timeout_from_the_write():
    clock, transport, stalls = watched()
    clock.advance(3)
    transport.write(b"x" * 1000)
    transport.doWrite()  # the socket takes nothing
    clock.advance(TIMEOUT - 0.01)
    assert stalls == []
    clock.advance(0.01)
    assert stalls == [3 + TIMEOUT]


def test_each_byte_that_goes_out_restarts_the_count():
    clock, transport, stalls = watched()
    transport.write(b"x" * 1000)
    transport.doWrite()
    clock.advance(6)
    transport.accept = 10
    transport.doWrite()  # some progress at 6
    transport.accept = 0
    clock.advance(TIMEOUT - 0.01)
    assert stalls == []
    clock.advance(0.01)
    assert stalls == [6 + TIMEOUT]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="acknowledgements: Linux")
def test_bytes_the_peer_acknowledges_are_progress():
    # A client that reads slowly: the kernel's buffer drains, Twisted's does not.
    clock, transport, stalls = watched()
    transport.write(b"x" * 1000)
    transport.doWrite()
    for _ in range(8):
        clock.advance(TIMEOUT / 2)
        transport.socket.acked += 100
    assert stalls == []
    last_ack = clock.seconds()
    # Small steps: Clock runs every call that falls due at the step's end time.
    for _ in range(int((TIMEOUT + TIMEOUT / ports.STALL_CHECKS) / 0.5)):
        clock.advance(0.5)
    assert len(stalls) == 1
    # Seen at most a quarter of the timeout late.
    assert last_ack + TIMEOUT <= stalls[0] <= last_ack + TIMEOUT * 1.25


def test_bytes_that_go_out_at_once_start_no_deadline():
    clock, transport, stalls = watched()
    transport.accept = 10**9
    for _ in range(100):
        transport.write(b"response")
        transport.doWrite()
        clock.advance(1)
    clock.advance(10 * TIMEOUT)
    assert stalls == []
    # The one check that was made found nothing waiting, and made no other.
    assert clock.getDelayedCalls() == []


def test_no_timeout_no_deadline():
    clock, transport, stalls = watched(timeout=0)
    transport.write(b"x")
    transport.doWrite()
    assert clock.getDelayedCalls() == []


def test_a_lost_connection_stops_the_deadline():
    clock, transport, stalls = watched()
    transport.write(b"x")
    transport.doWrite()
    transport.connectionLost(None)
    clock.advance(2 * TIMEOUT)
    assert stalls == []
    assert clock.getDelayedCalls() == []


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
