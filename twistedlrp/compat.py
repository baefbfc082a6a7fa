"""
Every use twistedlrp makes of a private attribute of Twisted, Django or
nanodjango, and nowhere else: each has no public API that does the same (its
comment names the upstream ticket filed or to file) and a test in
C{tests/unit/test_compat_*.py} that fails loudly when a release changes it.
"""

# -- Twisted: listening ports and transports -----------------------------
# Importing these imports neither twisted.web nor a port module.

import os
import stat


class AdoptedUNIX:
    """
    The mixin of a C{unix.Port} on a socket another process bound: unlike
    C{adoptStreamPort}'s, it keeps the path's mode (not 0666), and when it
    stops it neither shuts the socket down nor removes the path.
    """

    # To file: "adoptStreamPort(AF_UNIX) chmods, shuts down and unlinks a
    # socket it did not bind" (its TCP port already skips the shutdown).
    _shouldShutdown = False

    @classmethod
    def adopt(cls, reactor, fd: int, factory):
        """@return: a port of this class listening on a duplicate of C{fd} (L{adopt_port})."""
        return adopt_port(cls, reactor, fd, None, factory)

    def startListening(self):
        try:
            self.mode = stat.S_IMODE(os.stat(self._bindPath).st_mode)
        except (OSError, TypeError, ValueError):
            pass  # Unnamed or abstract: Twisted does not chmod those.
        super().startListening()

    def connectionLost(self, reason):
        from twisted.internet import tcp

        # Not unix.Port's, which removes the path (and a lock file, which
        # only wantPID makes).
        tcp.Port.connectionLost(self, reason)


def adopt_port(port_class, reactor, fd: int, family: int | None, factory):
    """
    Listen on a duplicate of C{fd} with a C{port_class} port (a C{tcp.Port}
    given the address C{family}, a C{unix.Port} given C{None}).

    @return: the port, listening.
    @raise OSError: C{fd} is not a socket.
    @raise twisted.internet.error.CannotListenError: it cannot listen.
    """
    # To file: "adoptStreamPort cannot be given the port class to use".
    args = (reactor, fd, factory) if family is None else (reactor, fd, family, factory)
    port = port_class._fromListeningDescriptor(*args)
    port.startListening()
    return port


class OneAcceptPerTurn:
    """A port mixin that accepts one connection per turn, so that processes share a burst."""

    # To file: "a public bound on the accepts of one doRead" (this counter
    # is undocumented, and doRead resets it).
    def doRead(self):
        self.numberAccepts = 1
        return super().doRead()


# -- Twisted: AMP, Perspective Broker and transports -----------------------


class BrokerCallTargets:
    """A C{pb.Broker} mixin: the target of each remote call passes through L{call_target}."""

    def call_target(self, target):
        return target

    def _recvMessage(self, findObjMethod, requestID, objectID, message, *rest):
        # To file: "pb.Broker: a public hook on the object a remote call is
        # sent to" (an avatar's perspective_* methods see the call too late
        # to refuse it before Banana decoded its arguments).
        def find(objectID):
            target = findObjMethod(objectID)
            return None if target is None else self.call_target(target)

        return super()._recvMessage(find, requestID, objectID, message, *rest)


# -- Twisted: the reactor, in a forked process -----------------------------
#
# A web process forked from the web template inherits a reactor that setting
# Django up imported (installed) but never ran: its epoll or poll object and
# its waker's pipe are shared with the template and every other fork. Twisted
# has no public way to give a reactor new ones after a fork (to file: "a
# reactor installed before os.fork() cannot be used in the child; offer a
# public reset, as asyncio's event loop policies and gevent's reinit do").
# Each attribute read or written here has a test in
# tests/unit/test_compat_fork.py.

_RENEWABLE_REACTORS = ("EPollReactor", "PollReactor", "SelectReactor")


def reactor_renewable(reactor) -> bool:
    """
    @return: whether a forked process can renew C{reactor} (L{renew_forked_reactor}):
        an epoll, poll or select reactor that never ran, watching only its waker.
    """
    if type(reactor).__name__ not in _RENEWABLE_REACTORS:
        return False
    # _started, _startedBefore: set by startRunning, never reset by a stop.
    if reactor.running or reactor._started or reactor._startedBefore:
        return False
    waker = reactor.waker
    return set(reactor.getReaders()) <= {waker} and not reactor.getWriters()


def renew_forked_reactor() -> None:
    """In a forked process, give the inherited reactor (if any) a poller and waker of its own."""
    import select
    import sys

    reactor = sys.modules.get("twisted.internet.reactor")
    if reactor is None:
        return
    kind = type(reactor).__name__
    if kind == "EPollReactor":
        old, reactor._poller = reactor._poller, select.epoll(1024)
        old.close()  # our descriptor only: the epoll instance lives on elsewhere
    elif kind == "PollReactor":
        reactor._poller = select.poll()
    reactor._reads.clear()
    reactor._writes.clear()
    if kind != "SelectReactor":
        reactor._selectables.clear()
    waker = reactor.waker
    if waker is not None:
        reactor._internalReaders.discard(waker)
        waker.connectionLost(None)  # closes the inherited pipe's ends
        reactor.waker = None
    reactor.installWaker()


# -- Django ------------------------------------------------------------------


def take_connection_errors(connection) -> bool:
    """@return: whether a database error was raised on C{connection} since the last call."""
    # Django sets this flag for close_if_unusable_or_obsolete(), which also
    # closes a connection older than CONN_MAX_AGE (the store keeps its own
    # whatever that setting says). To file: "a public way to know that a
    # connection saw an error, without the CONN_MAX_AGE check".
    errors, connection.errors_occurred = connection.errors_occurred, False
    return errors


# -- nanodjango ----------------------------------------------------------------


def prepare_nanodjango(app) -> None:
    """Have the nanodjango C{app} add its URLs, as its C{wsgi} does at the first request."""
    # The public wsgi property would do it too, but also turns DEBUG off
    # and collects static files. To file (nanodjango): "a public prepare()
    # for servers that serve Django's handler themselves".
    app._prepare()
