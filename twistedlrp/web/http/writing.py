"""
The write side of an HTTP connection (L{WriteFlow}), on Twisted's producer
API: the connection is its transport's producer, so the transport pauses it
when its buffer holds more than it can send (a client that reads slowly or
not at all) and resumes it once that is sent. A response's own producer (a
file, a stream) registers with the connection, which passes pauses and
resumes on.

C{--write-timeout}: a connection paused that long is cut, unless the peer
acknowledged a byte meanwhile (Linux says so, in C{TCP_INFO}): a client
that reads slowly is not cut, one that reads nothing is.
"""

from __future__ import annotations

import socket
import struct
import sys

from twisted.internet.interfaces import IPushProducer, ISystemHandle
from zope.interface import implementer

from twistedlrp.ordered_service import cancel_call
from twistedlrp.web.limits import UNSENT_LOWAT

# Looks at a paused connection per write timeout: the peer's
# acknowledgements are seen within a quarter of it.
STALL_CHECKS = 4
_TCP_INFO = getattr(socket, "TCP_INFO", None) if sys.platform.startswith("linux") else None
# Where Linux's struct tcp_info holds tcpi_bytes_acked (since Linux 4.1).
_BYTES_ACKED_AT = 120


def bytes_acked(sock) -> int | None:
    """
    @return: the bytes the peer of the TCP socket C{sock} has acknowledged
        so far, or C{None} where the system does not say (not Linux, not TCP).
    """
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
    """
    The producer half of L{twistedlrp.web.http.protocol.HTTPConnection}.

    @ivar producer: the response's producer, if one is registered.
    @ivar write_deadline: whether a client that reads nothing is cut.
    """

    producer = None
    write_deadline = False
    # Registered on the transport as a pull producer (for a pull producer).
    _pull = False
    # Reactor time since which the transport has been paused (or, in pull
    # mode, has not asked for more), without progress since.
    _blocked_since: float | None = None
    _acked: int | None = None
    _flow_call = None
    _socket = None
    # The connection's socket while nothing waits in the transport's buffer:
    # then a response goes out at once, not on the reactor's next turn (Twisted
    # writes later, twisted/twisted#5303), which saves a loop and two epoll_ctl
    # calls per response. None under TLS, and from the first send the socket
    # does not take whole: from then on the transport sends, in order.
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
        # The socket itself; under TLS, the wrapper passes the attribute on
        # to the TCP transport (its getHandle() is not a socket).
        sock = getattr(self.transport, "socket", None)
        self._socket = sock
        # The kernel keeps at most UNSENT_LOWAT bytes that the peer's window
        # does not let out yet (by default, megabytes on loopback), so the
        # transport pauses soon after the client stops reading.
        lowat = getattr(socket, "TCP_NOTSENT_LOWAT", None)
        if lowat is not None and getattr(sock, "family", None) in (socket.AF_INET, socket.AF_INET6):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, lowat, UNSENT_LOWAT)
            except OSError:
                pass

    def _blocked(self) -> None:
        if self._blocked_since is not None:
            return
        self._blocked_since = self.reactor.seconds()
        self._acked = bytes_acked(self._socket)
        timeout = self.limits.write_timeout
        if timeout and self._flow_call is None:
            # One call per connection at most: it finds out when it fires.
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

    def send(self, data: bytes) -> None:
        """Write C{data} to the connection: at once if nothing waits before it."""
        sock = self._direct
        if sock is not None:
            try:
                sent = sock.send(data)
            except OSError:  # the transport meets the error again, and reports it
                sent = 0
            if sent == len(data):
                return
            self._direct = None
            data = data[sent:]
        self.transport.write(data)

    def send_pieces(self, pieces) -> None:
        """L{send} for pieces too large to be joined into one string."""
        sock = self._direct
        if sock is not None:
            try:
                sent = sock.sendmsg(pieces)
            except OSError:
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

    # -- IPushProducer, for the transport -----------------------------------

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

    # -- the response's producer --------------------------------------------

    def register_producer(self, producer, streaming: bool) -> None:
        """Pass the transport's flow control on to C{producer} (L{Request.registerProducer})."""
        self.producer = producer
        if not streaming:
            # The transport asks a pull producer for more each time it has
            # sent everything (and starts it now).
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
        """
        Close the connection once what is buffered is sent; a client that
        does not take it within the write timeout is cut.
        """
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
