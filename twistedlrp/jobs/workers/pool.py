"""The worker pool (L{WorkerPool}); how workers are replaced: docs/jobs.md, "Replacing workers"."""

from __future__ import annotations

import os
import sys

from twisted.internet import defer
from twisted.logger import Logger

from twistedlrp import logs, stdlog
from twistedlrp.jobs.workers import preload
from twistedlrp.jobs.workers.worker import Worker
from twistedlrp.ordered_service import Waiters
from twistedlrp.process.supervise import restart_backoff

log = Logger(namespace="twistedlrp.jobs.workers")
# A worker that ended for one of these reasons is replaced without a warning.
_KILLED_ON_PURPOSE = ("retire", "timeout", "cancel", "orphan", "fence")


def standby_ahead(max_jobs: int) -> int:
    """@return: how many jobs before C{max_jobs} a worker's standby successor is started (0: none)."""
    return 0 if max_jobs < 100 else min(50, max_jobs // 20)


class WorkerPool:
    """
    C{size} warm child processes (L{main}) that run one job at a time, each
    spawned or forked from the worker template (L{preload}) and driven by a
    L{Worker}. One that died before it was ready is replaced after a back-off.
    @param options: the server's (C{workers}, C{pythonpath}, C{max-job-payload},
        C{no-worker-template}).
    @param on_ready: C{(worker)}: a worker is free for a job.
    @param on_died: C{(worker, job_id, how)}: a worker running C{job_id} ended.
    @param on_progress: C{(job_id, current, total, message)}.
    """

    def __init__(
        self, reactor, options, settings_module: str, env: dict, on_ready, on_died, on_progress
    ):
        self.reactor, self.size, self.env = reactor, options["workers"], env
        self.pythonpath, self.max_payload = list(options["pythonpath"]), options["max-job-payload"]
        self.settings_module = settings_module
        self._on_ready, self._on_died, self._on_progress = on_ready, on_died, on_progress
        self.workers: list[Worker] = []
        self.stopping = False
        self._count = 0
        self._start_backoff = restart_backoff()
        self._all_ended = Waiters()
        self.started = self.forked = 0  # workers started; of those, forked from the template
        self.template: preload.WorkerTemplate | None = None
        # Off, or a template could not start: workers are spawned from then on.
        self._template_broken = options.get("no-worker-template", False)

    def start(self) -> None:
        for _ in range(self.size):
            self.spawn()

    def _child_command(self, worker_id: str) -> tuple[list[str], dict]:
        args = [sys.executable, "-m", "twistedlrp.jobs.workers.main", "--worker-id", worker_id]
        args += ["--settings", self.settings_module, "--max-payload", str(self.max_payload)]
        for entry in self.pythonpath:
            args += ["--pythonpath", entry]
        # The worker writes its stdlib records of this level up (twistedlrp.stdlog).
        env = {**os.environ, **self.env, "PYTHONUNBUFFERED": "1"}
        return args, env | {stdlog.LEVEL_VARIABLE: logs.level_name()}

    def spawn(self, standby: bool = False) -> Worker | None:
        """
        Start a child (a C{standby} one waits, once ready, until L{job_done} makes
        it take over). @return: its L{Worker}, or C{None} when the pool is stopping.
        """
        if self.stopping:
            return None
        self._count += 1
        worker = Worker(self, standby)
        if self.template is None or not self.template.fork_worker(worker, str(self._count)):
            args, env = self._child_command(str(self._count))
            fds = {0: "w", 1: "r", 2: "r", 3: "w", 4: "r"}
            self.reactor.spawnProcess(worker, args[0], args, env, os.getcwd(), childFDs=fds)
        self.workers.append(worker)
        self.started += 1
        return worker

    def start_template(self) -> None:
        if self.template or self._template_broken or self.stopping or not preload.supported():
            return
        args, env = self._child_command("template")
        started = preload.WorkerTemplate(self.reactor, self._template_ready, self._template_ended)
        try:
            started.start(args + ["--template"], env, os.getcwd())
        except OSError as e:
            self._template_broken = True
            log.error(
                "The worker template cannot be started ({e}); workers are started directly", e=e
            )
            return
        self.template = started

    def _template_ready(self, threads: list[str]) -> None:
        log.info(
            "Worker template {pid} ready: replacement workers are forked from it",
            pid=self.template.pid,
        )
        if threads:
            log.warn(
                "The worker template runs {n} thread(s) that setting Django up started "
                "({names}); workers forked from it do not have them. If jobs rely on "
                "them, start workers with --no-worker-template",
                n=len(threads),
                names=", ".join(threads[:10]),
            )

    def _template_ended(self, ended: preload.WorkerTemplate, exit) -> None:
        if self.template is ended:
            self.template = None
        if self.stopping:
            return
        if not ended.was_ready:
            self._template_broken = True
            log.error(
                "The worker template {how} before it was ready; workers are started "
                "directly from now on. Its output:\n{output}",
                how=str(exit),
                output=ended.output() or "(none)",
            )
        else:
            log.warn(
                "The worker template {how}; it is started again when a worker nears its limit",
                how=str(exit),
            )

    def idle(self) -> list[Worker]:
        return [w for w in self.workers if w.state == "idle"]

    def on_ready(self, worker: Worker) -> None:
        self._start_backoff.reset()
        log.debug("Worker {pid} ready", pid=worker.pid)
        if self.stopping:
            worker.retire()
            return
        if worker.standby:
            worker.state = "standby"
            return
        self._on_ready(worker)

    def on_forked(self, worker: Worker) -> None:
        self.forked += 1
        log.debug("Worker {pid} forked from the template", pid=worker.pid)

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
                if self.template:
                    self.template.close()
                self._all_ended.fire()
            return
        if worker.standby:  # it ended before it took over: its worker is replaced as usual
            log.warn("Standby worker {pid} {how}", pid=worker.pid or "(no process)", how=how)
            return
        if self._take_over(worker):
            if worker.kill_reason not in _KILLED_ON_PURPOSE:
                log.warn(
                    "Worker {pid} {how}; its standby successor {successor} takes its place",
                    pid=worker.pid,
                    how=how,
                    successor=worker.successor.pid,
                )
            self._on_ready(worker.successor)
        elif worker.succeeded:  # its successor has taken its place, or will once ready
            return
        elif worker.pid is None:
            log.info("A worker {how}: starting it directly", how=how)
            self.spawn()
        elif not worker.was_ready and worker.kill_reason is None:
            # Something in the site or the environment is wrong: do not spin.
            delay = self._start_backoff.next()
            log.error(
                "Worker {pid} {how} before it was ready; next attempt in {delay:.1f} s. "
                "Its output:\n{output}",
                pid=worker.pid,
                how=how,
                delay=delay,
                output=worker.startup_output.decode("utf-8", "replace").strip() or "(none)",
            )
            self.reactor.callLater(delay, self.spawn)
        else:
            if worker.kill_reason not in _KILLED_ON_PURPOSE:
                log.warn("Worker {pid} {how}; starting a replacement", pid=worker.pid, how=how)
            self.spawn()

    def job_done(self, worker: Worker, max_jobs: int, max_memory_mb: int) -> bool:
        """
        The worker's job ended normally: make it idle, or retire it.
        @return: whether a worker is available again (this one, or its successor).
        """
        worker.job_id = None
        worker.jobs_done += 1
        if worker.exited:
            return False
        ahead = standby_ahead(max_jobs)
        # The template starts twice as many jobs ahead as the standby successor.
        early = min(max_jobs - 1, 2 * ahead) if ahead and preload.supported() else 0
        if early and worker.jobs_done == max_jobs - early and self.template is None:
            self.start_template()
        if ahead and worker.successor is None and worker.jobs_done == max_jobs - ahead:
            worker.successor = self.spawn(standby=True)  # None when stopping
        if self.stopping:
            worker.retire()
            return False
        if worker.broken:
            log.warn(
                "Worker {pid}: its answer could not be read ({reason}); replacing it",
                pid=worker.pid,
                reason=worker.broken,
            )
        elif worker.jobs_done >= max_jobs:
            log.info("Worker {pid} ran {n} jobs: replacing it", pid=worker.pid, n=worker.jobs_done)
        elif max_memory_mb and (rss := worker.rss_mb()) > max_memory_mb:
            self.start_template()  # replacements are forked from now on
            log.info(
                "Worker {pid} uses {rss:.0f} MB (limit {limit} MB): replacing it",
                pid=worker.pid,
                rss=rss,
                limit=max_memory_mb,
            )
        else:
            worker.state = "idle"
            return True
        worker.retire()
        return self._take_over(worker)

    def _take_over(self, worker: Worker) -> bool:
        """C{worker} retires: its live standby successor takes its place; @return: idle now?"""
        successor = worker.successor  # (None is not among the workers)
        if successor not in self.workers or successor.state not in ("starting", "standby"):
            return False
        worker.succeeded = True
        successor.standby = False
        if successor.state == "standby":
            successor.state = "idle"
        return successor.state == "idle"

    def stop_idle(self) -> None:
        """Stop taking work: idle and starting workers exit; busy ones finish first."""
        self.stopping = True
        for worker in list(self.workers):
            if worker.state in ("idle", "starting", "standby"):
                worker.retire()
        if not self.workers and self.template:
            self.template.close()

    def kill_all(self, reason: str = "shutdown") -> None:
        """SIGKILL every child, and every process of its group, at once."""
        for worker in list(self.workers):
            worker.signal("KILL", reason)

    def when_all_ended(self) -> defer.Deferred:
        return self._all_ended.wait() if self.workers else defer.succeed(None)

    def describe_template(self) -> dict | None:
        template = self.template
        return template and {"pid": template.pid, "state": template.state}

    def describe(self) -> list[dict]:
        return [
            {"pid": w.pid, "state": w.state, "job": w.job_id, "jobs_done": w.jobs_done}
            for w in self.workers
        ]
