"""
One web process of C{--web-workers}, seen from the main process: its
L{Slot} (pid, state, restart back-off, last status), the line channel it
reports over (L{Lines}), and the template's process protocol
(L{TemplateProcess}). L{twistedlrp.web.processes} runs them.
"""

from __future__ import annotations

import json
import signal
import socket
from typing import TYPE_CHECKING

from twisted.internet import defer, protocol
from twisted.protocols.basic import LineOnlyReceiver

from twistedlrp.services import Waiters

if TYPE_CHECKING:
    from twistedlrp.web.processes import WebProcesses

FIRST_DELAY = 0.5
MAX_DELAY = 30.0


def how_ended(code, signal_number) -> str:
    if signal_number:
        try:
            return f"signal {signal.Signals(signal_number).name}"
        except ValueError:
            return f"signal {signal_number}"
    return f"exit code {code}"


class Lines(LineOnlyReceiver):
    delimiter = b"\n"
    MAX_LENGTH = 4 * 1024 * 1024

    def __init__(self, on_message, on_lost):
        self.on_message = on_message
        self.on_lost = on_lost

    def lineReceived(self, line):
        try:
            message = json.loads(line)
        except ValueError:
            return
        self.on_message(message)

    def connectionLost(self, reason=protocol.connectionDone):
        self.on_lost()


class _OneProtocol(protocol.Factory):
    def __init__(self, proto):
        self.proto = proto

    def buildProtocol(self, addr):
        return self.proto


def adopt_connection(reactor, sock: socket.socket, proto) -> None:
    """Hand the connected UNIX socket C{sock} to the reactor (C{sock} is closed)."""
    sock.setblocking(False)
    reactor.adoptStreamConnection(sock.fileno(), socket.AF_UNIX, _OneProtocol(proto))
    sock.close()


class Slot:
    """One web process: its index, pid, state and last status."""

    def __init__(self, index: int):
        self.index = index
        self.pid: int | None = None
        # starting, running, stopping, waiting (to be restarted), ended
        self.state = "starting"
        self.status: dict = {}
        self.channel: Lines | None = None
        self.peer: socket.socket | None = None  # its channel end, until forked
        self.started_at = 0.0
        self.delay = FIRST_DELAY
        self.restarts = 0
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
    def __init__(self, owner: WebProcesses):
        self.owner = owner
        self.ended = defer.Deferred()

    def processEnded(self, reason):
        value = reason.value
        self.owner.template_ended(getattr(value, "exitCode", None), getattr(value, "signal", None))
        self.ended.callback(None)
