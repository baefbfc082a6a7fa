"""
One web process of C{--web-workers}, seen from the main process: its
L{Slot} (pid, state, restart back-off, last status) and the template's
process protocol
(L{TemplateProcess}). L{twistedlrp.web.processes} runs them.
"""

from __future__ import annotations

import os
import socket
from typing import TYPE_CHECKING

from twisted.internet import defer, protocol

from twistedlrp.backoff import Backoff
from twistedlrp.process.channel import Channel, adopt
from twistedlrp.process.exits import Exit
from twistedlrp.services import Waiters

if TYPE_CHECKING:
    from twistedlrp.web.processes import WebProcesses

# Restarts of a process that keeps ending: one that ran RESET_AFTER s resets the back-off.
FIRST_DELAY = 0.5
MAX_DELAY = 30.0
RESET_AFTER = 10.0
# How much of the template's output is kept, to log when it ends.
OUTPUT_TAIL = 4000
# How long after the template ended its control socket may still be read.
CONTROL_GRACE = 2.0


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
        self.peer: socket.socket | None = None  # its channel end, until forked
        self.started_at = 0.0
        self.backoff = Backoff(FIRST_DELAY, MAX_DELAY)
        self.restarts = 0
        # The template asked to fork it (until it says it did), and the one that did.
        self.pending_fork: TemplateProcess | None = None
        self.parent: TemplateProcess | None = None
        self.restart_call = None
        self.first_run: defer.Deferred | None = defer.Deferred()
        self.ended = Waiters()

    def when_ended(self) -> defer.Deferred:
        if self.state == "ended" or self.pid is None:
            return defer.succeed(None)
        return self.ended.wait()

    def describe(self, now: float) -> dict:
        body = {"index": self.index, "pid": self.pid, "state": self.state}
        for key in ("threads", "waiting"):
            if key in self.status:
                body[key] = self.status[key]
        body["restarts"] = self.restarts
        if self.pid is not None and self.state != "ended":
            body["uptime"] = round(now - self.started_at, 3)
        return body


class TemplateProcess(protocol.ProcessProtocol):
    """
    The web process template, seen from the main process. C{state}:
    C{starting}, C{ready}, C{ended}.

    Its messages go to C{owner._template_said(template, message)}; its
    output is passed on to ours, line by line, and the last L{OUTPUT_TAIL}
    bytes are kept (L{output}). C{owner._template_ended(template, code,
    signal)} is called once, when the process has ended and its control
    socket was read to its end (what it reported before it died, a web
    process's exit, still counts), or L{CONTROL_GRACE} seconds after it
    ended, whichever is first.
    """

    def __init__(self, owner: WebProcesses, reactor):
        self.owner = owner
        self.reactor = reactor
        self.state = "starting"
        self.was_ready = False
        self.error: str | None = None  # why it could not set Django up
        self.pid: int | None = None
        self.started_at = reactor.seconds()
        self.control: Channel | None = None
        self.ended = defer.Deferred()
        self._exit: Exit | None = None
        self._partial: dict[int, bytes] = {}
        self._tail = bytearray()
        self._grace = None

    def attach(self, sock: socket.socket) -> None:
        """Read and write the control socket C{sock} (our end; it is closed)."""
        self.control = adopt(self.reactor, sock, Channel(self._said, self._control_lost))

    def send(self, message: dict, fd: int | None = None) -> bool:
        """@return: whether C{message} (with the descriptor C{fd}) was sent."""
        if self.control is None:
            return False
        return self.control.send(message, () if fd is None else (fd,))

    def close(self) -> None:
        """Close the control socket: the template ends once its web processes did."""
        if self.control is not None:
            self.control.close()

    def output(self) -> str:
        return bytes(self._tail).decode("utf-8", "replace").strip()

    def _said(self, message: dict) -> None:
        self.owner._template_said(self, message)

    def _control_lost(self, reason=None) -> None:
        self.control = None
        self._maybe_ended()

    def connectionMade(self):
        self.pid = self.transport.pid

    def childDataReceived(self, fd, data):
        self._tail += data
        del self._tail[:-OUTPUT_TAIL]
        lines, _, self._partial[fd] = (self._partial.get(fd, b"") + data).rpartition(b"\n")
        if lines:
            _pass_on(fd, lines + b"\n")

    def processEnded(self, reason):
        for fd, rest in self._partial.items():
            if rest:
                _pass_on(fd, rest + b"\n")
        self._partial.clear()
        self._exit = Exit.of(reason)
        if self.control is not None:
            self._grace = self.reactor.callLater(CONTROL_GRACE, self._give_up_control)
        self._maybe_ended()

    def _give_up_control(self) -> None:
        self._grace = None
        if self.control is not None and self.control.open:
            self.control.abort()  # connectionLost follows
        else:
            self._control_lost()

    def _maybe_ended(self) -> None:
        if self._exit is None or self.control is not None or self.state == "ended":
            return
        if self._grace is not None and self._grace.active():
            self._grace.cancel()
        self.state = "ended"
        self.owner._template_ended(self, self._exit)
        self.ended.callback(None)


def _pass_on(fd: int, data: bytes) -> None:
    """Write the template's output C{data} to our descriptor C{fd} (1 or 2)."""
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view) :]
        except InterruptedError:
            continue
        except OSError:
            return  # Nowhere to write it: it stays in the tail.
