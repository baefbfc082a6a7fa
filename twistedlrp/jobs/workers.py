"""
The worker pool: warm child processes that run one job at a time.

Each child (L{twistedlrp.jobs.child}) is started with C{spawnProcess} and
driven by a L{Worker} process protocol. The parent speaks AMP with it over
two extra pipes (the child's fd 3 carries commands in, fd 4 answers out);
the child's stdout and stderr belong to the job: they are logged with the
job id and their tail is kept for the job's record.

Each child leads a session and process group of its own (it calls
C{setsid} first thing), so the processes a job starts belong to it: a
timeout, a cancel, a shut-down or a retirement signals the whole group
(C{killpg}), and once the child itself has exited whatever is left of its
group is killed too.

A child that dies is seen at once in C{processExited} (not
C{processEnded}, which would wait for every copy of its pipes to close, and
a job's subprocess holds copies): what it wrote is read, its group is
killed, our ends of its pipes are closed, and the pool tells the job
service (which retries or fails the job) and starts a replacement, with
back-off when children die before they are ready.

A worker that will soon reach C{--max-jobs-per-worker} (50 jobs before, for
limits of 1000 and more; see L{standby_ahead}) gets its successor started
ahead of time: once ready it waits in state C{standby}, taking no job,
and takes the worker's place the moment it retires (or dies), so that
replacing workers costs no start-up time and never runs more than
C{--workers} jobs at once.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable

from twisted.internet import defer, error, protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from twistedlrp.jobs import wire
from twistedlrp.jobs.child import MAX_ERROR, cut_text

log = Logger()
# Worker ids name the machine, for when job nodes share a database.
_HOSTNAME = os.uname().nodename


def worker_id_prefix() -> str:
    """@return: how the ids of this machine's workers begin (C{"host:"})."""
    return f"{_HOSTNAME}:"


OUTPUT_TAIL = 16 * 1024
_MAX_START_DELAY = 30.0
# What is still read from a child's pipe once it has exited (bytes, per pipe).
_DRAIN_LIMIT = 1024 * 1024


class _PipeTransport:
    """The transport AMP sees: writes go to the child's fd 3."""

    disconnecting = False

    def __init__(self, worker: Worker):
        self.worker = worker

    def write(self, data: bytes) -> None:
        worker = self.worker
        if worker.transport is not None and not self.disconnecting and not worker.exited:
            try:
                worker.transport.writeToChild(3, data)
            except KeyError:
                pass  # The pipe is closed already.

    def writeSequence(self, data) -> None:
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        if not self.disconnecting and self.worker.transport is not None:
            self.disconnecting = True
            self.worker.transport.closeChildFD(3)

    abortConnection = loseConnection

    def getPeer(self):
        return ("worker", self.worker.pid)

    def getHost(self):
        return ("job-service", os.getpid())


class _ParentProtocol(wire.QuietAMP):
    def __init__(self, worker: Worker):
        super().__init__()
        self.worker = worker

    @wire.WorkerReady.responder
    def ready(self, pid):
        self.worker.became_ready()
        return {}

    @wire.ReportProgress.responder
    def progress(self, job_id, current, total, message):
        self.worker.pool.on_progress(self.worker, job_id, current, total, message)
        return {}


class Worker(protocol.ProcessProtocol):
    """
    One child process. C{state}: C{starting}, C{idle}, C{busy},
    C{standby} (ready, waiting to succeed a worker that is about to be
    replaced), C{retiring} (will exit after its job or now), C{dead}.
    """

    def __init__(self, pool: WorkerPool, number: int, standby: bool = False):
        self.pool = pool
        self.number = number
        self.state = "starting"
        # Started ahead of time to take over from a worker at its job limit.
        self.standby = standby
        # The standby worker started for this one, and whether it took over.
        self.successor: Worker | None = None
        self.succeeded = False
        self.pid: int | None = None
        self.amp = _ParentProtocol(self)
        self.job_id: str | None = None
        self.jobs_done = 0
        self.was_ready = False
        # Why the parent ended the process, if it did: "timeout", "cancel", "shutdown", "retire".
        self.kill_reason: str | None = None
        # The child itself has exited (its group may live on until killed).
        self.exited = False
        # Why it must not run another job (its answer could not be read), if so.
        self.broken: str | None = None
        self.output_tail = bytearray()
        self._partial = {1: b"", 2: b""}
        self._startup_output = bytearray()

    @property
    def ident(self) -> str:
        return f"{_HOSTNAME}:{self.pid}"

    # -- process protocol ---------------------------------------------------------

    def connectionMade(self):
        self.pid = self.transport.pid
        # Jobs that read stdin see end of file.
        self.transport.closeChildFD(0)
        self.amp.makeConnection(_PipeTransport(self))

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
        """
        The child has exited. Subprocesses of its job may still hold its
        pipes, so C{processEnded} may be far away: the worker is dead now.
        """
        self.exited = True
        self.state = "dead"
        # Whatever its job started and left in its group goes with it.
        self._kill_group()
        # What the child wrote before it ended (its last output, an answer).
        self._drain()
        # Our ends of its pipes: nothing more comes from the child itself.
        for fd in list(getattr(self.transport, "pipes", {})):
            self.transport.closeChildFD(fd)
        self.pool.on_ended(self, describe_exit(reason.value))

    def processEnded(self, reason):
        # Every pipe is closed too; processExited has said everything.
        self.state = "dead"

    def _drain(self) -> None:
        pipes = getattr(self.transport, "pipes", {})
        # Output first, so that an answer read last finds the job's whole output.
        for fd in (1, 2, 4):
            reader = pipes.get(fd)
            if reader is None:
                continue
            budget = _DRAIN_LIMIT
            while budget > 0:
                try:
                    data = os.read(reader.fileno(), min(65536, budget))
                except OSError:
                    break  # Nothing more for now (EAGAIN), or closed.
                if not data:
                    break
                budget -= len(data)
                self.childDataReceived(fd, data)

    # -- output ---------------------------------------------------------------

    def _output(self, fd: int, data: bytes) -> None:
        if self.job_id is not None:
            self.output_tail += data
            if len(self.output_tail) > OUTPUT_TAIL:
                del self.output_tail[: len(self.output_tail) - OUTPUT_TAIL]
        elif self.state == "starting":
            self._startup_output += data
            del self._startup_output[:-4000]
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
        if self.job_id is not None:
            log.info("job {job_id} {stream}: {line}", job_id=self.job_id, stream=stream, line=text)
        else:
            log.info("worker {pid} {stream}: {line}", pid=self.pid, stream=stream, line=text)

    def take_output(self) -> str:
        """@return: the job's output tail (and forget it)."""
        text = bytes(self.output_tail).decode("utf-8", "replace")
        self.output_tail = bytearray()
        return text

    def startup_output(self) -> str:
        return bytes(self._startup_output).decode("utf-8", "replace").strip()

    # -- control ------------------------------------------------------------------

    def became_ready(self) -> None:
        if self.state == "starting":
            self.state = "idle"
            self.was_ready = True
            self.pool.on_ready(self)

    def run(self, job_id: str, name: str, payload: bytes, attempt: int) -> defer.Deferred:
        """
        Send a job to the child.

        @return: a Deferred firing with the outcome dict when the job ends in
            the child; it fails if the child dies first (the death itself is
            reported through the pool's C{on_ended}).
        """
        self.state = "busy"
        self.job_id = job_id
        self.output_tail = bytearray()
        d = self.amp.callRemote(
            wire.RunJob, job_id=job_id, name=name, payload=payload, attempt=attempt
        )
        d.addCallbacks(lambda answer: bounded_outcome(answer["outcome"]), self._answer_failed)
        return d

    def _answer_failed(self, failure: Failure) -> Failure:
        if not self.gone(failure):
            # The child lives but its answer could not be read: it runs no more jobs.
            self.broken = f"{failure.type.__name__}: {failure.getErrorMessage()}"[:2000]
        return failure

    def gone(self, failure: Failure) -> bool:
        """
        @return: whether a failed L{run} means that the child's process has
            ended or is ending (its death is reported through the pool's
            C{on_ended}), rather than that its answer was bad.
        """
        return self.exited or failure.check(error.ConnectionDone, error.ConnectionLost) is not None

    def cancel(self, job_id: str) -> None:
        """Make C{cancelled()} true in the child for this job."""
        if self.state == "busy" and self.job_id == job_id:
            self.amp.callRemote(wire.CancelJob, job_id=job_id)

    def signal(self, name: str, reason: str | None = None) -> None:
        """
        Send C{SIG<name>} to the child and to every process of its group
        (what its job started), if it still runs, noting why.
        """
        if reason and self.kill_reason is None:
            self.kill_reason = reason
        if self.exited or self.pid is None:
            return
        if self._leads_group():
            try:
                os.killpg(self.pid, getattr(signal, f"SIG{name}"))
                return
            except ProcessLookupError:
                return
            except OSError:
                pass
        # Not (yet) in a group of its own: the child alone.
        try:
            self.transport.signalProcess(name)
        except (error.ProcessExitedAlready, AttributeError, OSError):
            pass

    def _leads_group(self) -> bool:
        # Until its first line has run the child is in the server's group.
        try:
            return os.getpgid(self.pid) == self.pid
        except OSError:
            return False

    def _kill_group(self) -> None:
        """SIGKILL what is left of the child's group once the child has exited."""
        # Its pid is not reused while the group still exists; the group's
        # id is the pid only if the child led it (else there is no such group).
        if self.pid is None:
            return
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except OSError:
            pass

    def retire(self) -> None:
        """Let the child exit on end of file of its command pipe."""
        self.state = "retiring"
        self.kill_reason = self.kill_reason or "retire"
        self.amp.transport.loseConnection()

    def rss_mb(self) -> float:
        """@return: the child's resident memory in MB (0 if unknown)."""
        try:
            with open(f"/proc/{self.pid}/statm") as f:
                pages = int(f.read().split()[1])
        except (OSError, ValueError, IndexError):
            return 0.0
        return pages * os.sysconf("SC_PAGE_SIZE") / (1024 * 1024)


def standby_ahead(max_jobs: int) -> int:
    """
    @return: how many jobs before C{max_jobs} a worker's standby successor
        is started (0: none, for limits below 100, where a spare process
        would be more surprising than useful).
    """
    if max_jobs < 100:
        return 0
    return min(50, max_jobs // 20)


def bounded_outcome(outcome: dict) -> dict:
    """@return: a job's outcome with its error text cut to L{MAX_ERROR}."""
    error_text = outcome.get("error")
    if isinstance(error_text, str) and len(error_text) > MAX_ERROR:
        outcome = dict(outcome, error=cut_text(error_text))
    return outcome


def describe_exit(value) -> str:
    """@return: how a process ended, in words: "killed by signal 9 (SIGKILL)", "exited with code 3"."""
    number = getattr(value, "signal", None)
    if number:
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = "unknown"
        return f"killed by signal {number} ({name})"
    code = getattr(value, "exitCode", None)
    return f"exited with code {code if code is not None else 0}"


class WorkerPool:
    """
    C{size} warm workers. The job service receives the pool's events
    through the callables it passes in.

    @param on_ready: C{(worker)}: a worker is free for a job.
    @param on_died: C{(worker, job_id, how)}: a worker running C{job_id} ended.
    @param on_progress: C{(job_id, current, total, message)}.
    """

    def __init__(
        self,
        reactor,
        size: int,
        settings_module: str,
        pythonpath: list[str],
        max_payload: int,
        env: dict,
        on_ready: Callable,
        on_died: Callable,
        on_progress: Callable,
    ):
        self.reactor = reactor
        self.size = size
        self.settings_module = settings_module
        self.pythonpath = pythonpath
        self.max_payload = max_payload
        self.env = env
        self._on_ready = on_ready
        self._on_died = on_died
        self._on_progress = on_progress
        self.workers: list[Worker] = []
        self.stopping = False
        self._count = 0
        self._failures = 0
        self._all_ended: list[defer.Deferred] = []
        self.started = 0

    def start(self) -> None:
        for _ in range(self.size):
            self.spawn()

    def spawn(self, standby: bool = False) -> Worker | None:
        """
        Start a child. A C{standby} one, once ready, waits (state
        C{standby}) until L{job_done} makes it take over from a worker
        that reached its job limit, so that replacing a worker costs no
        start-up time.
        """
        if self.stopping:
            return None
        self._count += 1
        worker = Worker(self, self._count, standby)
        args = [
            sys.executable,
            "-m",
            "twistedlrp.jobs.child",
            "--settings",
            self.settings_module,
            "--worker-id",
            str(self._count),
            "--max-payload",
            str(self.max_payload),
        ]
        for entry in self.pythonpath:
            args += ["--pythonpath", entry]
        env = dict(os.environ)
        env.update(self.env)
        env["PYTHONUNBUFFERED"] = "1"
        self.reactor.spawnProcess(
            worker,
            sys.executable,
            args,
            env=env,
            path=os.getcwd(),
            childFDs={0: "w", 1: "r", 2: "r", 3: "w", 4: "r"},
        )
        self.workers.append(worker)
        self.started += 1
        return worker

    def idle(self) -> list[Worker]:
        return [w for w in self.workers if w.state == "idle"]

    # -- events from workers --------------------------------------------------------

    def on_ready(self, worker: Worker) -> None:
        self._failures = 0
        log.debug("Worker {pid} ready", pid=worker.pid)
        if self.stopping:
            worker.retire()
            return
        if worker.standby:
            worker.state = "standby"
            return
        self._on_ready(worker)

    def on_progress(self, worker: Worker, job_id, current, total, message) -> None:
        if worker.job_id == job_id:
            self._on_progress(job_id, current, total, message)

    def on_ended(self, worker: Worker, how: str) -> None:
        if worker in self.workers:
            self.workers.remove(worker)
        job_id, worker.job_id = worker.job_id, None
        if job_id is not None:
            self._on_died(worker, job_id, how)
        if self.stopping:
            if not self.workers:
                waiting, self._all_ended = self._all_ended, []
                for d in waiting:
                    d.callback(None)
            return
        if worker.succeeded:
            return  # Its standby successor has taken its place already.
        if worker.standby:
            # A standby that ended before it took over: the worker it was
            # meant for is replaced the usual way when its time comes.
            log.warn("Standby worker {pid} {how}", pid=worker.pid, how=how)
            return
        if self._take_over(worker):
            if worker.kill_reason not in ("retire", "timeout", "cancel", "orphan"):
                log.warn(
                    "Worker {pid} {how}; its standby successor {successor} takes its place",
                    pid=worker.pid,
                    how=how,
                    successor=worker.successor.pid,
                )
            self._on_ready(worker.successor)
            return
        if worker.succeeded:
            return  # Its successor is still starting; it takes jobs once ready.
        if not worker.was_ready and worker.kill_reason is None:
            # It died before it was ready: something in the site or the
            # environment is wrong; do not spin.
            self._failures += 1
            delay = min(0.5 * 2 ** (self._failures - 1), _MAX_START_DELAY)
            log.error(
                "Worker {pid} {how} before it was ready; next attempt in {delay:.1f} s. "
                "Its output:\n{output}",
                pid=worker.pid,
                how=how,
                delay=delay,
                output=worker.startup_output() or "(none)",
            )
            self.reactor.callLater(delay, self.spawn)
        else:
            if worker.kill_reason not in ("retire", "timeout", "cancel", "orphan"):
                log.warn("Worker {pid} {how}; starting a replacement", pid=worker.pid, how=how)
            self.spawn()

    def job_done(self, worker: Worker, max_jobs: int, max_memory_mb: int) -> bool:
        """
        The worker's job ended normally: make it idle, or retire it. A
        worker close to C{max_jobs} gets a standby successor started, which
        takes its place when it retires.

        @return: whether a worker is available again (this one, or its
            successor).
        """
        worker.job_id = None
        worker.jobs_done += 1
        if worker.exited:
            return False
        ahead = standby_ahead(max_jobs)
        if (
            ahead
            and worker.successor is None
            and worker.jobs_done == max_jobs - ahead
            and not self.stopping
        ):
            worker.successor = self.spawn(standby=True)
        if self.stopping:
            worker.retire()
            return False
        if worker.broken:
            log.warn(
                "Worker {pid}: its answer could not be read ({reason}); replacing it",
                pid=worker.pid,
                reason=worker.broken,
            )
            worker.retire()
            return self._take_over(worker)
        if worker.jobs_done >= max_jobs:
            log.info("Worker {pid} ran {n} jobs: replacing it", pid=worker.pid, n=worker.jobs_done)
            worker.retire()
            return self._take_over(worker)
        if max_memory_mb:
            rss = worker.rss_mb()
            if rss > max_memory_mb:
                log.info(
                    "Worker {pid} uses {rss:.0f} MB (limit {limit} MB): replacing it",
                    pid=worker.pid,
                    rss=rss,
                    limit=max_memory_mb,
                )
                worker.retire()
                return self._take_over(worker)
        worker.state = "idle"
        return True

    def _take_over(self, worker: Worker) -> bool:
        """
        C{worker} retires: its standby successor, if it still lives, takes
        its place (at once when ready, else once ready).

        @return: whether the successor is idle now.
        """
        successor = worker.successor
        if (
            successor is None
            or successor not in self.workers
            or successor.state not in ("starting", "standby")
        ):
            return False
        worker.succeeded = True
        successor.standby = False
        if successor.state == "standby":
            successor.state = "idle"
            return True
        return False

    # -- stopping ---------------------------------------------------------------------

    def stop_idle(self) -> None:
        """Stop taking work: idle and starting workers exit; busy ones finish first."""
        self.stopping = True
        for worker in list(self.workers):
            if worker.state in ("idle", "starting", "standby"):
                worker.retire()

    def kill_all(self, reason: str = "shutdown") -> None:
        """SIGKILL every child, and every process of its group, at once."""
        for worker in list(self.workers):
            worker.signal("KILL", reason)

    def when_all_ended(self) -> defer.Deferred:
        """@return: a Deferred that fires when no child is left."""
        if not self.workers:
            return defer.succeed(None)
        d = defer.Deferred()
        self._all_ended.append(d)
        return d

    def describe(self) -> list[dict]:
        return [
            {"pid": w.pid, "state": w.state, "job": w.job_id, "jobs_done": w.jobs_done}
            for w in self.workers
        ]
