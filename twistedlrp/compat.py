"""
Every use twistedlrp makes of a private attribute of Twisted or Django, in
one place.

Each has no public API that does the same (the comment at each names the
upstream ticket filed or to file), and each has a test in
C{tests/unit/test_compat_*.py} that fails loudly, naming the internal, when
a new release of Twisted or Django changes it. Nothing else in twistedlrp
touches a private attribute of an object it did not define.
"""

# -- Twisted: listening ports and HTTP -----------------------------------
# Mixins and functions: importing this module imports neither twisted.web nor
# a port module (a job worker imports no Twisted, a job node no web module).

import os
import stat


class AdoptedUNIX:
    """
    The mixin of a C{unix.Port} on a socket that another process bound
    (systemd, the C{--reload} supervisor): unlike C{reactor.adoptStreamPort}'s
    port, it leaves the path's mode as its owner chose (not 0666), and when
    it stops it neither shuts the socket down (which stops it for every
    process) nor removes the path (which the next server needs).
    """

    # To file: "adoptStreamPort(AF_UNIX) chmods, shuts down and unlinks a
    # socket it did not bind" (TCP's adopted port already skips shutdown).
    _shouldShutdown = False

    @classmethod
    def adopt(cls, reactor, fd: int, factory):
        """
        Listen on a duplicate of C{fd}, a listening UNIX stream socket; the
        caller keeps C{fd}.

        @return: the port, listening.
        @raise OSError: C{fd} is not a socket.
        @raise twisted.internet.error.CannotListenError: it cannot listen.
        """
        return adopt_port(cls, reactor, fd, None, factory)

    def startListening(self):
        try:
            self.mode = stat.S_IMODE(os.stat(self._bindPath).st_mode)
        except (OSError, TypeError, ValueError):
            pass  # Unnamed or abstract: Twisted does not chmod those.
        super().startListening()

    def connectionLost(self, reason):
        from twisted.internet import tcp

        # Not unix.Port's, which removes the path. An adopted port never
        # holds a lock file (that needs wantPID).
        tcp.Port.connectionLost(self, reason)


def adopt_port(port_class, reactor, fd: int, family: int | None, factory):
    """
    Listen on a duplicate of C{fd} with a port of C{port_class} (a subclass
    of C{tcp.Port}, given the address C{family}, or of C{unix.Port}, given
    C{None}), as C{reactor.adoptStreamPort} does with Twisted's own classes.

    @return: the port, listening.
    @raise OSError: C{fd} is not a socket.
    """
    # To file: "adoptStreamPort cannot be given the port class to use".
    args = (reactor, fd, factory) if family is None else (reactor, fd, family, factory)
    port = port_class._fromListeningDescriptor(*args)
    port.startListening()
    return port


class OneAcceptPerTurn:
    """
    A port mixin that accepts one connection per turn of the reactor
    (Twisted accepts up to a hundred whenever the socket is readable), so
    that processes sharing a listening socket share a burst of connections.
    """

    # To file: "a public way to bound the accepts of one doRead" (Twisted
    # resets this public-looking but undocumented counter after each turn).
    def doRead(self):
        self.numberAccepts = 1
        return super().doRead()


def buffered(transport) -> int:
    """
    @return: the bytes a TCP or UNIX transport holds that have not been
        handed to the kernel yet (0 when it holds none).
    """
    # To file: "ITransport has no public count of buffered bytes" (see
    # twisted/twisted#12742 for how doWrite handles these buffers).
    return len(transport.dataBuffer) - transport.offset + transport._tempDataLen


def write_shut(transport) -> bool:
    """@return: whether the transport's write side is closed (loseWriteConnection)."""
    return bool(transport._writeDisconnected)


def set_connection_class(port, connection_class) -> None:
    """
    Make the connections that a TCP or UNIX C{port} accepts from now on
    instances of C{connection_class}, a subclass of the class it uses
    (C{tcp.Server} or C{unix.Server}).
    """
    # twisted/twisted#5303: a transport writes only on the reactor's next
    # turn; a subclass that can send at once has no public hook to plug in.
    port.transport = connection_class


class HTTPChannelHooks:
    """
    The mixin of a C{twisted.web.http.HTTPChannel} that gives public names
    to the internals the server's channel needs (issue 20 replaces the
    channel with a protocol of our own).
    """

    def answer_bad_request(self) -> None:
        """Answer a request twisted.web cannot parse (it writes a bare 400)."""
        super()._respondToBadRequestAndDisconnect()

    def _respondToBadRequestAndDisconnect(self):
        # twisted/twisted#8250: no hook to answer (and cut) a bad request.
        self.answer_bad_request()

    def may_continue(self) -> bool:
        """@return: whether to answer C{Expect: 100-continue} with 100."""
        return True

    def _send100Continue(self):
        # twisted/twisted#7544: the 100 is sent with no say of the server.
        if self.may_continue():
            super()._send100Continue()

    @property
    def partial_line(self) -> bytes:
        """The bytes after the last complete line received (line mode)."""
        return self._buffer

    @property
    def parsing(self) -> bool:
        """Whether LineReceiver's loop is on the stack (it re-enters with pipelined data)."""
        return bool(self._busyReceiving)

    @property
    def chunk_left(self) -> int:
        """Bytes left of the chunk of a chunked body being read, else 0."""
        # To file: "no public view of a chunked body's current chunk size".
        decoder = self._transferDecoder
        if getattr(decoder, "state", "") != "BODY":
            return 0
        return decoder.length


# -- Twisted: AMP and transports -------------------------------------------


# -- Twisted: the reactor, in a forked process -----------------------------


# -- Django ------------------------------------------------------------------


def take_connection_errors(connection) -> bool:
    """
    @return: whether a database error was raised on the Django C{connection}
        since the last call (the error may have left it unusable); the
        record is cleared.
    """
    # Django sets this flag for close_if_unusable_or_obsolete(), which also
    # closes a connection older than CONN_MAX_AGE (the store keeps its own
    # whatever that setting says). To file: "a public way to know that a
    # connection saw an error, without the CONN_MAX_AGE check".
    errors, connection.errors_occurred = connection.errors_occurred, False
    return errors
