"""
One web process of C{--web-workers}, seen from the main process (L{Slot}),
the listening sockets they share, and their output.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

from twisted.internet import defer, fdesc
from twisted.internet.endpoints import AdoptedStreamServerEndpoint, serverFromString

from twistedlrp.ordered_service import Waiters
from twistedlrp.process.channel import Channel
from twistedlrp.process.exits import Exit
from twistedlrp.process.forkserver import ForkServerProcess
from twistedlrp.process.supervise import restart_backoff
from twistedlrp.web import ports


def how_ended(code, signal_number) -> str:
    """@return: C{"exit code 3"}, C{"signal SIGKILL"}."""
    return Exit(code, signal_number).status()


class Slot:
    """One web process: its index, pid, state and last status."""

    def __init__(self, index: int):
        self.index = index
        self.pid: int | None = None
        # starting, running, stopping, waiting (to be restarted), ended
        self.state = "starting"
        self.status: dict = {}
        self.channel: Channel | None = None
        self.started_at = 0.0
        self.backoff = restart_backoff()
        self.restarts = 0
        # The template asked to fork it (until it says it did), and the one that did.
        self.pending_fork: ForkServerProcess | None = None
        self.parent: ForkServerProcess | None = None
        self.restart_call = None
        self.first_run = defer.Deferred()
        self.ended = Waiters()

    def when_ended(self) -> defer.Deferred:
        if self.state == "ended" or self.pid is None:
            return defer.succeed(None)
        return self.ended.wait()

    def start(self, template: ForkServerProcess, channel: Channel) -> None:
        """Its web process is asked of C{template}, and will report on C{channel}."""
        self.state, self.status, self.pid, self.parent = "starting", {}, None, None
        self.channel, self.pending_fork = channel, template

    def forked(self, template: ForkServerProcess, pid: int, now: float) -> None:
        self.pending_fork, self.parent, self.pid, self.started_at = None, template, pid, now

    def not_forked(self) -> None:
        """The template asked died first: the next one forks it."""
        self.pending_fork = None
        if self.channel is not None:
            self.channel.close()
        self.channel = None
        if self.state != "ended":
            self.state = "waiting"

    def received(self, message: dict) -> bool:
        """Its status came: @return: whether it runs now, and did not before."""
        self.status = message
        if message.get("state") == "running" and self.state == "starting":
            self.state = "running"
            return True
        if message.get("state") == "stopping" and self.state == "running":
            self.state = "stopping"
        return False

    def describe(self, now: float) -> dict:
        body = {"index": self.index, "pid": self.pid, "state": self.state}
        body.update((key, self.status[key]) for key in ("threads", "waiting") if key in self.status)
        body["restarts"] = self.restarts
        if self.pid is not None and self.state != "ended":
            body["uptime"] = round(now - self.started_at, 3)
        return body


def pass_on(fd: int, data: bytes) -> None:
    """Write the template's output C{data} to our descriptor C{fd} (1 or 2)."""
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view) :]
        except OSError:
            return  # Nowhere to write it: it stays in the tail.


def listening_socket(reactor, endpoint: str) -> tuple[int, int, str, Callable]:
    """Bind C{endpoint}: @return: its descriptor, family, address in words, and its closer."""
    server = serverFromString(reactor, endpoint)
    if not isinstance(server, AdoptedStreamServerEndpoint):
        held = ports.bind(reactor, endpoint)
        return held.fileno(), held.port.socket.family, held.address, held.close
    fd, family = server.fileno, server.addressFamily
    fdesc.setNonBlocking(fd)
    with socket.socket(fileno=os.dup(fd)) as sock:
        name = sock.getsockname()
    if family == socket.AF_UNIX:
        address = f"unix:{name.decode() if isinstance(name, bytes) else name}"
    else:
        address = f"http://{name[0]}:{name[1]}/"
    return fd, family, address, lambda: os.close(fd)
