"""
The worker template: a child with Django set up and the site's job modules
imported, as in a worker, that never runs a job and forks new workers on
the pool's request, so that replacing a worker costs a fork instead of a
Django start-up (gunicorn's C{preload}, for job workers).

It is started lazily, when the first worker comes within
L{template_ahead} jobs of C{--max-jobs-per-worker}: a server whose
workers are never replaced never pays for one more process. From then on
standby successors, and the replacements of workers that died, are forked
from it (a fork asked of a template still starting waits for it); the pool
falls back to starting workers itself (C{spawnProcess}) when the template
could not be asked, could not fork, or is gone.

The pool passes each fork the child's ends of four pipes (its stdout,
stderr, command and answer pipes, the fds 1 to 4 of a spawned worker) over
a C{SOCK_SEQPACKET} socket pair, so a forked worker is driven by the same
L{twistedlrp.jobs.worker.Worker} protocol through L{ForkedProcess}, which
plays the part of Twisted's process transport. A forked worker is the
template's child, not ours: the template reaps it and reports its exit
status. If the template dies, its workers live on with their jobs, and a
pidfd (C{pidfd_open}, Linux 5.3) tells the pool when each one ends, its
exit status unknown; where pidfds are missing, forked workers die with
their template (C{PR_SET_PDEATHSIG}) and are declared dead at once.

The child's side is L{twistedlrp.jobs.child.serve_template}.
"""

from __future__ import annotations

import array
import itertools
import json
import os
import signal
import socket
import sys
from collections.abc import Callable

from twisted.internet import abstract, error, process, protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from twistedlrp.jobs.child import FORK_FDS

log = Logger(namespace="twistedlrp.jobs.workers")

# What one control message may be, at most (they are small JSON objects).
_MAX_MESSAGE = 64 * 1024


def template_ahead(max_jobs: int, standby: int) -> int:
    """
    @return: how many jobs before C{max_jobs} a worker starts the template
        (0: never), given that its standby successor is started C{standby}
        jobs before: twice that, so that the template is ready by then.
    """
    if not standby or not supported():
        return 0
    return min(max_jobs - 1, 2 * standby)


def supported() -> bool:
    """@return: whether this platform can fork workers from a template (Linux)."""
    return sys.platform.startswith("linux") and hasattr(socket, "SOCK_SEQPACKET")


def _wait_reason(status: int | None) -> BaseException:
    if status is None:
        return error.ProcessTerminated(None, signal.SIGKILL, None)
    if os.WIFEXITED(status):
        code = os.WEXITSTATUS(status)
        return (
            error.ProcessDone(status) if code == 0 else error.ProcessTerminated(code, None, status)
        )
    return error.ProcessTerminated(None, os.WTERMSIG(status), status)


class ForkedProcess:
    """
    The transport of a L{Worker} forked by the template: the parts of
    Twisted's C{IProcessTransport} the worker uses, over the pipes the pool
    made. C{pid} is C{None} until the template has forked.
    """

    def __init__(self, reactor, proto, fds: dict[int, int]):
        self.reactor = reactor
        self.proto = proto
        self.pid: int | None = None
        self.pipes: dict[int, abstract.FileDescriptor] = {}
        self.lost_process = False
        self._ended = False
        for child_fd, fd in fds.items():
            if child_fd == 3:
                self.pipes[child_fd] = process.ProcessWriter(reactor, self, child_fd, fd)
            else:
                self.pipes[child_fd] = process.ProcessReader(reactor, self, child_fd, fd)

    # What ProcessReader and ProcessWriter call.
    def childDataReceived(self, name, data):
        self.proto.childDataReceived(name, data)

    def childConnectionLost(self, name, reason):
        pipe = self.pipes.pop(name, None)
        if pipe is not None:
            try:
                os.close(pipe.fileno())
            except OSError:
                pass
        try:
            self.proto.childConnectionLost(name)
        except BaseException:
            log.failure("Error in a worker's childConnectionLost")
        self._maybe_ended()

    # IProcessTransport, as much as Worker uses.
    def writeToChild(self, child_fd, data):
        self.pipes[child_fd].write(data)

    def closeChildFD(self, child_fd):
        if child_fd in self.pipes:
            self.pipes[child_fd].loseConnection()

    def signalProcess(self, name):
        if self.pid is None or self.lost_process:
            raise error.ProcessExitedAlready()
        number = getattr(signal, f"SIG{name}") if isinstance(name, str) else name
        os.kill(self.pid, number)

    def loseConnection(self):
        for child_fd in list(self.pipes):
            self.closeChildFD(child_fd)

    def watch_exit(self) -> bool:
        """
        The template is gone and this worker lives on: learn of its end
        from a pidfd (its exit status is lost with the template).

        @return: whether it is watched (C{False}: pidfds are not available).
        """
        try:
            pidfd = os.pidfd_open(self.pid)
        except ProcessLookupError:
            self.exited(None, "ended with the worker template (its exit status is unknown)")
            return True
        except (AttributeError, OSError):
            return False
        _ExitWatcher(self.reactor, pidfd, self._orphan_ended).startReading()
        return True

    def _orphan_ended(self) -> None:
        self.exited(None, "exited after the worker template ended (its exit status is unknown)")

    def exited(self, status: int | None, how: str | None = None) -> None:
        """
        The template reaped the child (C{status} C{None}: lost with the
        template, or never forked), C{how} in words if not by its status.
        """
        if self.lost_process:
            return
        self.lost_process = True
        reason = _wait_reason(status)
        if how:
            reason.how = how
        try:
            self.proto.processExited(Failure(reason))
        except BaseException:
            log.failure("Error in a worker's processExited")
        self._maybe_ended()

    def _maybe_ended(self) -> None:
        if self.pipes or not self.lost_process or self._ended:
            return
        self._ended = True
        try:
            self.proto.processEnded(Failure(error.ProcessDone(0)))
        except BaseException:
            log.failure("Error in a worker's processEnded")


class _ExitWatcher(abstract.FileDescriptor):
    """A pidfd in the reactor: readable once its process has ended."""

    def __init__(self, reactor, pidfd: int, on_exit: Callable):
        super().__init__(reactor)
        self._pidfd = pidfd
        self._on_exit = on_exit

    def fileno(self):
        return self._pidfd

    def doRead(self):
        return error.ConnectionDone("the process ended")

    def connectionLost(self, reason):
        super().connectionLost(reason)
        os.close(self._pidfd)
        self._pidfd = -1
        self._on_exit()


class _ControlReader(abstract.FileDescriptor):
    """Our end of the template's control socket: one JSON message per datagram."""

    def __init__(self, reactor, sock: socket.socket, on_message: Callable, on_closed: Callable):
        super().__init__(reactor)
        self.socket = sock
        self._on_message = on_message
        self._on_closed = on_closed

    def fileno(self):
        return self.socket.fileno()

    def doRead(self):
        for _ in range(64):
            try:
                data = self.socket.recv(_MAX_MESSAGE)
            except BlockingIOError:
                return None
            except OSError as e:
                return error.ConnectionLost(str(e))
            if not data:
                return error.ConnectionDone("the template closed its control socket")
            try:
                message = json.loads(data)
            except ValueError:
                log.warn(
                    "The worker template sent an unreadable message: {data!r}", data=data[:200]
                )
                continue
            self._on_message(message)
        return None

    def connectionLost(self, reason):
        super().connectionLost(reason)
        self.socket.close()
        self._on_closed()


class WorkerTemplate(protocol.ProcessProtocol):
    """
    One template process. C{state}: C{starting}, C{ready}, C{dead}.

    @param on_ready: called with the names of the template's other threads
        (which forked workers do not have) once it can fork.
    @param on_ended: C{(template, was_ready, reason)}: it has ended.
    """

    def __init__(self, reactor, on_ready: Callable, on_ended: Callable):
        self.reactor = reactor
        self.state = "starting"
        self.pid: int | None = None
        self._on_ready = on_ready
        self._on_ended = on_ended
        self._control: _ControlReader | None = None
        self._numbers = itertools.count(1)
        # Forks asked for and not answered yet, by request number.
        self._pending: dict[int, ForkedProcess] = {}
        # The template's live children, by pid.
        self._children: dict[int, ForkedProcess] = {}
        self._output = bytearray()

    def start(self, args: list[str], env: dict, path: str) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.setblocking(False)
        try:
            self.reactor.spawnProcess(
                self,
                sys.executable,
                args,
                env=env,
                path=path,
                childFDs={0: "w", 1: "r", 2: "r", 3: theirs.fileno()},
            )
        finally:
            theirs.close()
        self._control = _ControlReader(self.reactor, ours, self._message, self._control_closed)
        self._control.startReading()

    # -- forking ----------------------------------------------------------------------

    def fork(self, worker, worker_id: str) -> bool:
        """
        Ask for a worker driven by C{worker} (a L{Worker}); its transport is
        connected at once and gets its pid once the template has forked. A
        template still starting finds the request waiting in its socket
        when it is ready.

        @return: whether the request was sent (if not, start the worker
            another way).
        """
        if self.state == "dead" or self._control is None:
            return False
        ours: dict[int, int] = {}
        theirs: list[int] = []
        try:
            for child_fd in FORK_FDS:
                read_end, write_end = os.pipe()
                # fd 3 carries commands to the child; the others come from it.
                if child_fd == 3:
                    ours[child_fd], theirs_fd = write_end, read_end
                else:
                    ours[child_fd], theirs_fd = read_end, write_end
                theirs.append(theirs_fd)
            number = next(self._numbers)
            message = json.dumps({"fork": number, "worker_id": worker_id}).encode()
            self._control.socket.sendmsg(
                [message], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", theirs))]
            )
        except OSError as e:
            log.warn("The worker template could not be asked to fork: {e}", e=e)
            for fd in list(ours.values()):
                os.close(fd)
            return False
        finally:
            for fd in theirs:
                os.close(fd)
        forked = ForkedProcess(self.reactor, worker, ours)
        self._pending[number] = forked
        worker.makeConnection(forked)
        return True

    def _message(self, message: dict) -> None:
        if "ready" in message:
            if self.state == "starting":
                self.state = "ready"
                self._on_ready([str(name) for name in message.get("threads") or []])
        elif "forked" in message:
            forked = self._pending.pop(message["forked"], None)
            if forked is None:
                return
            forked.pid = message["pid"]
            self._children[forked.pid] = forked
            forked.proto.forked(forked.pid)
        elif "failed" in message:
            forked = self._pending.pop(message["failed"], None)
            log.warn("The worker template could not fork: {error}", error=message.get("error"))
            if forked is not None:
                forked.exited(None, f"was not forked ({message.get('error')})")
        elif "exited" in message:
            forked = self._children.pop(message["exited"], None)
            if forked is not None:
                forked.exited(message["status"])

    def stop(self) -> None:
        """Close the control socket: the template exits, and its workers with it."""
        control, self._control = self._control, None
        if control is not None:
            control.stopReading()
            control.socket.close()

    def _control_closed(self) -> None:
        # The template closed its end: it is ending, or must.
        self._control = None
        if self.state != "dead" and self.pid is not None:
            try:
                self.transport.signalProcess("TERM")
            except (error.ProcessExitedAlready, OSError):
                pass

    # -- process protocol -------------------------------------------------------------

    def connectionMade(self):
        self.pid = self.transport.pid
        self.transport.closeChildFD(0)

    def childDataReceived(self, fd, data):
        self._output += data
        del self._output[:-4000]
        for line in data.decode("utf-8", "replace").splitlines():
            if line.strip():
                log.info("worker template {pid}: {line}", pid=self.pid, line=line.rstrip())

    def processExited(self, reason):
        was_ready = self.state == "ready"
        self.state = "dead"
        if self._control is not None:
            # What it reported before it ended (a child's exit) still counts.
            self._control.doRead()
        self.stop()
        pending = list(self._pending.values())
        orphans = list(self._children.values())
        self._pending.clear()
        self._children.clear()
        for forked in pending:
            forked.exited(None, "was not forked (the worker template ended first)")
        # Its workers live on, and their jobs with them; nobody reaps them
        # for us now, but a pidfd says when each one ends.
        for forked in orphans:
            if not forked.watch_exit():
                # No pidfd here (Linux before 5.3): they died with the
                # template (PR_SET_PDEATHSIG); what they started goes too.
                try:
                    os.killpg(forked.pid, signal.SIGKILL)
                except OSError:
                    pass
                forked.exited(None, "was killed with the worker template")
        self._on_ended(self, was_ready, reason)

    def output(self) -> str:
        return bytes(self._output).decode("utf-8", "replace").strip()
