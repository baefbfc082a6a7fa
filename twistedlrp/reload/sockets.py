"""
The listening sockets the reload supervisor holds.

The supervisor binds each C{--listen} socket once and keeps it bound and
listening, but never accepts on it: connections wait in the kernel's backlog
until a server (or the supervisor's error page) adopts the socket and
accepts them. Each server gets the sockets as file descriptors 3, 4, ...
and adopts them through C{systemd:} endpoints. The sockets themselves are
L{twistedlrp.web.ports}' (the web processes of C{--web-workers} hold them
the same way).
"""

from twistedlrp.web.ports import ADOPTABLE, ListeningSocket, adoptable, bind

__all__ = ["ADOPTABLE", "ListeningSocket", "adoptable", "bind"]
