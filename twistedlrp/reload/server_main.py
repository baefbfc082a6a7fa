"""
C{python -m twistedlrp.reload.server_main ARGS}, the reload supervisor's
server: C{twistd --nodaemon --pidfile= lrp ARGS} in a session of its own (the
supervisor kills its process group; Ctrl-C reaches only the supervisor), with
C{LISTEN_PID} set for its C{systemd:} endpoints. It reports C{booted} (its
imported files and template directories) or C{failed} (the files the
traceback names), then C{files} now and then; after C{booted} it waits for
C{go}. End of file on the channel stops it.

Twisted's endpoints read C{LISTEN_PID} once, at import: not imported before.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import sys
import sysconfig
import traceback

from twisted.logger import Logger

from twistedlrp.process.channel import BlockingChannel, Channel, adopt
from twistedlrp.process.forkserver import preimport
from twistedlrp.signals import set_exit_code

# Set by the supervisor: the control channel's descriptor.
CONTROL_VARIABLE = "LRP_RELOAD_FD"
# Set for a spare: it imports what every server needs (not the site) ahead
# and waits for "boot", so that a restart skips that part.
SPARE_VARIABLE = "LRP_RELOAD_SPARE"
PREIMPORT = """
    twisted.internet.defer twisted.internet.endpoints twisted.internet.protocol
    twisted.application.service twisted.scripts.twistd twisted.logger twisted.protocols.amp
    twisted.web.server twisted.web.resource twisted.web.static
    django django.core.checks django.core.handlers.wsgi django.core.management
    django.db.migrations.executor django.db.models django.forms django.http django.shortcuts
    django.template django.urls
    twistedlrp.boot twistedlrp.server twistedlrp.tap twistedlrp.web.ports
""".split()
# How often the running server looks for newly imported modules.
FILES_INTERVAL = 2.0

_TRACEBACK_FILE = re.compile(r'File "([^"]+)", line \d+')
log = Logger(namespace="twistedlrp.reload")


class _Reporter:
    """The control channel to the supervisor, blocking until the reactor runs."""

    def __init__(self, fd: int):
        self.blocking = BlockingChannel(socket.socket(fileno=fd))
        self.channel = None  # the reactor's end, once the reactor runs
        self.reported: set[str] = set()

    def send(self, message: dict) -> None:
        (self.channel or self.blocking).send(message)

    def send_files(self, event: str, **extra) -> None:
        files = imported_files() - self.reported
        self.reported |= files
        if files or event != "files":
            self.send({"event": event, "pid": os.getpid(), "files": sorted(files), **extra})

    def hand_over(self, on_message, on_lost):
        """@return: the reactor's end of the channel, reading on where the blocking end stopped."""
        self.channel = Channel(on_message, on_lost, self.blocking.decoder)
        pending, self.blocking.pending = self.blocking.pending, []
        for message in pending:
            on_message(message)
        return self.channel

    def wait_for_word(self) -> bool:
        """@return: once the supervisor says C{boot} or C{go}, C{True}; C{False} at end of file."""
        return self.blocking.wait() is not None


def imported_files() -> set[str]:
    """@return: the source files of the modules imported so far, but the standard library's."""
    paths = sysconfig.get_paths()
    stdlib = tuple(os.path.realpath(paths[p]) + os.sep for p in ("stdlib", "platstdlib"))
    files = set()
    for module in list(sys.modules.values()):
        spec = getattr(module, "__spec__", None)
        path = getattr(spec, "origin", None)
        if not path or not getattr(spec, "has_location", False):
            path = getattr(module, "__file__", None)
        if not isinstance(path, str) or not path.endswith(".py"):
            continue
        path = os.path.realpath(path)
        if path.startswith(stdlib) and "site-packages" not in path:
            continue
        files.add(path)
    return files


def _report_builds(channel: _Reporter) -> None:
    import twistedlrp.tap as tap

    def build_and_report(build, options):
        options["reload"] = False  # (a `reload = true` in a --config file)
        try:
            service = build()
        except BaseException as e:
            if isinstance(e, SystemExit):
                text = str(e.code) if e.code not in (None, 0, 1) else ""
            else:
                text = "".join(traceback.format_exception(e))
            # The files the traceback (or a SyntaxError message) names.
            extra = [
                os.path.realpath(f) for f in _TRACEBACK_FILE.findall(text) if os.path.isfile(f)
            ]
            cause = e
            for _ in range(10):  # the exception chain, bounded
                if cause is None:
                    break
                if isinstance(cause, SyntaxError) and cause.filename:
                    extra.append(os.path.realpath(cause.filename))
                cause = cause.__cause__ or cause.__context__
            channel.send_files("failed", error=text, extra=extra)
            raise
        channel.send_files("booted", template_dirs=_template_dirs())
        if not channel.wait_for_word():
            raise SystemExit(0)
        _watch_supervisor(channel, service)
        return service

    tap.wrap_builds(build_and_report)


def _template_dirs() -> list[str]:
    from twistedlrp.reload.templates import template_directories

    try:
        return template_directories()
    except Exception as e:
        log.warn(
            "The template directories are unknown ({error}): template changes are not watched",
            error=f"{type(e).__name__}: {e}",
        )
        return []


def _watch_supervisor(reporter: _Reporter, service=None) -> None:
    from twisted.internet import reactor, task
    from twisted.internet.error import ConnectionDone

    def said(message: dict) -> None:
        reload_templates = getattr(service, "reload_templates", None)
        if message.get("event") == "templates" and reload_templates is not None:
            try:
                reload_templates(list(message.get("files", [])))
            except Exception:
                log.failure("Reloading the templates failed")

    def lost(reason) -> None:
        # Closed by the supervisor (it is gone), not by our shut-down.
        if reason.check(ConnectionDone):
            log.warn("The reload supervisor is gone: stopping the server")
            set_exit_code(1)
            if reactor.running:
                reactor.stop()

    def begin():
        adopt(reactor, reporter.blocking.socket, reporter.hand_over(said, lost))
        files = task.LoopingCall(reporter.send_files, "files")
        files.start(FILES_INTERVAL, now=False)

    reactor.callWhenRunning(begin)


def main() -> None:
    with contextlib.suppress(OSError):  # already a session leader
        os.setsid()
    if os.environ.get("LISTEN_FDS"):
        os.environ["LISTEN_PID"] = str(os.getpid())
    fd = os.environ.pop(CONTROL_VARIABLE, "")
    spare = os.environ.pop(SPARE_VARIABLE, "")
    if fd:
        os.set_inheritable(int(fd), False)
        channel = _Reporter(int(fd))
        if spare:
            preimport(PREIMPORT)
            channel.send({"event": "spare", "pid": os.getpid(), "files": sorted(imported_files())})
            if not channel.wait_for_word():
                raise SystemExit(0)
        _report_builds(channel)

    from twisted.scripts.twistd import run

    sys.argv = ["twistd", "--nodaemon", "--pidfile=", "lrp", *sys.argv[1:]]
    run()


if __name__ == "__main__":
    main()
