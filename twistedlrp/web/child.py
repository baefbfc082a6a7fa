"""
The web processes of C{--web-workers N} (N above 1), seen from inside.

The main process (L{twistedlrp.web.processes.WebProcesses}) spawns one
I{template}::

    python -m twistedlrp.web.child --template --control-fd=K --socket=FD:FAMILY... -- LRP-ARGS

which parses the options, sets Django up (C{django.setup()}, the URLconf,
the WSGI application; the main process ran the system checks already) and
then waits on its control socket. For each C{fork} request (which carries
one end of a socket pair to the main process, its I{channel}) it forks a web
process, so that every web process shares the template's warm memory copy
on write (gunicorn's C{preload}). A forked web process installs a fresh
reactor, imports the site's C{lrp} modules and job modules, and runs
L{twistedlrp.server.LRPServer} in its C{"web"} role on the inherited
listening sockets. The template reports C{forked} and C{exited} (with the
exit status it reaped) to the main process, which restarts web processes.

A reactor must not run in a process that forks (the child would share its
epoll descriptor and waker). If setting Django up imported
C{twisted.internet.reactor} (a views module that imports it, directly or
through an C{lrp} module), the reactor is installed but never ran: each
forked web process gives it a new poller and waker (L{_refresh_reactor}).
When that cannot be done (L{_refreshable}), or with C{LRP_WEB_NO_PRELOAD}
set, the template says so, re-execs itself without Django (C{--bare}) and
execs each web process instead (C{--web}), which sets Django up itself: no
memory is shared.

The template ignores SIGINT and SIGTERM (a Ctrl-C on the terminal reaches
the whole process group; the main process decides); it ends when its control
socket closes, after its web processes have ended (those notice the end of
their own channel and stop gracefully; the ones still running at the
graceful timeout are killed).
"""

from __future__ import annotations

import gc
import json
import os
import selectors
import signal
import socket
import sys
import time
import traceback

from twisted.application import service
from twisted.internet import protocol
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver

log = Logger(namespace="twistedlrp.web")

MODULE = "twistedlrp.web.child"
# Imported by the template ahead of the forks (none imports the reactor), so
# that every web process shares them.
PREIMPORT = (
    "twisted.application.service",
    "twisted.internet.endpoints",
    "twisted.protocols.amp",
    "twisted.protocols.basic",
    "twisted.web.server",
    "twisted.web.resource",
    "twisted.web.static",
    "twistedlrp.http",
    "twistedlrp.jobs",
    "twistedlrp.jobs.client",
    "twistedlrp.jobs.node",
    "twistedlrp.server",
    "twistedlrp.web.service",
    "twistedlrp.web.site",
    "twistedlrp.web.wsgi",
)
# Set (to anything) in the environment of the main process: never fork web
# processes from the template, exec each one instead (to compare memory, or
# for a site whose import-time state must not be shared across a fork).
NO_PRELOAD_VARIABLE = "LRP_WEB_NO_PRELOAD"
# How often a web process sends its status to the main process.
STATUS_INTERVAL = 1.0


# -- both kinds of process ----------------------------------------------------


def _parse(argv: list[str]) -> tuple[dict, list[str]]:
    """Our own arguments (before C{--}) and the C{twistd lrp} ones after it."""
    ours: dict = {"sockets": []}
    rest = iter(argv)
    for arg in rest:
        if arg == "--":
            break
        name, _, value = arg.partition("=")
        if name == "--socket":
            fd, family = value.split(":")
            ours["sockets"].append((int(fd), int(family)))
        else:
            ours[name.lstrip("-")] = value or True
    return ours, list(rest)


def prepare(lrp_args: list[str]):
    """
    Parse the options and set Django up as the main process did (without
    its system checks and migration warnings, which it logged already).

    @return: C{(options, WSGI application)}.
    """
    from twistedlrp import boot
    from twistedlrp.options import Options

    options = Options()
    options.parseOptions(lrp_args)
    boot.prepare_path(options["pythonpath"])
    boot.configure_settings(options["settings"])
    boot.bridge_stdlib_logging()
    import django

    django.setup()
    boot.load_root_urlconf()
    application = boot.load_wsgi_application()
    boot.close_connections()
    return options, application


def _begin_logging() -> None:
    from twisted.logger import globalLogBeginner, textFileLogObserver

    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)], redirectStandardIO=False)


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass


# -- the template ---------------------------------------------------------------


class _Template:
    def __init__(self, control: socket.socket, sockets, lrp_args, options, application):
        self.control = control
        self.sockets = sockets
        self.lrp_args = lrp_args
        self.options = options
        self.application = application
        self.preload = not os.environ.get(NO_PRELOAD_VARIABLE)
        self.children: dict[int, int] = {}  # pid -> index
        self._buffer = b""
        self._fds: list[int] = []
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        os.set_blocking(self._wake_r, False)

    def send(self, message: dict) -> None:
        data = (json.dumps(message) + "\n").encode()
        try:
            self.control.sendall(data)
        except OSError:
            pass  # The main process is gone; end of file tells us.

    def run(self) -> int:
        signal.set_wakeup_fd(self._wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        selector = selectors.DefaultSelector()
        selector.register(self.control, selectors.EVENT_READ)
        selector.register(self._wake_r, selectors.EVENT_READ)
        self.reap()
        while True:
            for key, _ in selector.select(1.0):
                if key.fileobj is self.control:
                    if not self._read():
                        return self._finish()
                else:
                    try:
                        while os.read(self._wake_r, 512):
                            pass
                    except BlockingIOError:
                        pass
            self.reap()

    def _read(self) -> bool:
        try:
            data, fds, _, _ = socket.recv_fds(self.control, 65536, 16)
        except BlockingIOError:
            return True
        except OSError:
            return False
        self._fds += fds
        if not data:
            return False
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            message = json.loads(line)
            if message.get("op") == "fork":
                self.fork(message, self._fds.pop(0))
        return True

    def fork(self, message: dict, channel_fd: int) -> None:
        index = message["index"]
        _flush()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                self.control.close()
                signal.set_wakeup_fd(-1)
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                # SIGTERM ends it until its reactor runs (then it drains);
                # SIGINT stays ignored (a Ctrl-C is for the main process).
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                for fd in (self._wake_r, self._wake_w, *self._fds):
                    os.close(fd)
                if self.preload:
                    _refresh_reactor()
                    code = run_web(
                        self.options,
                        self.application,
                        channel_fd,
                        self.sockets,
                        message.get("jobs_connect"),
                        index,
                    )
                else:
                    self._exec(channel_fd, message)
            except BaseException:
                traceback.print_exc()
            finally:
                _flush()
                os._exit(code)
        os.close(channel_fd)
        self.children[pid] = index
        self.send({"event": "forked", "index": index, "pid": pid})

    def _exec(self, channel_fd: int, message: dict) -> None:
        os.set_inheritable(channel_fd, True)
        for fd, _ in self.sockets:
            os.set_inheritable(fd, True)
        args = [sys.executable, "-m", MODULE, "--web", f"--channel-fd={channel_fd}"]
        args += [f"--socket={fd}:{family}" for fd, family in self.sockets]
        args.append(f"--index={message['index']}")
        if message.get("jobs_connect"):
            args.append(f"--jobs-connect={message['jobs_connect']}")
        os.execv(sys.executable, [*args, "--", *self.lrp_args])

    def reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.children.clear()
                return
            if pid == 0:
                return
            index = self.children.pop(pid, None)
            if index is None:
                continue
            code = os.waitstatus_to_exitcode(status)
            self.send(
                {
                    "event": "exited",
                    "index": index,
                    "pid": pid,
                    "code": code if code >= 0 else None,
                    "signal": -code if code < 0 else None,
                }
            )

    def _finish(self) -> int:
        # The main process closed the control socket (it is done, or gone):
        # the web processes see the end of their own channels and stop.
        deadline = time.monotonic() + float(self.options["graceful-timeout"]) + 1
        while self.children and time.monotonic() < deadline:
            self.reap()
            time.sleep(0.05)
        for pid in list(self.children):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        while self.children:
            self.reap()
            time.sleep(0.01)
        return 0


def template_main(ours: dict, lrp_args: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    control = socket.socket(fileno=int(ours["control-fd"]))
    _begin_logging()
    started = time.monotonic()

    def send(message):
        control.sendall((json.dumps(message) + "\n").encode())

    if "bare" in ours or os.environ.get(NO_PRELOAD_VARIABLE):
        # Each web process is exec'd and sets Django up itself: this
        # process only forks them, without Django.
        from twistedlrp.options import Options

        options = Options()
        options.parseOptions(lrp_args)
        template = _Template(control, ours["sockets"], lrp_args, options, None)
        template.preload = False
        reason = ours.get("reason") or (
            f"{NO_PRELOAD_VARIABLE} is set: each web process sets Django up itself"
        )
    else:
        try:
            options, application = prepare(lrp_args)
        except BaseException as e:
            if isinstance(e, SystemExit) and not e.code:
                raise
            text = "".join(traceback.format_exception(e))
            sys.stderr.write(text)
            send({"event": "failed", "error": text})
            return 1
        template = _Template(control, ours["sockets"], lrp_args, options, application)
        _preimport()
        # A reactor that was imported (installed) but never ran holds only a
        # poller and a waker: a forked web process can replace both.
        reactor = sys.modules.get("twisted.internet.reactor")
        template.preload = reactor is None or _refreshable(reactor)
        if reactor is not None and template.preload:
            holders = _reactor_holders()
            log.info(
                "Setting Django up imported the reactor{holders}; it never ran here, so each "
                "web process forks and gives it a poller and a waker of its own",
                holders=f" ({', '.join(holders)})" if holders else "",
            )
        if not template.preload:
            holders = _reactor_holders()
            reason = (
                "setting Django up imported twisted.internet.reactor"
                + (f" (held by {', '.join(holders)})" if holders else "")
                + f" ({type(reactor).__name__}, or it has descriptors or ran), and a process "
                "that holds a reactor in use must not fork: each web process sets Django "
                "up itself. Import the reactor inside the functions that use it to share "
                "the template's memory"
            )
            _exec_bare(ours, lrp_args, reason)
        # Objects that exist now stay out of the collector's way, so that it
        # does not write to (and unshare) the pages that hold them.
        gc.collect()
        gc.freeze()
        reason = None
    send(
        {
            "event": "ready",
            "pid": os.getpid(),
            "preload": template.preload,
            "reason": reason,
            "seconds": round(time.monotonic() - started, 3),
        }
    )
    return template.run()


def _exec_bare(ours: dict, lrp_args: list[str], reason: str) -> None:
    """Become a template without Django (it only forks and execs web processes)."""
    control_fd = int(ours["control-fd"])
    os.set_inheritable(control_fd, True)
    for fd, _ in ours["sockets"]:
        os.set_inheritable(fd, True)
    args = [sys.executable, "-m", MODULE, "--template", "--bare", f"--control-fd={control_fd}"]
    args += [f"--socket={fd}:{family}" for fd, family in ours["sockets"]]
    args.append(f"--reason={reason}")
    _flush()
    os.execv(sys.executable, [*args, "--", *lrp_args])


def _preimport() -> None:
    import importlib

    for name in PREIMPORT:
        try:
            importlib.import_module(name)
        except Exception:
            pass  # The web process imports it again, and reports the error.


def _refreshable(reactor) -> bool:
    """
    Whether a forked process can give C{reactor} (installed, not running)
    a poller and a waker of its own (L{_refresh_reactor}): an epoll, poll or
    select reactor that never ran and watches nothing but its waker.
    """
    from twisted.internet import epollreactor, pollreactor, selectreactor

    kinds = (epollreactor.EPollReactor, pollreactor.PollReactor, selectreactor.SelectReactor)
    if type(reactor) not in kinds:
        return False
    if reactor.running or reactor._started or reactor._startedBefore:
        return False
    waker = reactor.waker
    return set(reactor.getReaders()) <= {waker} and not reactor.getWriters()


def _refresh_reactor() -> None:
    """
    In a forked web process: the inherited (never run) reactor, if there is
    one, gets a new poller and a new waker, so that it shares no kernel
    object with the template or another web process.
    """
    import select

    reactor = sys.modules.get("twisted.internet.reactor")
    if reactor is None:
        return
    from twisted.internet import epollreactor, pollreactor

    waker = reactor.waker
    if isinstance(reactor, epollreactor.EPollReactor):
        old, reactor._poller = reactor._poller, select.epoll(1024)
        old.close()  # our descriptor only: the epoll instance lives on elsewhere
        reactor._reads.clear()
        reactor._writes.clear()
        reactor._selectables.clear()
    elif isinstance(reactor, pollreactor.PollReactor):
        reactor._poller = select.poll()
        reactor._reads.clear()
        reactor._writes.clear()
        reactor._selectables.clear()
    else:
        reactor._reads.clear()
        reactor._writes.clear()
    if waker is not None:
        reactor._internalReaders.discard(waker)
        waker.connectionLost(None)  # closes the inherited pipe's ends
        reactor.waker = None
    reactor.installWaker()


def _reactor_holders() -> list[str]:
    """The site's modules (not Twisted's) that hold the reactor as a global."""
    reactor = sys.modules.get("twisted.internet.reactor")
    return sorted(
        name
        for name, module in list(sys.modules.items())
        if module is not None
        and not name.startswith(("twisted.", "twistedlrp."))
        and getattr(module, "reactor", None) is reactor
    )[:5]


# -- a web process --------------------------------------------------------------


def run_web(options, application, channel_fd: int, sockets, jobs_connect, index) -> int:
    """
    Run one web process until it stops: a fresh reactor, the site's C{lrp}
    and job modules, and the server's C{"web"} role on C{sockets}.

    @return: its exit code.
    """
    from twisted.internet import reactor

    from twistedlrp import boot
    from twistedlrp.jobs import registry
    from twistedlrp.jobs.node import JobClientService
    from twistedlrp.server import LRPServer

    try:
        boot.import_app_modules("lrp")
        registry.discover()
    except boot.BootError as e:
        sys.stderr.write(f"twistd lrp: error: {e}\n")
        return 1
    if jobs_connect:
        options["jobs-connect"] = jobs_connect
    channel = MainChannel(reactor, channel_fd, index)
    server = LRPServer(
        options,
        application,
        (None, JobClientService(reactor, options, None)),
        reactor=reactor,
        role="web",
        sockets=sockets,
        channel=channel,
    )
    server.startService()
    reactor.addSystemEventTrigger("before", "shutdown", server.stopService)
    reactor.run()
    return server.exit_code


def web_main(ours: dict, lrp_args: list[str]) -> int:
    """A web process exec'd by a template that could not fork (no preload)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # ignored in the template
    _begin_logging()
    options, application = prepare(lrp_args)
    return run_web(
        options,
        application,
        int(ours["channel-fd"]),
        ours["sockets"],
        ours.get("jobs-connect"),
        int(ours["index"]),
    )


class _ChannelProtocol(LineOnlyReceiver):
    delimiter = b"\n"
    MAX_LENGTH = 4 * 1024 * 1024

    def __init__(self, channel: MainChannel):
        self.channel = channel

    def lineReceived(self, line):
        try:
            message = json.loads(line)
        except ValueError:
            return
        if message.get("event") == "workers":
            self.channel.received(message)

    def connectionLost(self, reason=protocol.connectionDone):
        self.channel.lost()


class MainChannel(service.Service):
    """
    A web process's link to the main process: its status goes up every
    second (and at each change of state), the state of every web process and
    of the job service comes down for its health endpoint; end of file means
    the main process is gone, and the web process stops gracefully.
    """

    name = "main-process"

    def __init__(self, reactor, fd: int, index: int):
        self.reactor = reactor
        self.fd = fd
        self.index = index
        self.server = None  # the LRPServer, which sets it
        self.pool = None  # its thread pool, for the counts
        self.protocol: _ChannelProtocol | None = None
        self.workers: dict | None = None
        self._loop = None
        self._closing = False

    def startService(self):
        from twisted.internet import task

        super().startService()
        self.protocol = _ChannelProtocol(self)
        os.set_blocking(self.fd, False)
        self.reactor.adoptStreamConnection(self.fd, socket.AF_UNIX, _OneProtocol(self.protocol))
        os.close(self.fd)
        self._loop = task.LoopingCall(self.send_status)
        self._loop.start(STATUS_INTERVAL, now=True)

    def status(self) -> dict:
        body = {
            "index": self.index,
            "pid": os.getpid(),
            "state": self.server.state if self.server is not None else "starting",
        }
        if self.pool is not None:
            stats = self.pool.stats()
            body["threads"] = {k: stats[k] for k in ("busy", "idle", "size")}
            body["waiting"] = stats["waiting"]
        return body

    def send_status(self) -> None:
        if self.protocol is None or self.protocol.transport is None:
            return
        self.protocol.sendLine(json.dumps({"event": "status", **self.status()}).encode())

    def received(self, message: dict) -> None:
        message["received_at"] = self.reactor.seconds()
        self.workers = message

    def lost(self) -> None:
        self.protocol = None
        if self._closing:
            return
        log.warn("The main process is gone: stopping this web process")
        if self.reactor.running:
            self.reactor.stop()

    def workers_section(self) -> dict | None:
        """The C{web_workers} section of the health endpoint."""
        if self.workers is None:
            return None
        mine = self.status()
        listed = [
            {**w, **mine} if w.get("index") == self.index else w for w in self.workers["workers"]
        ]
        return {
            "size": len(listed),
            "main_pid": self.workers.get("main_pid"),
            "workers": listed,
        }

    def jobs_section(self) -> dict | None:
        """The main process's job service section, as it last sent it."""
        if self.workers is None:
            return None
        return self.workers.get("jobs")

    def stopService(self):
        super().stopService()
        self._closing = True
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if self.protocol is not None and self.protocol.transport is not None:
            self.protocol.transport.loseConnection()


class _OneProtocol(protocol.Factory):
    def __init__(self, proto):
        self.proto = proto

    def buildProtocol(self, addr):
        return self.proto


def main(argv: list[str] | None = None) -> None:
    ours, lrp_args = _parse(list(sys.argv[1:] if argv is None else argv))
    if "template" in ours:
        code = template_main(ours, lrp_args)
    else:
        code = web_main(ours, lrp_args)
    _flush()
    os._exit(code)


if __name__ == "__main__":
    main()
