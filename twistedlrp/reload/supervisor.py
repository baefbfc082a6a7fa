"""
What C{twistd lrp --reload} runs instead of the server, never importing
Django or the site. It binds the C{--listen} sockets once and passes them to
each server it starts, so a request sent during a restart waits in the backlog.

A change of templates only reloads them. Any other change starts a new
server, warmed up ahead as a spare; once it has set Django up the old one is
stopped and the new one runs. If the new code fails, the old server keeps
serving until the next change: it never loops.
"""

from __future__ import annotations

import os
import signal
import sys
import time

from twisted.application import service
from twisted.internet import defer, protocol
from twisted.logger import Logger

from twistedlrp.ordered_service import Waiters, cancel_call
from twistedlrp.process.channel import Channel, spawn
from twistedlrp.process.exits import Exit
from twistedlrp.process.supervise import child_environment, send_signal, stop_within
from twistedlrp.reload.errorpage import ErrorPage
from twistedlrp.reload.server_main import CONTROL_VARIABLE, SPARE_VARIABLE
from twistedlrp.reload.templates import describe_changes
from twistedlrp.reload.watcher import make_watcher
from twistedlrp.signals import StopSignals
from twistedlrp.web.ports import adoptable, bind

log = Logger(namespace="twistedlrp.reload")

# Changes closer together than this make one restart.
DEBOUNCE = 0.05
_FIRST_LISTEN_FD = 3


def make_supervisor(options) -> ReloadSupervisor:
    """@raise SystemExit: a listening socket cannot be bound (one line, exit code 1)."""
    from twisted.internet import reactor

    if os.name != "posix":
        raise SystemExit("twistd lrp: error: --reload needs a POSIX system (process groups)")
    listening, passed_through = [], []
    # A job node serves no HTTP: nothing to bind.
    endpoints = [] if options["jobs-only"] else options["listen"]
    for endpoint in endpoints:
        if not adoptable(endpoint):
            passed_through.append(endpoint)
            continue
        try:
            listening.append(bind(reactor, endpoint))
        except Exception as e:
            raise SystemExit(f"twistd lrp: error: cannot listen on {endpoint}: {e}") from None
    return ReloadSupervisor(options, listening, passed_through, reactor)


def child_arguments(options, listening, passed_through) -> list[str]:
    """
    @return: a server's C{twistd lrp} arguments: the command line's, C{--config} (re-read at
        each restart), and C{--listen} adopting our sockets (index N: descriptor 3 + N) or
        binding again those we could not bind.
    """
    args = options.to_argv(exclude={"reload", "listen", "config"})
    if options["config"]:
        args.append(f"--config={options['config']}")
    for index, sock in enumerate(listening):
        args.append(f"--listen=systemd:domain={sock.domain}:index={index}")
    args += [f"--listen={endpoint}" for endpoint in passed_through]
    return args


class ServerProcess(protocol.ProcessProtocol):
    """C{state}: spare (waits to boot), booting, gated (waits to run), serving, stopping, ended."""

    def __init__(self, supervisor, number: int, spare: bool = False):
        self.supervisor, self.number = supervisor, number
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


class ReloadSupervisor(service.Service):
    name = "lrp-reload"

    def __init__(self, options, listening, passed_through, reactor):
        self.options, self.listening, self.reactor = options, listening, reactor
        self.passed_through = passed_through
        self.graceful_timeout = options["graceful-timeout"]
        # Serving; booting (to replace it); warming up for the next restart.
        self.current = self.pending = self.spare = None
        self._spares_work = True
        self.retiring: list[ServerProcess] = []
        self.children: list[ServerProcess] = []
        self.count = self.promoted = 0
        self.stopping = False
        self._debounce = None
        self._changes: set[str] = set()
        self.stop_signals = StopSignals(self.reactor, self._first_signal, self._second_signal)
        self._devnull = os.open(os.devnull, os.O_RDONLY)
        self.error_page = ErrorPage(reactor, listening)
        roots = [os.getcwd(), *options["pythonpath"]]
        self.watcher = make_watcher(reactor, roots, self._changed)
        if options["config"]:
            self.watcher.add_files([options["config"]])

    def startService(self):
        super().startService()
        self.reactor.callWhenRunning(self._begin)

    def _begin(self) -> None:
        self.stop_signals.install()
        self.watcher.start()
        addresses = ", ".join(s.address for s in self.listening) or "no adopted socket"
        log.info(
            "Reload supervisor (pid {pid}) on {addresses}, watching {watching}; "
            "Django loaded in the supervisor: {django}",
            pid=os.getpid(),
            addresses=addresses,
            watching=self.watcher.describe(),
            django="django" in sys.modules,
        )
        for endpoint in self.passed_through:
            log.warn(
                "--listen {endpoint}: cannot be passed on; each server binds it again, "
                "so it refuses connections while the server restarts",
                endpoint=endpoint,
            )
        self._spawn()

    def stopService(self):
        super().stopService()
        return defer.ensureDeferred(self._stop())

    async def _stop(self) -> None:
        self.stopping = True
        cancel_call(self._debounce)
        await self.watcher.stop()
        for child in (self.pending, self.spare):
            if child is not None:
                self._abandon(child)
        serving = [c for c in self.children if c.state in ("serving", "stopping")]
        stops = [defer.ensureDeferred(self._retire(c)) for c in self.children if c.state != "ended"]
        self.current = None
        if serving:
            log.info("Stopping the server (up to {timeout:g} s)", timeout=self.graceful_timeout)
        await defer.gatherResults(stops, consumeErrors=True)
        for child in self.children:
            child.kill_group()
        await self.error_page.stop()
        for sock in self.listening:
            try:
                await sock.close()
            except Exception:
                log.failure("Closing {endpoint}", endpoint=sock.endpoint)
        os.close(self._devnull)
        log.info("Reload supervisor stopped")

    def _first_signal(self, name: str) -> None:
        log.info(
            "Received {signal}: stopping the server and the supervisor; "
            "send it again to kill them at once.",
            signal=name,
        )

    def _second_signal(self, name: str) -> None:
        for child in self.children:
            child.kill_group()
        os.write(2, f"twistd lrp --reload: second {name}: killed the server\n".encode())
        os._exit(1)

    def _spawn(self, spare: bool = False) -> None:
        if self.stopping:
            return
        self.count += 1
        n = len(self.listening)
        control_fd = _FIRST_LISTEN_FD + n
        child = ServerProcess(self, self.count, spare=spare)
        fds = {_FIRST_LISTEN_FD + index: sock.fileno() for index, sock in enumerate(self.listening)}
        fds.update({0: self._devnull, 1: 1, 2: 2})
        env = child_environment()
        if n:
            env["LISTEN_FDS"] = str(n)
            env["LISTEN_FDNAMES"] = ":".join(f"lrp{i}" for i in range(n))
        env[CONTROL_VARIABLE] = str(control_fd)
        if spare:
            env[SPARE_VARIABLE] = "1"
            self.spare = child
        else:
            self.pending = child
        args = [sys.executable, "-m", "twistedlrp.reload.server_main"]
        args += child_arguments(self.options, self.listening, self.passed_through)
        self.children.append(child)
        spawn(self.reactor, child, child.channel, args, env, fds, control_fd)

    def _ensure_spare(self) -> None:
        """Have a spare ready for the next restart, while nothing boots."""
        if self._spares_work and self.spare is None and self.pending is None:
            self._spawn(spare=True)

    def child_reported(self, child: ServerProcess, message: dict) -> None:
        event = message.get("event")
        if event == "spare":
            child.files = set(message.get("files", []))
            if child.files & child.changes_seen and not child.abandoned:
                was_pending = child is self.pending
                self._abandon(child)
                if was_pending:
                    # It was told to boot already: start from scratch instead.
                    self._spawn()
            return
        files = list(message.get("files", [])) + list(message.get("extra", []))
        self.watcher.add_files(files)
        if child.abandoned:
            return
        if event == "booted" and child is self.pending:
            child.template_dirs = list(message.get("template_dirs", []))
            child.state = "gated"
            child.booted_after = time.monotonic() - child.started_at
            defer.ensureDeferred(self._promote(child)).addErrback(
                lambda f: log.failure("Starting the new server failed", f)
            )
        elif event == "failed":
            child.error = message.get("error") or "unknown error"

    async def _promote(self, child: ServerProcess) -> None:
        old = self.current
        if old is not None:
            self.current = None
            self.retiring.append(old)
            await self._retire(old)

        def superseded() -> bool:
            return child is not self.pending or self.stopping or child.state != "gated"

        await defer.gatherResults([c.when_ended() for c in self.retiring])
        if superseded():
            return
        await self.error_page.stop()
        if superseded():
            return
        self.pending = None
        self.current = child
        before = self.watcher.template_dirs
        self.watcher.set_template_dirs(child.template_dirs)
        if self.watcher.template_dirs != before:
            log.info(
                "Watching {count} template directories: a template change reloads the "
                "templates, not the server",
                count=len(self.watcher.template_dirs),
            )
        child.let_run()
        self._ensure_spare()
        took = time.monotonic() - child.started_at
        self.promoted += 1
        if self.promoted > 1:
            log.info(
                "Server {number} (pid {pid}) set up Django in {booted:.2f} s; the previous "
                "server was gone {took:.2f} s after the restart began",
                number=child.number,
                pid=child.pid,
                booted=child.booted_after,
                took=took,
            )

    async def _retire(self, child: ServerProcess) -> None:
        # SIGTERM once (a second stops a server at once), then SIGKILL to the group.
        first = child.state not in ("ended", "stopping")
        if first:
            child.state = "stopping"

        def send(number):
            if number == signal.SIGKILL:
                child.kill_group()
            elif first:
                child.signal_leader(number)

        def late():
            message = "Server {n} (pid {pid}) did not stop within {timeout:g} s: killing its "
            message += "process group"
            log.warn(message, n=child.number, pid=child.pid, timeout=self.graceful_timeout)

        await stop_within(self.reactor, child.when_ended(), send, self.graceful_timeout, late)
        child.kill_group()  # job workers still winding down
        if child in self.retiring:
            self.retiring.remove(child)

    def _abandon(self, child: ServerProcess) -> None:
        child.abandoned = True
        if self.pending is child:
            self.pending = None
        if self.spare is child:
            self.spare = None
        child.kill_group()

    def child_ended(self, child: ServerProcess, exit: Exit) -> None:
        if child in self.children:
            self.children.remove(child)
        if child is self.spare:
            self.spare = None
            if not child.abandoned and not self.stopping:
                # Never loop: without spares, restarts start from scratch.
                self._spares_work = False
                log.warn(
                    "A spare server process ended ({how}); restarts no longer use spares",
                    how=exit.status(),
                )
            return
        if child.abandoned or self.stopping or child in self.retiring:
            return
        how = exit.status()
        if child is self.pending:
            self.pending = None
            reason = next(iter((child.error or "").strip().splitlines()), how)
            if self.current is not None:
                log.error(
                    "The changed code failed to start ({reason}); the previous server "
                    "keeps serving. Fix the error and save: the server restarts then.",
                    reason=reason,
                )
            else:
                log.error(
                    "The server failed to start ({reason}). Fix the error and save: "
                    "the server starts then.",
                    reason=reason,
                )
                self.error_page.start(child.error or f"The server ended with {how}.")
            self._ensure_spare()
        elif child is self.current:
            self.current = None
            log.error(
                "The server stopped ({how}). It restarts when a watched file changes.", how=how
            )
            self.error_page.start(
                f"{child.error or ''}\nThe server stopped with {how}; see the log."
            )
            self._ensure_spare()
        child.kill_group()

    def _changed(self, paths: list[str]) -> None:
        if self.stopping:
            return
        self._changes.update(paths)
        spare = self.spare
        if spare is not None:
            spare.changes_seen.update(paths)
            if spare.files is not None and spare.files & spare.changes_seen:
                self._abandon(spare)  # It imported the old version of a changed file.
        if self._debounce is not None and self._debounce.active():
            self._debounce.reset(DEBOUNCE)
        else:
            self._debounce = self.reactor.callLater(DEBOUNCE, self._restart)

    def _restart(self) -> None:
        changes, self._changes = sorted(self._changes), set()
        if self.stopping or not changes:
            return
        # Only templates changed: reload them, if a server runs or starts.
        serving = [child for child in (self.current, self.pending) if child is not None]
        if serving and all(self.watcher.is_template(path) for path in changes):
            for child in serving:
                child.reload_templates(changes)
            return
        log.info("{changes} changed: restarting the server", changes=describe_changes(changes))
        if self.pending is not None:
            self._abandon(self.pending)
        spare, self.spare = self.spare, None
        if spare is not None:
            # A spare still importing reads "boot" when it is done, and its
            # files are checked against the changes then.
            self.pending = spare
            spare.boot()
        else:
            self._spawn()
