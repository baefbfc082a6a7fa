"""
The web processes of C{--web-workers N}, seen from the main process: it binds
the C{--listen} sockets, spawns the template (L{twistedlrp.web.preload}) that
forks one web process per slot, and restarts with back-off either when it ends.
A template's web processes outlive it unreaped: the end of a web process's
channel is then its end, its exit status lost.
"""

from __future__ import annotations

import os
import signal
import socket
import sys

from twisted.application import service
from twisted.internet import defer, task
from twisted.logger import Logger

from twistedlrp import metrics
from twistedlrp.ordered_service import StartupFailed, cancel_call
from twistedlrp.process.channel import Channel, adopt
from twistedlrp.process.exits import Exit
from twistedlrp.process.forkserver import ForkServerProcess
from twistedlrp.process.supervise import (
    child_environment,
    ended_within,
    restart_backoff,
    restart_delay,
    send_signal,
    stop_within,
)
from twistedlrp.web.slot import Slot, how_ended, listening_socket, pass_on

log = Logger(namespace="twistedlrp.web")

BROADCAST_INTERVAL = 1.0
MAX_TEMPLATE_FAILURES = 5  # in a row (before ready, or within RESET_AFTER): the server stops
_FIRST_FD = 3
_STATUS_LOST = "ended (its exit status went with its template)"  # its reaper is gone


class WebProcesses(service.Service):
    """
    @param job_service: this process's job service, which the web processes'
        job clients reach (C{None}: they use C{--jobs-connect} or the settings).
    @param on_fatal: called with an error message when templates keep failing.
    """

    name = "web-processes"
    stop_description = "stopping the web processes"

    def __init__(self, reactor, options, jobs_health=None, job_service=None, on_fatal=None):
        self.reactor, self.options, self.on_fatal = reactor, options, on_fatal
        self.jobs_health, self.job_service = jobs_health, job_service
        self.count = options["web-workers"]
        self.slots = [Slot(i) for i in range(self.count)]
        self.addresses: list[str] = []
        self._sockets: list[tuple[int, int]] = []  # (fd, family)
        self._closers: list = []
        self.template: ForkServerProcess | None = None
        self.template_ready: defer.Deferred | None = None
        self.template_backoff = restart_backoff()
        self._template_call = None
        self.jobs_connect: list[str] | None = None
        self.started = self.stopping = False
        self._broadcast = task.LoopingCall(self.broadcast)

    def startService(self) -> defer.Deferred:
        super().startService()
        return defer.ensureDeferred(self._start())

    async def _start(self) -> None:
        for endpoint in self.options["listen"]:
            try:
                fd, family, address, close = listening_socket(self.reactor, endpoint)
            except Exception as e:
                raise StartupFailed(f"cannot listen on {endpoint}: {e}") from e
            self._sockets.append((fd, family))
            self.addresses.append(address)
            self._closers.append(close)
        if self.job_service is not None:
            self.jobs_connect = [await self.job_service.when_listening()]
        else:
            self.jobs_connect = list(self.options["jobs-connect"]) or None
        self.template_ready = defer.Deferred()
        self._spawn_template()
        ready = await self.template_ready
        if ready.get("preload"):
            log.info(
                "Web process template (pid {pid}) set Django up in {seconds:g} s; web "
                "processes fork from it and share its memory",
                **ready,
            )
        else:
            log.warn("Web processes cannot be forked from a warm template: {reason}", **ready)
        for slot in self.slots:
            self._fork(slot)
        await defer.gatherResults([slot.first_run for slot in self.slots], consumeErrors=True)
        self.started = True
        self._broadcast.start(BROADCAST_INTERVAL, now=True)

    def _spawn_template(self) -> None:
        # Its 1 and 2 are pipes to us; it hands our own 1 and 2 to the web
        # processes, which outlive its pipes.
        control_fd = _FIRST_FD + len(self._sockets)
        args = ["-m", "twistedlrp.web.process_main", "--template", f"--control-fd={control_fd}"]
        args.append(f"--output-fds={control_fd + 1},{control_fd + 2}")
        fds = {1: "r", 2: "r", control_fd + 1: 1, control_fd + 2: 2}
        for index, (fd, family) in enumerate(self._sockets, _FIRST_FD):
            fds[index] = fd
            args.append(f"--socket={index}:{int(family)}")
        lrp_args = self.options.to_argv(exclude={"listen", "config", "reload"}, include_file=True)
        template = ForkServerProcess(
            self.reactor, self._template_said, self._template_ended, pass_on
        )
        fds[0] = devnull = os.open(os.devnull, os.O_RDONLY)
        try:
            template.spawn(
                [sys.executable, *args, "--", *lrp_args], child_environment(), fds, control_fd
            )
        finally:
            os.close(devnull)
        self.template = template

    def _template_said(self, template: ForkServerProcess, message: dict) -> None:
        event = message.get("event")
        if event == "ready" and not self.template_ready.called:
            self.template_ready.callback(message)
        elif event == "ready":
            log.info("Web process template (pid {pid}) ready again in {seconds:g} s", **message)
            for slot in self.slots:
                if slot.state == "waiting" and slot.restart_call is None:
                    self._fork(slot)
        elif event == "failed" and not self.template_ready.called:
            error = ((message.get("error") or "").strip().splitlines() or ["unknown error"])[-1]
            self.template_ready.errback(
                StartupFailed(f"the web process template could not set Django up: {error}")
            )
        elif event == "forked":
            slot = self.slots[message["index"]]
            if slot.pending_fork is template:
                slot.forked(template, message["pid"], self.reactor.seconds())
        elif event == "exited":
            slot = self.slots[message["index"]]
            if slot.pid == message["pid"]:
                self._slot_ended(slot, message.get("code"), message.get("signal"))

    def _template_ended(self, template: ForkServerProcess, exit: Exit) -> None:
        if template is not self.template:
            return
        self.template = None
        how = exit.status()
        for slot in self.slots:
            if slot.pending_fork is template:
                slot.not_forked()
            elif slot.parent is template and slot.channel is None:
                # Its channel closed, and no exit status came before the template died.
                self._slot_ended(slot, None, None, _STATUS_LOST)
        if self.stopping:
            return
        if not self.started:
            when = (
                "while the web processes started" if template.was_ready else "before it was ready"
            )
            error = StartupFailed(f"the web process template ended ({how}) {when}")
            if not self.template_ready.called:
                self.template_ready.errback(error)
            elif template.was_ready:
                for slot in self.slots:
                    if not slot.first_run.called:
                        slot.first_run.errback(error)
            return
        self._template_down(template, how, self.reactor.seconds() - template.started_at)

    def _template_down(self, template: ForkServerProcess | None, how: str, ran: float) -> None:
        """The template ended (or could not be spawned): start another, or give up."""
        ready = template is not None and template.was_ready
        delay = restart_delay(self.template_backoff, ran if ready else 0.0)
        failures = self.template_backoff.failures
        pid, output = (template.pid, template.output()) if template is not None else (None, "")
        details = {"pid": pid, "how": how, "output": output or "(none)"}
        if failures < MAX_TEMPLATE_FAILURES:
            log.error(
                "The web process template (pid {pid}) ended ({how}) after {ran:.1f} s; the web "
                "processes keep serving; starting a new template in {delay:g} s. Its last "
                "output:\n{output}",
                ran=ran,
                delay=delay,
                **details,
            )
            self._template_call = self.reactor.callLater(delay, self._restart_template)
            return
        when = "" if ready else ", before it was ready"
        log.critical(
            "The web process template failed {count} times in a row (the last one, pid "
            "{pid}: {how}{when}): stopping the server with exit status 1. Its last "
            "output:\n{output}",
            count=failures,
            when=when,
            **details,
        )
        if self.on_fatal is not None:
            self.on_fatal(
                f"the web process template failed {failures} times in a row (the last one: "
                f"{how}{when}): stopping the server"
            )

    def _restart_template(self) -> None:
        self._template_call = None
        if self.stopping:
            return
        try:
            self._spawn_template()
        except Exception as e:
            self._template_down(None, f"it could not be started: {e}", 0.0)

    def _fork(self, slot: Slot) -> None:
        slot.restart_call = None
        if self.stopping:
            return
        template = self.template
        if template is None or template.state != "ready":
            slot.state = "waiting"
            log.info(
                "Web process {index} is started once the web process template is ready",
                index=slot.index,
            )
            return
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        channel = Channel(
            lambda message: self._web_said(slot, channel, message),
            lambda reason: self._channel_lost(slot, channel),
        )
        # Unsent or unanswered, it is asked of the next template.
        slot.start(template, channel)
        adopt(self.reactor, ours, channel)
        template.fork({"index": slot.index, "jobs_connect": self.jobs_connect}, [theirs.detach()])

    def _web_said(self, slot: Slot, channel: Channel, message: dict) -> None:
        if message.get("event") != "status" or channel is not slot.channel:
            return
        if not slot.received(message):  # not newly running
            return
        if not slot.first_run.called:
            slot.first_run.callback(None)
        elif slot.restarts:
            log.info(
                "Web process {index} (pid {pid}) running again", index=slot.index, pid=slot.pid
            )
        self.broadcast()

    def _channel_lost(self, slot: Slot, channel: Channel) -> None:
        if channel is not slot.channel:
            return
        slot.channel = None
        if slot.parent is not None and slot.parent.state == "ended":
            # Forked by a template that is gone: nobody reaps it.
            self._slot_ended(slot, None, None, _STATUS_LOST)

    def _slot_ended(self, slot: Slot, code, signal_number, how: str | None = None) -> None:
        """C{slot}'s web process ended, with this status, or C{how} when its status is lost."""
        if slot.state in ("ended", "waiting"):
            return
        status = how_ended(code, signal_number) if how is None else how
        how = f"exited ({status})" if how is None else how
        ran = self.reactor.seconds() - slot.started_at
        slot.state = "ended"
        if metrics.current is not None and slot.pid is not None:
            metrics.current.process_ended(slot.pid)  # its gauges no longer count
        slot.ended.fire()
        if self.stopping:
            return
        if not slot.first_run.called:
            slot.first_run.errback(
                StartupFailed(
                    f"web process {slot.index} (pid {slot.pid}) failed to start ({status})"
                )
            )
            return
        delay = restart_delay(slot.backoff, ran)
        slot.restarts += 1
        log.warn(
            "Web process {index} (pid {pid}) {how} after {ran:.1f} s; restarting it in {delay:g} s",
            index=slot.index,
            pid=slot.pid,
            how=how,
            ran=ran,
            delay=delay,
        )
        slot.state = "waiting"
        slot.restart_call = self.reactor.callLater(delay, self._fork, slot)
        self.broadcast()

    def broadcast(self) -> None:
        """Tell every web process about all of them (and the job service's health)."""
        message = {"event": "workers", "main_pid": os.getpid(), "workers": self.health()}
        if self.jobs_health is not None:
            try:
                message["jobs"] = self.jobs_health()
            except Exception as e:
                message["jobs"] = {"healthy": False, "error": str(e)}
        for slot in self.slots:
            if slot.channel is not None:
                slot.channel.send(message)

    def reload_templates(self) -> int:
        """Have everyone reset their template loaders: @return: how many web processes were told."""
        channels = [slot.channel for slot in self.slots if slot.channel is not None]
        told = sum(1 for channel in channels if channel.send({"event": "templates"}))
        if self.template is not None:
            self.template.send({"op": "templates"})
        return told

    def health(self) -> list[dict]:
        now = self.reactor.seconds()
        return [slot.describe(now) for slot in self.slots]

    def stop_by(self, deadline: float) -> defer.Deferred:
        super().stopService()
        self.stopping = True
        return defer.ensureDeferred(self._stop(deadline))

    async def _stop(self, deadline: float) -> None:
        if self._broadcast.running:
            self._broadcast.stop()
        cancel_call(self._template_call)
        for slot in self.slots:
            cancel_call(slot.restart_call)
            if slot.state == "waiting":
                slot.state = "ended"

        def late():
            pids = [str(slot.pid) for slot in self.slots if slot.pid and slot.state != "ended"]
            log.warn(
                "{count} web process(es) did not stop within the graceful timeout: killing {pids}",
                count=len(pids),
                pids=", ".join(pids),
            )

        await stop_within(
            self.reactor,
            defer.gatherResults([slot.when_ended() for slot in self.slots]),
            self._signal_all,
            max(deadline - self.reactor.seconds(), 0.05),
            late,
            after_kill=5.0,
        )
        template = self.template
        if template is not None:
            template.close()
            if not await ended_within(self.reactor, template.ended, 5.0):
                self.force_exit()
        for close in self._closers:
            try:
                await defer.maybeDeferred(close)
            except Exception:
                log.failure("Closing a listening socket")
        self._closers = []

    def _signal_all(self, number: int) -> None:
        for slot in self.slots:
            if slot.state != "ended":
                send_signal(slot.pid, number)

    def force_exit(self) -> None:
        """SIGKILL every web process and the template (a second signal)."""
        self._signal_all(signal.SIGKILL)
        if self.template is not None:
            self.template.kill()
