"""
The listening sockets the reload supervisor holds.

The supervisor binds each C{--listen} socket once and keeps it bound and
listening, but never accepts on it: connections wait in the kernel's backlog
until a server (or the supervisor's error page) adopts the socket and
accepts them. Each server gets the sockets as file descriptors 3, 4, ...
and adopts them through C{systemd:} endpoints.
"""

from __future__ import annotations

from twisted.internet import defer, protocol
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress

# Endpoint types whose sockets the supervisor binds and passes on. Others
# (ssl:, ...) are passed to each server as they are, and rebound by it.
ADOPTABLE = {"tcp", "tcp6", "unix"}


def adoptable(endpoint: str) -> bool:
    """@return: whether the supervisor can bind C{endpoint} and pass it on."""
    return endpoint.split(":", 1)[0].strip().lower() in ADOPTABLE


class _Held(protocol.Factory):
    """The factory of a port the supervisor holds but never reads."""

    noisy = False

    def logPrefix(self):
        return "lrp-reload: socket for the server"

    def buildProtocol(self, addr):
        return None


class ListeningSocket:
    """
    A socket the supervisor bound for the servers it runs: its C{domain}
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
    from twisted.internet.endpoints import serverFromString

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
