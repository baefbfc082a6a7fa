"""
The worker template (docs/jobs.md, "Replacing workers"): a fork server with
Django set up as in a worker, so that replacing a worker costs a fork instead
of a Django start-up. Each fork gets the four pipes of a spawned worker.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import sys
from collections.abc import Callable

from twisted.internet import abstract, error, process
from twisted.logger import Logger

from twistedlrp.jobs.workers.main import FORK_FDS
from twistedlrp.process.exits import Exit
from twistedlrp.process.forkserver import ForkServerProcess

log = Logger(namespace="twistedlrp.jobs.workers")


def supported() -> bool:
    """@return: whether this platform can fork workers from a template (Linux)."""
    return sys.platform.startswith("linux")


class ForkedProcess:
    """The transport of a forked L{Worker}: what it uses of C{IProcessTransport}, over pipes."""

    def __init__(self, reactor, proto, fds: dict[int, int]):
        self.reactor, self.proto = reactor, proto
        self.pid: int | None = None
        self.pipes: dict[int, abstract.FileDescriptor] = {}
        self.lost_process = False
        self._ended = False
        for child_fd, fd in fds.items():
            pipe = process.ProcessWriter if child_fd == 3 else process.ProcessReader
            self.pipes[child_fd] = pipe(reactor, self, child_fd, fd)

    def childDataReceived(self, name, data):
        self.proto.childDataReceived(name, data)

    def childConnectionLost(self, name, reason):
        if (pipe := self.pipes.pop(name, None)) is not None:
            with contextlib.suppress(OSError):
                os.close(pipe.fileno())
        self._tell("childConnectionLost", name)
        self._maybe_ended()

    def writeToChild(self, child_fd, data):
        self.pipes[child_fd].write(data)

    def closeChildFD(self, child_fd):
        if child_fd in self.pipes:
            self.pipes[child_fd].loseConnection()

    def signalProcess(self, name):
        if self.pid is None or self.lost_process:
            raise error.ProcessExitedAlready()
        os.kill(self.pid, getattr(signal, f"SIG{name}"))

    def watch_exit(self) -> bool:
        """The template is gone: watch this worker's end by a pidfd; @return: whether it can."""
        try:
            pidfd = os.pidfd_open(self.pid)
        except ProcessLookupError:
            self.exited(Exit(lost="ended with the worker template (its exit status is unknown)"))
            return True
        except (AttributeError, OSError):
            return False
        lost = Exit(lost="exited after the worker template ended (its exit status is unknown)")
        _ExitWatcher(self.reactor, pidfd, lambda: self.exited(lost)).startReading()
        return True

    def exited(self, ended: Exit) -> None:
        if self.lost_process:
            return
        self.lost_process = True
        self._tell("processExited", ended.reason())
        self._maybe_ended()

    def _maybe_ended(self) -> None:
        if self.pipes or not self.lost_process or self._ended:
            return
        self._ended = True
        self._tell("processEnded", Exit(0).reason())

    def _tell(self, event: str, *args) -> None:
        try:
            getattr(self.proto, event)(*args)
        except BaseException:
            log.failure("Error in a worker's {event}", event=event)


class _ExitWatcher(abstract.FileDescriptor):
    """A pidfd in the reactor: readable once its process has ended."""

    def __init__(self, reactor, pidfd: int, on_exit: Callable):
        super().__init__(reactor)
        self._pidfd, self._on_exit = pidfd, on_exit

    def fileno(self):
        return self._pidfd

    def doRead(self):
        return error.ConnectionDone("the process ended")

    def connectionLost(self, reason):
        super().connectionLost(reason)
        os.close(self._pidfd)
        self._pidfd = -1
        self._on_exit()


class WorkerTemplate(ForkServerProcess):
    """
    One template process, the fork server of L{main.serve_template}.
    @param on_ready: called, once it can fork, with the names of its other
        threads (which forked workers do not have).
    @param on_ended: C{(template, exit)}.
    """

    def __init__(self, reactor, on_ready: Callable, on_ended: Callable):
        super().__init__(reactor, self._message, self._ended, self._output)
        self._on_ready, self._on_ended = on_ready, on_ended
        self._numbers = itertools.count(1)
        self._pending: dict[int, ForkedProcess] = {}  # forks asked for, by request number
        self._children: dict[int, ForkedProcess] = {}

    def start(self, args: list[str], env: dict, path: str) -> None:
        """@raise OSError: it could not be started."""
        self.spawn(args, env, {0: "w", 1: "r", 2: "r"}, 3, path)
        self.transport.closeChildFD(0)

    def fork_worker(self, worker, worker_id: str) -> bool:
        """
        Ask for a worker driven by C{worker}, connected at once (a template still
        starting finds the request when ready). @return: whether it was sent.
        """
        pipes = {child_fd: os.pipe() for child_fd in FORK_FDS}
        # fd 3 carries commands to the child (it reads it); the others come from it.
        ours = {fd: pipe[1] if fd == 3 else pipe[0] for fd, pipe in pipes.items()}
        theirs = [pipe[0] if fd == 3 else pipe[1] for fd, pipe in pipes.items()]
        number = next(self._numbers)
        if not self.fork({"index": number, "worker_id": worker_id}, theirs):
            for fd in ours.values():
                os.close(fd)
            return False
        forked = ForkedProcess(self.reactor, worker, ours)
        self._pending[number] = forked
        worker.makeConnection(forked)
        return True

    def _message(self, server, message: dict) -> None:
        event = message.get("event")
        if event == "ready":
            self._on_ready([str(name) for name in message.get("threads") or []])
        elif event == "forked":
            if (forked := self._pending.pop(message["index"], None)) is not None:
                forked.pid = message["pid"]
                self._children[forked.pid] = forked
                forked.proto.forked(forked.pid)
        elif event == "fork_failed":
            forked = self._pending.pop(message["index"], None)
            log.warn("The worker template could not fork: {error}", error=message.get("error"))
            if forked is not None:
                forked.exited(Exit(lost=f"was not forked ({message.get('error')})"))
        elif event == "exited":
            if (forked := self._children.pop(message["pid"], None)) is not None:
                forked.exited(Exit(message.get("code"), message.get("signal")))

    def _output(self, fd: int, line: bytes) -> None:
        text = line.decode("utf-8", "replace").rstrip()
        if text.strip():
            log.info("worker template {pid}: {line}", pid=self.pid, line=text)

    def _ended(self, server, ended: Exit) -> None:
        pending, self._pending = list(self._pending.values()), {}
        orphans, self._children = list(self._children.values()), {}
        for forked in pending:
            forked.exited(Exit(lost="was not forked (the worker template ended first)"))
        # Its workers live on, unreaped: a pidfd says when each one ends.
        for forked in orphans:
            if not forked.watch_exit():
                # No pidfd (Linux before 5.3): they died with the template
                # (PR_SET_PDEATHSIG); what they started goes too.
                with contextlib.suppress(OSError):
                    os.killpg(forked.pid, signal.SIGKILL)
                forked.exited(Exit(lost="was killed with the worker template"))
        self._on_ended(self, ended)
