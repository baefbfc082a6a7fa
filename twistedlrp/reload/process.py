"""
A server process seen from the reload supervisor: it reports C{spare},
C{booted}, C{failed}, C{files}; the supervisor says C{boot}, C{go}, C{templates}.
"""

from __future__ import annotations

import signal
import time
from typing import TYPE_CHECKING

from twisted.internet import defer, protocol

from twistedlrp.ordered_service import Waiters
from twistedlrp.process.channel import Channel
from twistedlrp.process.exits import Exit
from twistedlrp.process.supervise import send_signal

if TYPE_CHECKING:
    from twistedlrp.reload.supervisor import ReloadSupervisor


class ServerProcess(protocol.ProcessProtocol):
    """C{state}: spare (waits to boot), booting, gated (waits to run), serving, stopping, ended."""

    def __init__(self, supervisor: ReloadSupervisor, number: int, spare: bool = False):
        self.supervisor = supervisor
        self.number = number
        self.state = "spare" if spare else "booting"
        self.channel = Channel(lambda message: supervisor.child_reported(self, message))
        # A spare's imported files and the files changed since it started: if
        # they meet, it may hold old code.
        self.files: set[str] | None = None
        self.changes_seen: set[str] = set()
        self.template_dirs: list[str] = []
        self.templates_changed: set[str] = set()
        self.abandoned = False
        self.error: str | None = None
        self.started_at = time.monotonic()
        self.booted_after = 0.0
        self.pid: int | None = None
        self._ended = Waiters()

    def connectionMade(self):
        self.pid = self.transport.pid

    def processEnded(self, reason):
        self.state = "ended"
        self._ended.fire()
        self.supervisor.child_ended(self, Exit.of(reason))

    def when_ended(self) -> defer.Deferred:
        return defer.succeed(None) if self.state == "ended" else self._ended.wait()

    def boot(self) -> None:
        self.state = "booting"
        self.started_at = time.monotonic()
        self.channel.send({"event": "boot"})

    def let_run(self) -> None:
        self.state = "serving"
        self.channel.send({"event": "go"})
        if self.templates_changed:
            self.reload_templates(sorted(self.templates_changed))

    def reload_templates(self, files: list[str]) -> None:
        if self.state != "serving":
            self.templates_changed.update(files)
            return
        self.templates_changed.clear()
        self.channel.send({"event": "templates", "files": files})

    def signal_leader(self, number: int) -> None:
        if self.state != "ended":
            send_signal(self.pid, number)

    def kill_group(self) -> None:
        send_signal(self.pid, signal.SIGKILL, group=True)
        self.signal_leader(signal.SIGKILL)
