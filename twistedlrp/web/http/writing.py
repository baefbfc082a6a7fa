"""
The write side of an HTTP connection (L{WriteFlow}): the connection is its
transport's producer, and passes pauses and resumes on to a response's own
producer. C{--write-timeout}: a connection paused that long is cut, unless
the peer acknowledged a byte meanwhile (Linux's C{TCP_INFO} says so): a
client that reads slowly is not cut, one that reads nothing is.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import sys

from twisted.internet.interfaces import IPushProducer, ISystemHandle
from zope.interface import implementer

from twistedlrp.ordered_service import cancel_call
from twistedlrp.web.limits import UNSENT_LOWAT

# Looks at a paused connection per write timeout.
STALL_CHECKS = 4
_TCP_INFO = getattr(socket, "TCP_INFO", None) if sys.platform.startswith("linux") else None
# Where Linux's struct tcp_info holds tcpi_bytes_acked (since Linux 4.1).
_BYTES_ACKED_AT = 120


def bytes_acked(sock) -> int | None:
    """@return: the bytes the peer of the TCP socket C{sock} acknowledged, or C{None}: unknown."""
    if _TCP_INFO is None or sock is None:
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, _BYTES_ACKED_AT + 8)
    except OSError:
        return None
    if len(info) < _BYTES_ACKED_AT + 8:
        return None
    return struct.unpack_from("=Q", info, _BYTES_ACKED_AT)[0]


@implementer(IPushProducer)
class WriteFlow:
    """The producer half of an HTTP connection (C{write_deadline}: the write timeout is on)."""

    producer = None
    write_deadline = False
    _pull = False  # registered on the transport as a pull producer
    # Since when the transport has been paused (or has not pulled), without progress.
    _blocked_since: float | None = None
    _acked: int | None = None
    _flow_call = None
    _socket = None
    # The socket, sent to at once (Twisted writes on the next turn, twisted/twisted#5303:
    # a loop and two epoll_ctl calls per response); None under TLS, and from the first
    # send the socket does not take whole (then the transport sends all, in order).
    _direct = None

    def _start_flow(self) -> None:
        self.transport.registerProducer(self, True)
        if ISystemHandle.providedBy(self.transport):
            handle = self.transport.getHandle()
            if isinstance(handle, socket.socket):  # not TLS
                self._direct = handle
        if not self.limits.write_timeout:
            return
        self.write_deadline = True
        # Under TLS, the wrapper passes the attribute on to the TCP transport.
        self._socket = sock = getattr(self.transport, "socket", None)
        lowat = getattr(socket, "TCP_NOTSENT_LOWAT", None)
        if lowat is not None and getattr(sock, "family", None) in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, lowat, UNSENT_LOWAT)

    def _blocked(self) -> None:
        if self._blocked_since is not None:
            return
        self._blocked_since = self.reactor.seconds()
        self._acked = bytes_acked(self._socket)
        timeout = self.limits.write_timeout
        if timeout and self._flow_call is None:
            self._flow_call = self.reactor.callLater(timeout / STALL_CHECKS, self._check_flow)

    def _check_flow(self) -> None:
        self._flow_call = None
        if self._blocked_since is None or self.transport is None:
            return
        now = self.reactor.seconds()
        acked = bytes_acked(self._socket)
        if acked is not None and acked != self._acked:
            self._acked, self._blocked_since = acked, now
        timeout = self.limits.write_timeout
        left = self._blocked_since + timeout - now
        if left > 0:
            self._flow_call = self.reactor.callLater(
                min(left, timeout / STALL_CHECKS), self._check_flow
            )
        else:
            self._write_stalled()

    def send(self, *pieces: bytes) -> None:
        """Write C{pieces} (not joined: each may be large) at once if nothing waits before them."""
        sock = self._direct
        if sock is not None:
            try:
                sent = sock.sendmsg(pieces)
            except OSError:  # the transport meets the error again, and reports it
                sent = 0
            if sent == sum(map(len, pieces)):
                return
            self._direct = None
            rest = []
            for piece in pieces:
                if sent < len(piece):
                    rest.append(piece[sent:])
                sent = max(0, sent - len(piece))
            pieces = rest
        self.transport.writeSequence(pieces)

    def cut(self) -> None:
        """Abort the connection: what is not sent yet is dropped, and nothing more is sent."""
        self._direct = None
        self.transport.abortConnection()

    def pauseProducing(self) -> None:
        self._blocked()
        if self.producer is not None and not self._pull:
            self.producer.pauseProducing()

    def resumeProducing(self) -> None:
        self._blocked_since = None
        if self.producer is not None:
            if self._pull:
                # Until the transport asks again, what was written waits.
                self._blocked()
            self.producer.resumeProducing()

    def stopProducing(self) -> None:
        producer, self.producer = self.producer, None
        if producer is not None:
            producer.stopProducing()

    def register_producer(self, producer, streaming: bool) -> None:
        """Pass the transport's flow control on to C{producer} (L{Request.registerProducer})."""
        self.producer = producer
        if not streaming:
            # The transport asks a pull producer for more when it has sent all.
            self._pull = True
            self.transport.unregisterProducer()
            self.transport.registerProducer(self, False)
        elif self._blocked_since is not None:
            producer.pauseProducing()

    def unregister_producer(self) -> None:
        """The response's producer is done."""
        self.producer = None
        if self._pull:
            self._pull = False
            self._blocked_since = None
            if self.transport is not None and not self.closing:
                self.transport.unregisterProducer()
                self.transport.registerProducer(self, True)

    def _lose(self) -> None:
        """Close the connection once what is buffered is sent (or the write timeout cuts it)."""
        # A transport with a producer waits for it before it closes.
        self.transport.unregisterProducer()
        self._pull = False
        self.transport.loseConnection()
        if self.write_deadline:
            self._blocked()

    def _stop_flow(self) -> None:
        self._blocked_since = None
        cancel_call(self._flow_call)
        self._flow_call = None
        self.stopProducing()
