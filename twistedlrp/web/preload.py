"""
The template of C{--web-workers N}: Django set up, no running reactor, it forks
each web process to share its warm memory (gunicorn's C{preload}). If setting
Django up imported a reactor that a fork cannot renew, or with
C{LRP_WEB_NO_PRELOAD} set, it re-execs itself without Django (C{--bare}) and
execs each web process. It ends when its control socket closes.
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
# Set: exec each web process (to compare memory, or for import-time state not to share).
NO_PRELOAD_VARIABLE = "LRP_WEB_NO_PRELOAD"


def _serve(server: ForkServer, sockets, lrp_args, options, application, output) -> int:
    """Fork a web process per request of the main process (exec it, without Django)."""

    def said(message: dict) -> None:
        # A template changed (--reload): later forks must cache none of the old ones.
        if message.get("op") != "templates" or application is None:
            return
        from twistedlrp.reload.templates import reset_loaders

        try:
            reset_loaders()
        except Exception:
            log.failure("Reloading the templates in the web process template failed")

    request = server.serve(said)
    if request is None:
        # The main process closed the control socket: the web processes stop too.
        server.end_children(float(options["graceful-timeout"]) + 1)
        return 0
    # In the forked child: be the web process asked for, then exit.
    index, channel_fd = request["index"], request["fds"][0]
    code = 1
    try:
        # The main process's standard output and error become its 1 and 2.
        for fd, target in zip(output, (1, 2), strict=True):
            os.dup2(fd, target)
            os.close(fd)
        # SIGTERM ends it until its reactor runs (then it drains); SIGINT stays ignored.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if application is not None:
            compat.renew_forked_reactor()
            jobs_connect = request.get("jobs_connect")
            code = run_web(options, application, channel_fd, sockets, jobs_connect, index)
        else:
            args = ["--web", f"--channel-fd={channel_fd}", f"--index={index}"]
            args += [f"--jobs-connect={endpoint}" for endpoint in request.get("jobs_connect") or ()]
            _exec_self(args, [channel_fd], sockets, lrp_args)
    except BaseException:
        # Through the log, so that --log-format json stays JSON.
        log.failure("Web process {index} failed", index=index)
    finally:
        flush_stdio()
        os._exit(code)


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
            holders = ", ".join(_reactor_holders(reactor))
            if not compat.reactor_renewable(reactor):
                _exec_bare(
                    ours,
                    output,
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
    server.send(
        {
            "event": "ready",
            "pid": os.getpid(),
            "preload": application is not None,
            "reason": reason,
            "seconds": round(time.monotonic() - started, 3),
        }
    )
    return _serve(server, ours["sockets"], lrp_args, options, application, output)


def _exec_bare(ours: dict, output: tuple[int, ...], lrp_args: list[str], reason: str) -> None:
    """Become a template without Django (it only forks and execs web processes)."""
    fds = [int(ours["control-fd"]), *output]
    args = ["--template", "--bare", f"--control-fd={fds[0]}", f"--output-fds={ours['output-fds']}"]
    _exec_self([*args, f"--reason={reason}"], fds, ours["sockets"], lrp_args)


def _exec_self(args: list[str], fds: list[int], sockets, lrp_args: list[str]) -> None:
    """Exec this module with C{args}, keeping C{fds} and the listening C{sockets}."""
    for fd in [*fds, *(fd for fd, _ in sockets)]:
        os.set_inheritable(fd, True)
    args += [f"--socket={fd}:{family}" for fd, family in sockets]
    flush_stdio()
    os.execv(sys.executable, [sys.executable, "-m", MODULE, *args, "--", *lrp_args])


def _reactor_holders(reactor) -> list[str]:
    """The site's modules (not Twisted's) that hold C{reactor} as a global."""
    return sorted(
        name
        for name, module in list(sys.modules.items())
        if module is not None
        and not name.startswith(("twisted.", "twistedlrp."))
        and getattr(module, "reactor", None) is reactor
    )[:5]
