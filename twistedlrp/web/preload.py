"""
The template of C{--web-workers N}: a process with Django set up and no
running reactor, which forks each web process so that they share its warm
memory copy on write (gunicorn's C{preload}). A reactor must not run in a
process that forks: if setting Django up imported it, each fork gives it a
new poller and waker; when that cannot be done, or with C{LRP_WEB_NO_PRELOAD}
set, the template re-execs itself without Django (C{--bare}) and execs each
web process instead. It ignores SIGINT and SIGTERM (the main process
decides) and ends when its control socket closes, after its web processes.
"""

from __future__ import annotations

import gc
import os
import signal
import socket
import sys
import time
import traceback

from twisted.logger import Logger

from twistedlrp import compat, logs
from twistedlrp.options import Options
from twistedlrp.process.channel import BlockingChannel
from twistedlrp.process.forkserver import ForkServer, flush_stdio, preimport
from twistedlrp.web.process_main import PREIMPORT, prepare, run_web

log = Logger(namespace="twistedlrp.web")

MODULE = "twistedlrp.web.process_main"
# Set (to anything): exec each web process instead of forking it (to compare
# memory, or for a site whose import-time state must not be shared).
NO_PRELOAD_VARIABLE = "LRP_WEB_NO_PRELOAD"


class _Template:
    """Forks a web process per request of the main process (execs it, without Django)."""

    def __init__(self, server: ForkServer, sockets, lrp_args, options, application, output):
        self.server = server
        # The main process's standard output and error, a web process's 1 and 2.
        self.output: tuple[int, ...] = output
        self.sockets = sockets
        self.lrp_args = lrp_args
        self.options = options
        self.application = application

    def run(self) -> int:
        request = self.server.serve(self._said)
        if request is not None:
            self._web_process(request)  # in a forked web process: never returns
        # The main process closed the control socket: the web processes stop too.
        self.server.end_children(float(self.options["graceful-timeout"]) + 1)
        return 0

    def _said(self, message: dict) -> None:
        # A template changed (--reload): later forks must cache none of the old ones.
        if message.get("op") != "templates" or self.application is None:
            return
        from twistedlrp.reload.templates import reset_loaders

        try:
            reset_loaders()
        except Exception:
            log.failure("Reloading the templates in the web process template failed")

    def _web_process(self, request: dict) -> None:
        """In a forked child: be the web process C{request} asked for, then exit."""
        index, channel_fd = request["index"], request["fds"][0]
        code = 1
        try:
            for fd, target in zip(self.output, (1, 2), strict=True):
                os.dup2(fd, target)
                os.close(fd)
            # SIGTERM ends it until its reactor runs (then it drains);
            # SIGINT stays ignored (a Ctrl-C is for the main process).
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            if self.application is not None:
                compat.renew_forked_reactor()
                code = run_web(
                    self.options,
                    self.application,
                    channel_fd,
                    self.sockets,
                    request.get("jobs_connect"),
                    index,
                )
            else:
                self._exec(channel_fd, request)
        except BaseException:
            # Through the log, so that --log-format json stays JSON.
            log.failure("Web process {index} failed", index=index)
        finally:
            flush_stdio()
            os._exit(code)

    def _exec(self, channel_fd: int, message: dict) -> None:
        args = ["--web", f"--channel-fd={channel_fd}", f"--index={message['index']}"]
        args += [f"--jobs-connect={endpoint}" for endpoint in message.get("jobs_connect") or ()]
        _exec_self(args, [channel_fd], self.sockets, self.lrp_args)


def template_main(ours: dict, lrp_args: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    server = ForkServer(BlockingChannel(socket.socket(fileno=int(ours["control-fd"]))))
    output = tuple(int(fd) for fd in ours["output-fds"].split(","))
    logs.begin(lrp_args, sys.stdout)
    started = time.monotonic()
    if "bare" in ours or os.environ.get(NO_PRELOAD_VARIABLE):
        options = Options()
        options.parseOptions(lrp_args)
        application = None
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
            server.send({"event": "failed", "error": text})
            return 1
        preimport(PREIMPORT)
        # A reactor imported but never run holds only a poller and a waker, which a fork replaces.
        reactor = sys.modules.get("twisted.internet.reactor")
        if reactor is not None:
            holders = ", ".join(_reactor_holders())
            if not compat.reactor_renewable(reactor):
                _exec_bare(
                    ours,
                    lrp_args,
                    "setting Django up imported twisted.internet.reactor"
                    + (f" (held by {holders})" if holders else "")
                    + f" ({type(reactor).__name__}, or it has descriptors or ran), and a "
                    "process that holds a reactor in use must not fork: each web process sets "
                    "Django up itself. Import the reactor inside the functions that use it to "
                    "share the template's memory",
                )
            log.info(
                "Setting Django up imported the reactor{holders}; it never ran here, so each "
                "web process forks and gives it a poller and a waker of its own",
                holders=f" ({holders})" if holders else "",
            )
        # The collector must not write to (and unshare) the pages of what exists now.
        gc.collect()
        gc.freeze()
        reason = None
    template = _Template(server, ours["sockets"], lrp_args, options, application, output)
    server.send(
        {
            "event": "ready",
            "pid": os.getpid(),
            "preload": application is not None,
            "reason": reason,
            "seconds": round(time.monotonic() - started, 3),
        }
    )
    return template.run()


def _exec_bare(ours: dict, lrp_args: list[str], reason: str) -> None:
    """Become a template without Django (it only forks and execs web processes)."""
    fds = [int(ours["control-fd"]), *map(int, ours["output-fds"].split(","))]
    args = ["--template", "--bare", f"--control-fd={fds[0]}", f"--output-fds={ours['output-fds']}"]
    _exec_self([*args, f"--reason={reason}"], fds, ours["sockets"], lrp_args)


def _exec_self(args: list[str], fds: list[int], sockets, lrp_args: list[str]) -> None:
    """Exec this module with C{args}, keeping C{fds} and the listening C{sockets}."""
    for fd in [*fds, *(fd for fd, _ in sockets)]:
        os.set_inheritable(fd, True)
    args += [f"--socket={fd}:{family}" for fd, family in sockets]
    flush_stdio()
    os.execv(sys.executable, [sys.executable, "-m", MODULE, *args, "--", *lrp_args])


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
