"""
A server process seen from the reload supervisor: its state, its reports,
and the signals that stop it.

The server (L{twistedlrp.reload.child}) reports on one pipe, one JSON
object a line, and waits on another for the supervisor's word ("boot" to a
spare, "go" to a server that has set Django up). Once it runs, the second
pipe carries JSON objects too: C{{"event": "templates", "files": [...]}}
makes it reload its templates (L{twistedlrp.reload.templates}).
"""

from __future__ import annotations

import json
import os
import signal
import time
from typing import TYPE_CHECKING

from twisted.internet import defer, protocol

from twistedlrp.services import Waiters

if TYPE_CHECKING:
    from twistedlrp.reload.supervisor import ReloadSupervisor


class ServerProcess(protocol.ProcessProtocol):
    """
    One server process and its state, seen from the supervisor:
    C{"spare"} (Twisted and Django imported, waiting to boot), C{"booting"}
    (setting Django up), C{"gated"} (set up, waiting to be let
    run), C{"serving"}, C{"stopping"}, C{"ended"}.
    """

    def __init__(
        self,
        supervisor: ReloadSupervisor,
        number: int,
        report_fd: int,
        gate_fd: int,
        spare: bool = False,
    ):
        self.supervisor = supervisor
        self.number = number
        self.report_fd = report_fd
        self.gate_fd = gate_fd
        self.state = "spare" if spare else "booting"
        # A spare's imported files, once it is ready, and the files changed
        # since it started: if they meet, it may hold old code.
        self.files: set[str] | None = None
        self.changes_seen: set[str] = set()
        # The template directories it reported once Django was set up, and
        # templates changed while it was not running yet.
        self.template_dirs: list[str] = []
        self.templates_changed: set[str] = set()
        self.abandoned = False
        self.error: str | None = None
        self.exit_code: int | None = None
        self.started_at = time.monotonic()
        self.booted_after = 0.0
        self._buffer = b""
        self._ended = Waiters()

    @property
    def pid(self) -> int | None:
        return self.transport.pid if self.transport is not None else None

    def childDataReceived(self, fd, data):
        if fd != self.report_fd:
            return
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            try:
                message = json.loads(line)
            except ValueError:
                continue
            self.supervisor.child_reported(self, message)

    def childConnectionLost(self, fd):
        pass

    def processEnded(self, reason):
        value = reason.value
        self.exit_code = getattr(value, "exitCode", None)
        signal_number = getattr(value, "signal", None)
        self.state = "ended"
        self._ended.fire()
        self.supervisor.child_ended(self, self.exit_code, signal_number)

    def when_ended(self) -> defer.Deferred:
        if self.state == "ended":
            return defer.succeed(None)
        return self._ended.wait()

    def boot(self) -> None:
        """Let a spare go on to set Django up."""
        self.state = "booting"
        self.started_at = time.monotonic()
        self.transport.writeToChild(self.gate_fd, b"boot\n")

    def let_run(self) -> None:
        self.state = "serving"
        self.transport.writeToChild(self.gate_fd, b"go\n")
        if self.templates_changed:
            self.reload_templates(sorted(self.templates_changed))

    def reload_templates(self, files: list[str]) -> None:
        """Have the server reload its templates (C{files} changed): no restart."""
        if self.state != "serving":
            self.templates_changed.update(files)
            return
        self.templates_changed.clear()
        line = json.dumps({"event": "templates", "files": files}) + "\n"
        try:
            self.transport.writeToChild(self.gate_fd, line.encode("utf-8"))
        except KeyError:
            pass  # It closed the pipe: it is ending, and says so soon.

    def signal_leader(self, number: int) -> None:
        if self.state != "ended" and self.pid:
            try:
                os.kill(self.pid, number)
            except (ProcessLookupError, PermissionError):
                pass

    def kill_group(self) -> None:
        """SIGKILL the server and everything in its process group (job workers)."""
        pid = self.pid if self.transport is not None else None
        if pid is None:
            pid = getattr(self, "_last_pid", None)
        if not pid:
            return
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.signal_leader(signal.SIGKILL)

    def makeConnection(self, transport):
        super().makeConnection(transport)
        self._last_pid = transport.pid
