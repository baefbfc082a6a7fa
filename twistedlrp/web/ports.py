"""
The server's listening ports, including sockets adopted from another
process, and the transport of their connections (L{keep_write_deadlines}).

A socket that another process bound (systemd, or the C{--reload}
supervisor, which passes its sockets to each server as C{systemd:}
endpoints) belongs to that process, and outlives every port that adopts it:
a UNIX one is adopted with L{AdoptedUNIXPort}, which keeps its path and mode.
"""

from __future__ import annotations

import os
import socket
import struct
import sys

from twisted.internet import defer, error, fdesc, protocol, tcp, unix
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.endpoints import AdoptedStreamServerEndpoint, serverFromString
from twisted.internet.interfaces import IListeningPort

from twistedlrp import compat
from twistedlrp.web.limits import UNSENT_LOWAT

__all__ = ["AdoptedUNIXPort", "adopt", "keep_write_deadlines", "listen", "socket_transport"]


class AdoptedUNIXPort(compat.AdoptedUNIX, unix.Port):
    """A UNIX port on a socket another process bound: it keeps the socket's path and mode."""


class _SharedTCPPort(compat.OneAcceptPerTurn, tcp.Port):
    pass


class _SharedUNIXPort(compat.OneAcceptPerTurn, AdoptedUNIXPort):
    pass


def adopt(reactor, fd: int, family: int, factory, shared: bool = False) -> IListeningPort:
    """
    Listen on a duplicate of C{fd}, a listening stream socket of address
    family C{family}: a UNIX socket with L{AdoptedUNIXPort}, any other with
    C{reactor.adoptStreamPort}. The caller keeps C{fd}.

    @param shared: other processes accept on the same socket at the same
        time: take one connection per turn (L{compat.OneAcceptPerTurn}).
    @return: the port, listening.
    @raise OSError: C{fd} is not a socket.
    @raise twisted.internet.error.UnsupportedAddressFamily: the reactor
        cannot adopt a C{family} socket.
    """
    if family == socket.AF_UNIX:
        return (_SharedUNIXPort if shared else AdoptedUNIXPort).adopt(reactor, fd, factory)
    if not shared:
        return reactor.adoptStreamPort(fd, family, factory)
    if family not in (socket.AF_INET, socket.AF_INET6):
        raise error.UnsupportedAddressFamily(family)
    return compat.adopt_port(_SharedTCPPort, reactor, fd, family, factory)


def listen(reactor, endpoint: str, factory) -> defer.Deferred[IListeningPort]:
    """
    Listen on C{endpoint}, a Twisted server endpoint description, as
    C{serverFromString(reactor, endpoint).listen(factory)} does, except that
    an inherited UNIX socket (C{systemd:domain=UNIX:index=N} or
    C{:name=NAME}) is adopted with L{AdoptedUNIXPort}.

    @return: a Deferred that fires with the listening port, or fails with
        the reason it cannot listen (a bad description, an index or name
        that was not inherited, an address in use, ...).
    """
    try:
        server = serverFromString(reactor, endpoint)
    except Exception:
        return defer.fail()
    # Twisted's systemd parser resolves the index or name to a descriptor.
    # Reading LISTEN_FDS again here would find nothing: ListenFDs removes it
    # from the environment when twisted.internet.endpoints is imported.
    if isinstance(server, AdoptedStreamServerEndpoint) and server.addressFamily == socket.AF_UNIX:
        return defer.execute(_adopt_inherited, server, factory)
    return server.listen(factory)


def _adopt_inherited(server: AdoptedStreamServerEndpoint, factory) -> AdoptedUNIXPort:
    # As AdoptedStreamServerEndpoint.listen does: the port has a duplicate,
    # and the inherited descriptor is closed.
    fdesc.setNonBlocking(server.fileno)
    port = AdoptedUNIXPort.adopt(server.reactor, server.fileno, factory)
    os.close(server.fileno)
    return port


# -- the connections' transport ---------------------------------------------


# Looks at a connection whose bytes wait, per write timeout: the peer's
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
    if _TCP_INFO is None:
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, _BYTES_ACKED_AT + 8)
    except OSError:
        return None
    if len(info) < _BYTES_ACKED_AT + 8:
        return None
    return struct.unpack_from("=Q", info, _BYTES_ACKED_AT)[0]


class _WatchedWrites:
    """
    A connection's transport that keeps a write deadline (L{watch_writes}):
    while bytes wait in Twisted's buffer, the peer must make progress within
    C{timeout} seconds, else C{on_stalled} is called. Progress is a byte
    that goes out to the kernel or, on Linux, a byte the peer acknowledges
    (it takes data from the kernel's buffer: a client that reads slowly is
    not cut).

    @ivar waiting_since: the reactor time since which bytes have waited to
        go out without progress (the write that found nothing waiting, or
        the last progress seen), if the deadline is kept.
    """

    _write_timeout = 0.0
    _on_stalled = None
    _stall_call = None
    # The bytes the peer had acknowledged at the last look (Linux).
    _acked: int | None = None
    waiting_since: float | None = None

    def watch_writes(self, timeout: float, on_stalled) -> None:
        """
        Call C{on_stalled()} once bytes have waited C{timeout} seconds (0:
        never) to go out without one going out.
        """
        self._write_timeout = timeout
        self._on_stalled = on_stalled
        # The kernel keeps at most UNSENT_LOWAT bytes that the peer's window
        # does not let out yet (by default, megabytes on loopback), so a
        # send stops taking data soon after the client stops reading.
        lowat = getattr(socket, "TCP_NOTSENT_LOWAT", None)
        if lowat is not None and self.socket.family in (socket.AF_INET, socket.AF_INET6):
            try:
                self.socket.setsockopt(socket.IPPROTO_TCP, lowat, UNSENT_LOWAT)
            except OSError:
                pass

    def _waiting(self) -> bool:
        return compat.buffered(self) > 0

    def _begin_wait(self, waiting_before: bool) -> None:
        # After a write: if nothing waited before it, its bytes wait from now.
        if not waiting_before and self._waiting():
            self.waiting_since = self.reactor.seconds()
            if self._stall_call is None:
                # One call per connection at most, never cancelled while the
                # connection lives: it finds out when it fires.
                self._stall_call = self.reactor.callLater(
                    self._write_timeout / STALL_CHECKS, self._check_stall
                )

    def _check_stall(self) -> None:
        self._stall_call = None
        if not self.connected or not self._waiting():
            self.waiting_since = None
            return
        now = self.reactor.seconds()
        acked = bytes_acked(self.socket)
        if acked is not None:
            if self._acked is not None and acked != self._acked:
                self.waiting_since = now
            self._acked = acked
        left = self.waiting_since + self._write_timeout - now
        if left > 0:
            self._stall_call = self.reactor.callLater(
                min(left, self._write_timeout / STALL_CHECKS), self._check_stall
            )
        elif self._on_stalled is not None:
            self._on_stalled()

    def writeSomeData(self, data):
        sent = super().writeSomeData(data)
        if self._write_timeout and isinstance(sent, int) and sent > 0:
            self.waiting_since = self.reactor.seconds()
        return sent

    def connectionLost(self, reason):
        if self._stall_call is not None and self._stall_call.active():
            self._stall_call.cancel()
        self._stall_call = self._on_stalled = None
        return super().connectionLost(reason)

    def write(self, data):
        if not self._write_timeout:
            return super().write(data)
        waiting = self._waiting()
        super().write(data)
        self._begin_wait(waiting)

    def writeSequence(self, iovec):
        if not self._write_timeout:
            super().writeSequence(iovec)
        else:
            waiting = self._waiting()
            super().writeSequence(iovec)
            self._begin_wait(waiting)


class _WatchedTCPServer(_WatchedWrites, tcp.Server):
    pass


class _WatchedUNIXServer(_WatchedWrites, unix.Server):
    pass


_WATCHED = {tcp.Server: _WatchedTCPServer, unix.Server: _WatchedUNIXServer}


def socket_transport(transport):
    """
    @return: the transport that owns the socket under C{transport} (itself,
        or the TCP transport under TLS), or C{None}.
    """
    while getattr(transport, "socket", None) is None and getattr(transport, "transport", None):
        transport = transport.transport
    return transport if getattr(transport, "socket", None) is not None else None


def keep_write_deadlines(port) -> None:
    """
    Give the connections that C{port} accepts from now on a transport that
    can keep a write deadline (a TCP or UNIX port; others are left as they are).
    """
    watched = _WATCHED.get(getattr(port, "transport", None))
    if watched is not None:
        compat.set_connection_class(port, watched)


# -- sockets held for other processes ---------------------------------------


# Endpoint types whose sockets can be bound once and passed on to other
# processes. Others (ssl:, ...) must be given to each as they are.
ADOPTABLE = {"tcp", "tcp6", "unix"}


def adoptable(endpoint: str) -> bool:
    """@return: whether the supervisor can bind C{endpoint} and pass it on."""
    return endpoint.split(":", 1)[0].strip().lower() in ADOPTABLE


class _Held(protocol.Factory):
    """The factory of a port held open (bound, listening) but never accepted on."""

    noisy = False

    def logPrefix(self):
        return "socket held for the server processes"

    def buildProtocol(self, addr):
        return None


class ListeningSocket:
    """
    A socket bound for other processes to adopt (the reload supervisor's
    servers, the web processes of C{--web-workers}): its C{domain}
    (C{"INET"}, C{"INET6"} or C{"UNIX"}, as a C{systemd:} endpoint names it)
    and the C{address} to show.
    """

    def __init__(self, endpoint: str, port):
        self.endpoint = endpoint
        self.port = port
        host = port.getHost()
        if isinstance(host, IPv6Address):
            self.domain, self.address = "INET6", f"http://[{host.host}]:{host.port}/"
        elif isinstance(host, IPv4Address):
            self.domain, self.address = "INET", f"http://{host.host}:{host.port}/"
        elif isinstance(host, UNIXAddress):
            name = host.name.decode() if isinstance(host.name, bytes) else host.name
            self.domain, self.address = "UNIX", f"unix:{name}"
        else:
            raise ValueError(f"cannot pass on a {type(host).__name__} socket")

    def fileno(self) -> int:
        return self.port.fileno()

    def close(self) -> defer.Deferred:
        return defer.maybeDeferred(self.port.stopListening)


def bind(reactor, endpoint: str) -> ListeningSocket:
    """
    Bind and listen on C{endpoint} at once, without accepting.

    @return: the bound socket.
    @raise Exception: it cannot listen (the endpoint's own error), or the
        endpoint does not listen synchronously.
    """
    results = []
    serverFromString(reactor, endpoint).listen(_Held()).addBoth(results.append)
    if not results:
        raise RuntimeError("the endpoint did not listen at once")
    if not hasattr(results[0], "getHost"):
        results[0].raiseException()
    port = results[0]
    # The socket stays bound and listening; connections wait in its backlog
    # until a server accepts them.
    port.stopReading()
    return ListeningSocket(endpoint, port)
