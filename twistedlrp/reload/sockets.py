"""
Adopted UNIX sockets keep their path and mode.

The supervisor binds a UNIX socket once; each server adopts it in turn, and
the supervisor itself adopts it for its error page. Twisted's UNIX port
removes its path and shuts the socket down when it stops listening, and
sets its mode to 0666 when it starts: right for a socket it bound, wrong for
one it adopted, which the next server could not use.
"""

from __future__ import annotations

import os

_patched = False


def keep_unix_socket_paths() -> None:
    """
    A UNIX socket the supervisor bound is adopted by each server in turn, but
    Twisted's port removes its path when it stops listening, and sets its
    mode to 0666 when it starts: an adopted port here leaves both as the
    supervisor made them.
    """
    global _patched
    if _patched:
        return
    _patched = True
    from twisted.internet import tcp, unix

    adopt = unix.Port._fromListeningDescriptor.__func__
    stop = unix.Port.connectionLost

    def from_listening_descriptor(cls, reactor, fd, factory):
        port = adopt(cls, reactor, fd, factory)
        port._lrp_adopted = True
        # Unlike its TCP port, Twisted's UNIX port calls shutdown() on an
        # adopted socket when it stops, which stops it for every process.
        port._shouldShutdown = False
        try:
            port.mode = os.stat(port._bindPath).st_mode & 0o777
        except (OSError, TypeError):
            pass
        return port

    def connection_lost(self, reason):
        if not getattr(self, "_lrp_adopted", False):
            return stop(self, reason)
        if self.lockFile is not None:
            self.lockFile.unlock()
        return tcp.Port.connectionLost(self, reason)

    unix.Port._fromListeningDescriptor = classmethod(from_listening_descriptor)
    unix.Port.connectionLost = connection_lost
