"""
The one warm fork server (the web template, the worker template): a process
that has set Django up, runs no reactor, and forks a child for each request
of its parent, sharing its memory copy on write (gunicorn's C{preload}).

The parent sends C{{"op": "fork", "index": N, ...}} with the child's
descriptors; the server answers C{forked} (C{pid}) or C{fork_failed}
(C{error}), then C{exited} (C{code}, C{signal}) once it reaped the child.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import selectors
import signal
import sys
import time

from twistedlrp.process.channel import BlockingChannel, Channel, spawn
from twistedlrp.process.exits import Exit

OUTPUT_TAIL = 4000  # bytes of the server's output kept, to log when it ends
CONTROL_GRACE = 2.0  # how long its control socket is read once it exited


def flush_stdio() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()


def preimport(names) -> None:
    """Import the modules C{names} ahead of time, so that every fork shares them."""
    # A module that fails is imported again, and its error reported, where it is needed.
    for name in names:
        with contextlib.suppress(Exception):
            importlib.import_module(name)


class ForkServer:
    """The server's side, on its end of the control channel (a blocking one)."""

    def __init__(self, control: BlockingChannel):
        self.control = control
        self.children: dict[int, object] = {}  # pid -> the index of its request
        self._wake_r, self._wake_w = os.pipe()
        for fd in (self._wake_r, self._wake_w):
            os.set_blocking(fd, False)

    def send(self, message: dict) -> bool:
        return self.control.send(message)

    def serve(self, on_message=None) -> dict | None:
        """Fork for each request; @return: C{None} at the channel's end; in a child, its request."""
        signal.set_wakeup_fd(self._wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        selector = selectors.DefaultSelector()
        selector.register(self.control, selectors.EVENT_READ)
        selector.register(self._wake_r, selectors.EVENT_READ)
        self.reap()
        try:
            while True:
                for key, _ in selector.select(1.0):
                    if key.fileobj is not self.control:
                        _drain(self._wake_r)
                    elif not self.control.receive():
                        return None
                    while self.control.pending:
                        message = self.control.pending.pop(0)
                        if message.get("op") != "fork":
                            if on_message is not None:
                                on_message(message)
                        elif self._fork(message) == 0:
                            return message
                self.reap()
        finally:
            selector.close()

    def _fork(self, request: dict) -> int | None:
        """@return: 0 in the child, its pid here, C{None} if it could not fork."""
        fds, index = request.get("fds", []), request.get("index")
        flush_stdio()
        try:
            pid = os.fork()
        except OSError as e:
            pid = None
            self.send({"event": "fork_failed", "index": index, "error": str(e)})
        if pid == 0:
            # The child needs none of the server's plumbing.
            self.control.close()
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            for fd in (self._wake_r, self._wake_w):
                os.close(fd)
            return 0
        for fd in fds:
            os.close(fd)
        if pid is not None:
            self.children[pid] = index
            self.send({"event": "forked", "index": index, "pid": pid})
        return pid

    def reap(self) -> None:
        """Report the children that ended (without waiting for any)."""
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.children.clear()
                return
            if pid == 0:
                return
            if pid in self.children:
                end = Exit.of_status(status)
                message = {"event": "exited", "index": self.children.pop(pid), "pid": pid}
                self.send({**message, "code": end.code, "signal": end.signal})

    def end_children(self, seconds: float) -> None:
        """Wait up to C{seconds} for the children to end, then SIGKILL the ones left."""
        deadline = time.monotonic() + seconds
        while self.children and time.monotonic() < deadline:
            self.reap()
            time.sleep(0.05)
        for pid in list(self.children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        while self.children:
            self.reap()
            time.sleep(0.01)


class ForkServerProcess:
    """
    The parent's side, a fork server's process protocol (C{state}: starting, ready, ended):
    C{on_message(server, message)}, C{on_output(fd, line)}, and C{on_ended(server, exit)} once
    it exited and its control socket was read to the end (or L{CONTROL_GRACE} s after).
    """

    def __init__(self, reactor, on_message, on_ended, on_output=None):
        from twisted.internet import defer

        self.reactor, self.on_message = reactor, on_message
        self.on_ended, self.on_output = on_ended, on_output
        self.state, self.was_ready = "starting", False
        self.pid: int | None = None
        self.transport = None
        self.started_at = reactor.seconds()
        self.control: Channel | None = None
        self.ended = defer.Deferred()
        self.exit: Exit | None = None
        self._held: dict[object, list[int]] = {}  # fds sent with a fork not answered yet
        self._partial: dict[int, bytes] = {}
        self._tail = bytearray()
        self._grace = None

    def spawn(self, args: list[str], env: dict, child_fds: dict, control_fd: int, path=None):
        """Spawn C{sys.executable} with C{args}; @raise OSError: it could not be spawned."""
        channel = Channel(self._said, self._control_lost)
        self.control = spawn(self.reactor, self, channel, args, env, child_fds, control_fd, path)

    def send(self, message: dict, fds=()) -> bool:
        """@return: whether C{message} (with the descriptors C{fds}) was sent."""
        return self.control is not None and self.control.send(message, fds)

    def fork(self, request: dict, fds: list[int]) -> bool:
        """@return: whether a child was asked (C{index} names the answers, which close C{fds})."""
        if self.state == "ended" or not self.send({"op": "fork", **request}, fds):
            _close(fds)
            return False
        self._held[request.get("index")] = list(fds)
        return True

    def close(self) -> None:
        """The server ends."""
        if self.control is not None:
            self.control.close()

    def kill(self) -> None:
        if self.transport is not None and self.state != "ended":
            with contextlib.suppress(Exception):  # it ended already
                self.transport.signalProcess("KILL")

    def output(self) -> str:
        return bytes(self._tail).decode("utf-8", "replace").strip()

    def _said(self, message: dict) -> None:
        event = message.get("event")
        if event in ("forked", "fork_failed"):
            _close(self._held.pop(message.get("index"), []))
        elif event == "ready":
            if self.state != "starting":
                return
            self.state, self.was_ready = "ready", True
        self.on_message(self, message)

    def _control_lost(self, reason=None) -> None:
        self.control = None
        self._maybe_ended()

    # -- the process protocol (IProcessProtocol; this module imports no Twisted) --

    def makeConnection(self, transport) -> None:
        self.transport = transport
        self.pid = transport.pid

    def childConnectionLost(self, fd: int) -> None:
        pass

    def childDataReceived(self, fd: int, data: bytes) -> None:
        self._tail += data
        del self._tail[:-OUTPUT_TAIL]
        *lines, self._partial[fd] = (self._partial.get(fd, b"") + data).split(b"\n")
        if self.on_output is not None:
            for line in lines:
                self.on_output(fd, line + b"\n")

    def processExited(self, reason) -> None:
        self.exit = Exit.of(reason)
        if self.control is not None:
            self._grace = self.reactor.callLater(CONTROL_GRACE, self._give_up_control)
        self._maybe_ended()

    def processEnded(self, reason) -> None:
        for fd, rest in self._partial.items():
            if rest and self.on_output is not None:
                self.on_output(fd, rest + b"\n")
        self._partial.clear()

    def _give_up_control(self) -> None:
        # Its channel is still open (losing it cancels this): connectionLost follows.
        self._grace = None
        self.control.abort()

    def _maybe_ended(self) -> None:
        if self.exit is None or self.control is not None or self.state == "ended":
            return
        if self._grace is not None and self._grace.active():
            self._grace.cancel()
        self.state = "ended"
        for fds in self._held.values():
            _close(fds)
        self._held.clear()
        self.on_ended(self, self.exit)
        self.ended.callback(None)


def _drain(fd: int) -> None:
    with contextlib.suppress(BlockingIOError):
        while os.read(fd, 512):
            pass


def _close(fds) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
