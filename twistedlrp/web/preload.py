"""
The template of C{--web-workers N}: a process with Django set up and no
running reactor, which forks each web process on the main process's
request so that they share its warm memory copy on write (gunicorn's
C{preload}); see L{twistedlrp.web.process_main} for both kinds of process, and why
a reactor that setting Django up imported is renewed in each fork or, when
it cannot be, the web processes are exec'd instead.
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

from twistedlrp import compat
from twistedlrp.process.channel import BlockingChannel
from twistedlrp.process.forkserver import ForkServer, flush_stdio, preimport
from twistedlrp.web.process_main import (
    MODULE,
    NO_PRELOAD_VARIABLE,
    PREIMPORT,
    _begin_logging,
    prepare,
    run_web,
)

log = Logger(namespace="twistedlrp.web")


class _Template:
    def __init__(self, server: ForkServer, sockets, lrp_args, options, application, output):
        self.server = server
        # The main process's standard output and error, a web process's 1 and 2.
        self.output: tuple[int, int] | None = output
        self.sockets = sockets
        self.lrp_args = lrp_args
        self.options = options
        self.application = application
        self.preload = not os.environ.get(NO_PRELOAD_VARIABLE)

    def run(self) -> int:
        request = self.server.serve(self._said)
        if request is not None:
            self._web_process(request)  # in a forked web process: never returns
        # The main process closed the control socket (it is done, or gone):
        # the web processes see the end of their own channels and stop.
        self.server.end_children(float(self.options["graceful-timeout"]) + 1)
        return 0

    def _said(self, message: dict) -> None:
        if message.get("op") == "templates":
            self.reload_templates()

    def reload_templates(self) -> None:
        """
        A template changed (C{--reload}): reset the template loaders here
        too, so that a web process forked later caches none of the old
        ones. (This process runs no threads: no reactor to keep free.)
        """
        if self.application is None:
            return  # No Django here: each web process sets it up itself.
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
            if self.output is not None:
                # Our 1 and 2 are pipes to the main process, for our own
                # output: a web process writes where the main process does.
                for fd, target in zip(self.output, (1, 2), strict=True):
                    os.dup2(fd, target)
                    os.close(fd)
            # SIGTERM ends it until its reactor runs (then it drains);
            # SIGINT stays ignored (a Ctrl-C is for the main process).
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            if self.preload:
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
        os.set_inheritable(channel_fd, True)
        for fd, _ in self.sockets:
            os.set_inheritable(fd, True)
        args = [sys.executable, "-m", MODULE, "--web", f"--channel-fd={channel_fd}"]
        args += [f"--socket={fd}:{family}" for fd, family in self.sockets]
        args.append(f"--index={message['index']}")
        for endpoint in message.get("jobs_connect") or ():
            args.append(f"--jobs-connect={endpoint}")
        os.execv(sys.executable, [*args, "--", *self.lrp_args])


def template_main(ours: dict, lrp_args: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    server = ForkServer(BlockingChannel(socket.socket(fileno=int(ours["control-fd"]))))
    # The main process's standard output and error (ours are pipes to it).
    output = (
        tuple(int(fd) for fd in ours["output-fds"].split(",")) if "output-fds" in ours else None
    )
    _begin_logging(lrp_args)
    started = time.monotonic()

    if "bare" in ours or os.environ.get(NO_PRELOAD_VARIABLE):
        # Each web process is exec'd and sets Django up itself: this
        # process only forks them, without Django.
        from twistedlrp.options import Options

        options = Options()
        options.parseOptions(lrp_args)
        template = _Template(server, ours["sockets"], lrp_args, options, None, output)
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
            server.send({"event": "failed", "error": text})
            return 1
        template = _Template(server, ours["sockets"], lrp_args, options, application, output)
        preimport(PREIMPORT)
        # A reactor that was imported (installed) but never ran holds only a
        # poller and a waker: a forked web process can replace both.
        reactor = sys.modules.get("twisted.internet.reactor")
        template.preload = reactor is None or compat.reactor_renewable(reactor)
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
    server.send(
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
    if ours.get("output-fds"):
        for fd in ours["output-fds"].split(","):
            os.set_inheritable(int(fd), True)
        args.append(f"--output-fds={ours['output-fds']}")
    args += [f"--socket={fd}:{family}" for fd, family in ours["sockets"]]
    args.append(f"--reason={reason}")
    flush_stdio()
    os.execv(sys.executable, [*args, "--", *lrp_args])


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
