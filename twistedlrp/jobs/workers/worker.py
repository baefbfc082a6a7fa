"""
One worker child, seen from the server (L{Worker}): AMP over its fds 3 and
4, its stdout and stderr logged with the job's id, its process group
signalled, and its death seen in C{processExited} (a job's subprocess may
hold copies of its pipes, which C{processEnded} would wait for).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
from typing import TYPE_CHECKING

from twisted.internet import defer, error, protocol
from twisted.logger import Logger, LogLevel
from twisted.protocols import amp
from twisted.python.failure import Failure

from twistedlrp import stdlog
from twistedlrp.jobs import registry
from twistedlrp.jobs.protocol import wire
from twistedlrp.jobs.protocol.framing import BoxReader, get_big, put_big
from twistedlrp.jobs.workers.main import MAX_ERROR, cut_text
from twistedlrp.process.exits import Exit
from twistedlrp.process.supervise import send_signal

if TYPE_CHECKING:
    from twistedlrp.jobs.workers.pool import WorkerPool

log = Logger(namespace="twistedlrp.jobs.workers")
# Worker and node ids name the machine (job nodes may share a database).
HOSTNAME = os.uname().nodename
OUTPUT_TAIL = 16 * 1024
_LEVELS = {name: getattr(LogLevel, name) for name in ("debug", "info", "warn", "error", "critical")}
# What is read of a child's pipes once it has exited, at most.
_DRAIN_LIMIT = 1024 * 1024


class _ParentProtocol(wire.QuietAMP):
    def __init__(self, worker: Worker):
        super().__init__()
        self.worker = worker
        self._reader = BoxReader()

    def dataReceived(self, data):
        # BoxReader (as in the child) instead of AMP's key-by-key state machine:
        # the worker pipe is the busiest connection of the job service.
        for box in self._reader.feed(data):
            self.ampBoxReceived(amp.AmpBox(box))

    @wire.WorkerReady.responder
    def ready(self, pid):
        self.worker.became_ready(pid)
        return {}

    @wire.ReportProgress.responder
    def progress(self, job_id, current, total, message):
        self.worker.pool.on_progress(self.worker, job_id, current, total, message)
        return {}


class Worker(protocol.ProcessProtocol):
    """
    One child process. C{state}: C{starting}, C{idle}, C{busy}, C{standby}
    (ready to succeed a worker about to be replaced), C{retiring}, C{dead}.
    It is its AMP's transport too (AMP only writes and loses it): writes go to
    the child's fd 3.
    """

    disconnecting = False

    def __init__(self, pool: WorkerPool, standby: bool = False):
        self.pool = pool
        self.state = "starting"
        self.standby = standby  # started ahead, to take over from a worker at its limit
        # The standby worker started for this one, and whether it took over.
        self.successor: Worker | None = None
        self.succeeded = False
        self.pid: int | None = None
        self.amp = _ParentProtocol(self)
        self.job_id: str | None = None
        self.jobs_done = 0
        self.was_ready = False
        self.kill_reason: str | None = None  # why the parent ended it ("timeout", ...)
        self.exited = False  # the child itself (its group may live on until killed)
        self.broken: str | None = None  # why its answer could not be read (no more jobs)
        self.output_tail = bytearray()
        self._partial = {1: b"", 2: b""}
        self.startup_output = bytearray()  # its last output before it was ready

    @property
    def ident(self) -> str:
        return f"{HOSTNAME}:{self.pid}"

    def connectionMade(self):
        self.pid = self.transport.pid
        self.transport.closeChildFD(0)  # jobs that read stdin see end of file
        self.amp.makeConnection(self)

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.disconnecting and not self.exited:
            with contextlib.suppress(KeyError):  # the pipe is closed already
                self.transport.writeToChild(3, data)

    def loseConnection(self) -> None:
        if not self.disconnecting and self.transport is not None:
            self.disconnecting = True
            self.transport.closeChildFD(3)

    def forked(self, pid: int) -> None:
        self.pid = pid
        self.pool.on_forked(self)
        if self.kill_reason is not None and self.kill_reason != "retire":  # killed before its pid
            self.signal("KILL")

    def childDataReceived(self, fd, data):
        if fd == 4:
            self.amp.dataReceived(data)
        elif fd in (1, 2):
            self._output(fd, data)

    def childConnectionLost(self, fd):
        if fd == 4:
            self.amp.connectionLost(Failure(error.ConnectionDone("worker pipe closed")))
            if self.state != "dead":
                self.signal("KILL")
        elif fd in (1, 2) and self._partial.get(fd):
            self._log_line(fd, self._partial[fd])
            self._partial[fd] = b""

    def processExited(self, reason):
        self.exited = True
        self.state = "dead"
        # What its job left in its group goes with it (its pid is not reused
        # while the group exists).
        send_signal(self.pid, signal.SIGKILL, group=True)
        self._drain()
        # Our ends of its pipes: nothing more comes from the child itself.
        for fd in list(getattr(self.transport, "pipes", {})):
            self.transport.closeChildFD(fd)
        self.pool.on_ended(self, str(Exit.of(reason)))

    def _drain(self) -> None:
        pipes = getattr(self.transport, "pipes", {})
        for fd in (1, 2, 4):  # output first: the answer, read last, finds all of it
            if (reader := pipes.get(fd)) is None:
                continue
            budget = _DRAIN_LIMIT
            while budget > 0:
                try:
                    data = os.read(reader.fileno(), min(65536, budget))
                except OSError:
                    break  # EAGAIN, or closed
                if not data:
                    break
                budget -= len(data)
                self.childDataReceived(fd, data)

    def _output(self, fd: int, data: bytes) -> None:
        if self.job_id is not None:
            self.output_tail += data
            del self.output_tail[:-OUTPUT_TAIL]
        elif self.state == "starting":
            self.startup_output += data
            del self.startup_output[:-4000]
        lines = (self._partial[fd] + data).split(b"\n")
        self._partial[fd] = lines.pop()
        if len(self._partial[fd]) > 8192:
            lines.append(self._partial[fd])
            self._partial[fd] = b""
        for line in lines:
            self._log_line(fd, line)

    def _log_line(self, fd: int, line: bytes) -> None:
        text = line.decode("utf-8", "replace").rstrip()
        if not text:
            return
        stream = "stdout" if fd == 1 else "stderr"
        record = stdlog.parse_record(text) if fd == 2 else None
        if record is not None:  # a stdlib record of the job's
            level, name, message = record
            Logger(namespace=name).emit(
                _LEVELS[level], "{log_text}", log_text=message, job_id=self.job_id, worker=self.pid
            )
        elif self.job_id is not None:
            log.info("job {job_id} {stream}: {line}", job_id=self.job_id, stream=stream, line=text)
        else:
            log.info("worker {pid} {stream}: {line}", pid=self.pid, stream=stream, line=text)

    def take_output(self) -> str:
        """@return: the job's output tail (and forget it)."""
        text, self.output_tail = bytes(self.output_tail).decode("utf-8", "replace"), bytearray()
        return text

    def became_ready(self, pid: int | None = None) -> None:
        if self.pid is None and pid:
            # A forked worker can be ready before the template's word of its pid
            # arrives: a job claimed for it must not be held by "host:None".
            self.pid = pid
        if self.state == "starting":
            self.state = "idle"
            self.was_ready = True
            self.pool.on_ready(self)

    def run(self, job_id: str, name: str, payload: bytes, attempt: int) -> defer.Deferred:
        """@return: a Deferred of the job's outcome; it fails if the child dies first."""
        self.state = "busy"
        self.job_id = job_id
        self.output_tail = bytearray()
        # wire.RunJob's box written out, without AMP's Argument classes for every job.
        box = {b"job_id": job_id.encode(), b"name": name.encode(), b"attempt": b"%d" % attempt}
        definition = registry.lookup(name)
        if definition is not None and definition.module:
            # Registered after the worker started: it imports the module if need be.
            box[b"module"] = definition.module.encode()
        put_big(box, b"payload", payload)
        d = self.amp.callRemoteString(
            wire.RunJob.commandName, True, **{key.decode(): value for key, value in box.items()}
        )
        # An answer that cannot be read fails in _outcome_of: _answer_failed sees it too.
        return d.addCallback(_outcome_of).addErrback(self._answer_failed)

    def _answer_failed(self, failure: Failure) -> Failure:
        if not self.gone(failure):
            self.broken = f"{failure.type.__name__}: {failure.getErrorMessage()}"[:2000]
        return failure

    def gone(self, failure: Failure) -> bool:
        """@return: whether a failed L{run} means that the child ended or is ending (not a bad answer)."""
        return self.exited or failure.check(error.ConnectionDone, error.ConnectionLost) is not None

    def cancel(self, job_id: str) -> None:
        if self.state == "busy" and self.job_id == job_id:
            self.amp.callRemote(wire.CancelJob, job_id=job_id)

    def signal(self, name: str, reason: str | None = None) -> None:
        """Send C{SIG<name>} to the child and its process group, if it still runs, noting why."""
        if reason and self.kill_reason is None:
            self.kill_reason = reason
        if self.exited or self.pid is None:
            return
        try:
            # Until its first line has run the child is in the server's group.
            leads_group = os.getpgid(self.pid) == self.pid
        except OSError:
            leads_group = False
        if leads_group and send_signal(self.pid, getattr(signal, f"SIG{name}"), True):
            return
        # Not (yet) in a group of its own (or gone): the child alone.
        with contextlib.suppress(error.ProcessExitedAlready, AttributeError, OSError):
            self.transport.signalProcess(name)

    def retire(self) -> None:
        # It exits on end of file of its command pipe.
        self.state = "retiring"
        self.kill_reason = self.kill_reason or "retire"
        self.loseConnection()

    def rss_mb(self) -> float:
        """@return: the child's resident memory in MB (0 if unknown)."""
        try:
            with open(f"/proc/{self.pid}/statm") as f:
                pages = int(f.read().split()[1])
        except (OSError, ValueError, IndexError):
            return 0.0
        return pages * os.sysconf("SC_PAGE_SIZE") / (1024 * 1024)


def _outcome_of(answer) -> dict:
    """@return: the outcome of a RunJob answer box, its error cut to L{MAX_ERROR}."""
    outcome = json.loads(get_big(answer, b"outcome"))
    if not isinstance(outcome, dict):
        raise ValueError(f"the worker's outcome is not an object: {outcome!r}"[:200])
    error_text = outcome.get("error")
    if isinstance(error_text, str) and len(error_text) > MAX_ERROR:
        outcome = dict(outcome, error=cut_text(error_text))
    return outcome
