"""
The web processes of C{--web-workers N} (N above 1), seen from the main
process: the last child of L{twistedlrp.server.LRPServer} in its C{"main"}
role, in the place of the listening site.

Starting it (start-up step 5, once the job service and the C{once} hooks
ran) binds the C{--listen} sockets (or takes the C{systemd:} ones the main
process inherited), spawns the template (L{twistedlrp.web.child}), which
sets Django up and forks one web process per slot on request, and waits
until every web process runs (its plain hooks done, its sockets adopted).
A web process that fails before it first runs fails the start-up.

Later, a web process that ends is forked again after a back-off (0.5 s,
doubling up to 30 s, back to 0.5 s once one ran for 10 s), and the reason is
logged. Each web process sends its status every second over its channel (a
socket pair, one end passed to the template with C{SCM_RIGHTS}); the main
process sends every web process the list of them all and its job service's
health section, which their health endpoints show.

Stopping it (shut-down step 1) sends SIGTERM to every web process, which
drains; the ones left at the graceful deadline get SIGKILL; then the
template's control socket is closed (it exits) and the sockets are closed.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys

from twisted.application import service
from twisted.internet import defer, fdesc, task
from twisted.logger import Logger

from twistedlrp import metrics
from twistedlrp.services import StartupFailed, within
from twistedlrp.web import ports
from twistedlrp.web.slot import (
    FIRST_DELAY,
    MAX_DELAY,
    Lines,
    Slot,
    TemplateProcess,
    adopt_connection,
    how_ended,
)

log = Logger(namespace="twistedlrp.web")

# A web process that ran this long resets the back-off.
RESET_AFTER = 10.0
BROADCAST_INTERVAL = 1.0
_FIRST_FD = 3


class WebProcesses(service.Service):
    """
    @param jobs_health: the job service's health section (or C{None}).
    @param job_service: this process's job service, whose endpoint the web
        processes' job clients connect to (C{None}: they use
        C{--jobs-connect} or the settings, as this process does).
    """

    name = "web-processes"
    stop_description = "stopping the web processes"

    def __init__(self, reactor, options, jobs_health=None, job_service=None):
        self.reactor = reactor
        self.options = options
        self.count = options["web-workers"]
        self.jobs_health = jobs_health
        self.job_service = job_service
        self.slots = [Slot(i) for i in range(self.count)]
        self.addresses: list[str] = []
        self._sockets: list[tuple[int, int]] = []  # (fd, family)
        self._closers: list = []
        self.template: TemplateProcess | None = None
        self.control: Lines | None = None
        self.template_ready: defer.Deferred | None = None
        self.preload: bool | None = None
        self.jobs_connect: str | None = None
        self.stopping = False
        self._broadcast = task.LoopingCall(self.broadcast)

    # -- start ----------------------------------------------------------

    def startService(self) -> defer.Deferred:
        super().startService()
        return defer.ensureDeferred(self._start())

    async def _start(self) -> None:
        self._open_sockets()
        if self.job_service is not None:
            self.jobs_connect = await self.job_service.when_listening()
        else:
            self.jobs_connect = self.options["jobs-connect"]
        self._spawn_template()
        ready = await self.template_ready
        self.preload = ready.get("preload")
        if self.preload:
            log.info(
                "Web process template (pid {pid}) set Django up in {seconds:g} s; web "
                "processes fork from it and share its memory",
                pid=ready.get("pid"),
                seconds=ready.get("seconds", 0),
            )
        else:
            log.warn(
                "Web processes cannot be forked from a warm template: {reason}",
                reason=ready.get("reason"),
            )
        for slot in self.slots:
            self._fork(slot)
        await defer.gatherResults([slot.first_run for slot in self.slots], consumeErrors=True)
        self._broadcast.start(BROADCAST_INTERVAL, now=True)

    def _open_sockets(self) -> None:
        from twisted.internet.endpoints import AdoptedStreamServerEndpoint, serverFromString

        for endpoint in self.options["listen"]:
            try:
                server = serverFromString(self.reactor, endpoint)
                if isinstance(server, AdoptedStreamServerEndpoint):
                    fd, family = server.fileno, server.addressFamily
                    fdesc.setNonBlocking(fd)
                    with socket.socket(fileno=os.dup(fd)) as sock:
                        name = sock.getsockname()
                    self._closers.append(lambda fd=fd: os.close(fd))
                    if family == socket.AF_UNIX:
                        name = name.decode() if isinstance(name, bytes) else name
                        self.addresses.append(f"unix:{name}")
                    else:
                        self.addresses.append(f"http://{name[0]}:{name[1]}/")
                else:
                    held = ports.bind(self.reactor, endpoint)
                    fd, family = held.fileno(), held.port.socket.family
                    self._closers.append(held.close)
                    self.addresses.append(held.address)
            except Exception as e:
                raise StartupFailed(f"cannot listen on {endpoint}: {e}") from e
            self._sockets.append((fd, family))

    def _lrp_args(self) -> list[str]:
        return self.options.to_argv(exclude={"listen", "config", "reload"}, include_file=True)

    def _spawn_template(self) -> None:
        n = len(self._sockets)
        control_fd = _FIRST_FD + n
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        devnull = os.open(os.devnull, os.O_RDONLY)
        fds = {0: devnull, 1: 1, 2: 2, control_fd: theirs.fileno()}
        args = [sys.executable, "-m", "twistedlrp.web.child", "--template"]
        args.append(f"--control-fd={control_fd}")
        for index, (fd, family) in enumerate(self._sockets):
            fds[_FIRST_FD + index] = fd
            args.append(f"--socket={_FIRST_FD + index}:{int(family)}")
        env = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
        self.template_ready = defer.Deferred()
        self.template = TemplateProcess(self)
        try:
            self.reactor.spawnProcess(
                self.template,
                sys.executable,
                [*args, "--", *self._lrp_args()],
                env=env,
                childFDs=fds,
            )
        finally:
            theirs.close()
            os.close(devnull)
        self.control = Lines(self._template_said, self._control_lost)
        adopt_connection(self.reactor, ours, self.control)

    # -- the template's reports -------------------------------------------

    def _template_said(self, message: dict) -> None:
        event = message.get("event")
        if event == "ready":
            if not self.template_ready.called:
                self.template_ready.callback(message)
        elif event == "failed":
            if not self.template_ready.called:
                first = (message.get("error") or "").strip().splitlines()
                self.template_ready.errback(
                    StartupFailed(
                        "the web process template could not set Django up: "
                        + (first[-1] if first else "unknown error")
                    )
                )
        elif event == "forked":
            slot = self.slots[message["index"]]
            slot.pid = message["pid"]
            slot.started_at = self.reactor.seconds()
            if slot.peer is not None:
                slot.peer.close()
                slot.peer = None
        elif event == "exited":
            slot = self.slots[message["index"]]
            if slot.pid == message["pid"]:
                self._slot_ended(slot, message.get("code"), message.get("signal"))

    def _control_lost(self) -> None:
        self.control = None

    def template_ended(self, code, signal_number) -> None:
        how = how_ended(code, signal_number)
        if self.template_ready is not None and not self.template_ready.called:
            self.template_ready.errback(
                StartupFailed(f"the web process template ended ({how}) before it was ready")
            )
            return
        for slot in self.slots:
            if slot.pid is not None and slot.state != "ended":
                # Its children were reaped by nobody we hear from: end them.
                try:
                    os.kill(slot.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                self._slot_ended(slot, None, signal.SIGKILL)
        if not self.stopping:
            log.error("The web process template ended ({how}): stopping the server", how=how)
            if self.reactor.running:
                self.reactor.stop()

    # -- web processes --------------------------------------------------

    def _fork(self, slot: Slot) -> None:
        if self.stopping or self.control is None:
            return
        slot.restart_call = None
        slot.state = "starting"
        slot.status = {}
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        slot.peer = theirs
        slot.channel = Lines(
            lambda message, slot=slot: self._web_said(slot, message),
            lambda slot=slot: self._channel_lost(slot),
        )
        adopt_connection(self.reactor, ours, slot.channel)
        request = {"op": "fork", "index": slot.index, "jobs_connect": self.jobs_connect}
        self.control.transport.sendFileDescriptor(theirs.fileno())
        self.control.sendLine(json.dumps(request).encode())

    def _web_said(self, slot: Slot, message: dict) -> None:
        if message.get("event") != "status":
            return
        slot.status = message
        if message.get("state") == "running" and slot.state == "starting":
            slot.state = "running"
            if slot.first_run is not None and not slot.first_run.called:
                slot.first_run.callback(None)
            elif slot.restarts:
                log.info(
                    "Web process {index} (pid {pid}) running again",
                    index=slot.index,
                    pid=slot.pid,
                )
            self.broadcast()
        elif message.get("state") == "stopping" and slot.state == "running":
            slot.state = "stopping"

    def _channel_lost(self, slot: Slot) -> None:
        slot.channel = None

    def _slot_ended(self, slot: Slot, code, signal_number) -> None:
        if slot.state == "ended":
            return
        how = how_ended(code, signal_number)
        now = self.reactor.seconds()
        ran = now - slot.started_at
        slot.state = "ended"
        if metrics.current is not None and slot.pid is not None:
            metrics.current.process_ended(slot.pid)  # its gauges no longer count
        if slot.peer is not None:
            slot.peer.close()
            slot.peer = None
        slot.ended.fire()
        if self.stopping:
            return
        if slot.first_run is not None and not slot.first_run.called:
            slot.first_run.errback(
                StartupFailed(f"web process {slot.index} (pid {slot.pid}) failed to start ({how})")
            )
            return
        if ran >= RESET_AFTER:
            slot.delay = FIRST_DELAY
        delay = slot.delay
        slot.delay = min(delay * 2, MAX_DELAY)
        slot.restarts += 1
        log.warn(
            "Web process {index} (pid {pid}) exited ({how}) after {ran:.1f} s; restarting it "
            "in {delay:g} s",
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
        now = self.reactor.seconds()
        message = {
            "event": "workers",
            "main_pid": os.getpid(),
            "workers": [slot.describe(now) for slot in self.slots],
        }
        if self.jobs_health is not None:
            try:
                message["jobs"] = self.jobs_health()
            except Exception as e:
                message["jobs"] = {"healthy": False, "error": str(e)}
        line = json.dumps(message).encode()
        for slot in self.slots:
            if slot.channel is not None and slot.channel.transport is not None:
                slot.channel.sendLine(line)

    def reload_templates(self) -> int:
        """
        Have every web process reset its template loaders (C{--reload}, a
        template changed), and the template too, so that a web process
        forked later starts without cached templates.

        @return: how many web processes were told.
        """
        line = json.dumps({"event": "templates"}).encode()
        told = 0
        for slot in self.slots:
            if slot.channel is not None and slot.channel.transport is not None:
                slot.channel.sendLine(line)
                told += 1
        if self.control is not None and self.control.transport is not None:
            self.control.sendLine(json.dumps({"op": "templates"}).encode())
        return told

    def health(self) -> list[dict]:
        now = self.reactor.seconds()
        return [slot.describe(now) for slot in self.slots]

    # -- stop -----------------------------------------------------------

    def stop_by(self, deadline: float) -> defer.Deferred:
        super().stopService()
        return defer.ensureDeferred(self._stop(deadline))

    async def _stop(self, deadline: float) -> None:
        self.stopping = True
        if self._broadcast.running:
            self._broadcast.stop()
        for slot in self.slots:
            if slot.restart_call is not None and slot.restart_call.active():
                slot.restart_call.cancel()
            if slot.state == "waiting":
                slot.state = "ended"
            self._signal(slot, signal.SIGTERM)
        left = max(deadline - self.reactor.seconds(), 0.05)
        waits = defer.gatherResults([slot.when_ended() for slot in self.slots])
        if not await within(self.reactor, waits, left):
            late = [slot for slot in self.slots if slot.pid and slot.state != "ended"]
            log.warn(
                "{count} web process(es) did not stop within the graceful timeout: killing {pids}",
                count=len(late),
                pids=", ".join(str(slot.pid) for slot in late),
            )
            for slot in late:
                self._signal(slot, signal.SIGKILL)
            waits = defer.gatherResults([slot.when_ended() for slot in self.slots])
            await within(self.reactor, waits, 5.0, "waiting for killed web processes")
        await self._end_template()
        for close in self._closers:
            try:
                await defer.maybeDeferred(close)
            except Exception:
                log.failure("Closing a listening socket")
        self._closers = []

    async def _end_template(self) -> None:
        if self.template is None:
            return
        if self.control is not None and self.control.transport is not None:
            self.control.transport.loseConnection()
        ended = self.template.ended
        if not ended.called:
            copy = defer.Deferred()
            ended.addBoth(lambda r: None if copy.called else copy.callback(None))
            if not await within(self.reactor, copy, 5.0):
                self.force_exit()

    def _signal(self, slot: Slot, number: int) -> None:
        if slot.pid is not None and slot.state not in ("ended",):
            try:
                os.kill(slot.pid, number)
            except (ProcessLookupError, PermissionError):
                pass

    def force_exit(self) -> None:
        """SIGKILL every web process and the template (a second signal)."""
        for slot in self.slots:
            self._signal(slot, signal.SIGKILL)
        if self.template is not None and self.template.transport is not None:
            try:
                self.template.transport.signalProcess("KILL")
            except Exception:
                pass
