"""
The server's listening ports, including sockets adopted from another
process (systemd, the C{--reload} supervisor), which own them: a UNIX one
is adopted with L{AdoptedUNIXPort}, which keeps its path and mode.
"""

from __future__ import annotations

import os
import socket

from twisted.internet import defer, error, fdesc, protocol, tcp, unix
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.endpoints import AdoptedStreamServerEndpoint, serverFromString
from twisted.internet.interfaces import IListeningPort

from twistedlrp import compat


class AdoptedUNIXPort(compat.AdoptedUNIX, unix.Port):
    """A UNIX port on a socket another process bound: it keeps the socket's path and mode."""


class _SharedTCPPort(compat.OneAcceptPerTurn, tcp.Port):
    pass


class _SharedUNIXPort(compat.OneAcceptPerTurn, AdoptedUNIXPort):
    pass


def adopt(reactor, fd: int, family: int, factory, shared: bool = False) -> IListeningPort:
    """
    Listen on a duplicate of C{fd}, a listening socket of C{family}; C{shared}:
    other processes accept on it too, so take one connection per turn.
    @return: the port. @raise OSError: C{fd} is not a socket (or UnsupportedAddressFamily).
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
    Listen on C{endpoint} (an inherited UNIX socket with L{AdoptedUNIXPort}):
    @return: a Deferred firing with the port, or failing with why it cannot listen.
    """
    try:
        server = serverFromString(reactor, endpoint)
    except Exception:
        return defer.fail()
    # Twisted's systemd parser resolved the index or name (LISTEN_FDS is gone by now).
    if isinstance(server, AdoptedStreamServerEndpoint) and server.addressFamily == socket.AF_UNIX:
        return defer.execute(_adopt_inherited, server, factory)
    return server.listen(factory)


def _adopt_inherited(server: AdoptedStreamServerEndpoint, factory) -> AdoptedUNIXPort:
    # The port has a duplicate: the inherited descriptor is closed.
    fdesc.setNonBlocking(server.fileno)
    port = AdoptedUNIXPort.adopt(server.reactor, server.fileno, factory)
    os.close(server.fileno)
    return port


# Endpoint types whose sockets can be bound once and passed on (not ssl:, ...).
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
    """A socket bound for other processes to adopt; C{domain} as a C{systemd:} endpoint names it."""

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
    """Bind C{endpoint} now, not accepting: @return: the socket. @raise Exception: it cannot."""
    results = []
    serverFromString(reactor, endpoint).listen(_Held()).addBoth(results.append)
    if not results:
        raise RuntimeError("the endpoint did not listen at once")
    if not hasattr(results[0], "getHost"):
        results[0].raiseException()
    port = results[0]
    port.stopReading()  # connections wait in the backlog until a server accepts them
    return ListeningSocket(endpoint, port)
