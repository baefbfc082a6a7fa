"""
The server process that the reload supervisor runs::

    python -m twistedlrp.reload.child LRP-ARGUMENTS...

runs C{twistd --nodaemon --pidfile= lrp LRP-ARGUMENTS...} with three
additions, all steered by the supervisor through the environment:

 - it starts a new session, so that the supervisor can end the server and
   its job workers together by process group, and a Ctrl-C on the terminal
   reaches the supervisor only;
 - it sets C{LISTEN_PID} to its own pid before Twisted reads it, so the
   C{systemd:} endpoints in its C{--listen} options adopt the sockets the
   supervisor bound and passed as file descriptors 3, 4, ...
   (L{twistedlrp.web.ports.listen} adopts a UNIX one without changing its
   path or mode, so the next server can adopt it too);
 - it reports to the supervisor, one JSON object a line on the report
   descriptor: C{{"event": "booted", "files": [...], "template_dirs":
   [...]}} once Django is set up (the files are those of every imported
   module, the directories those Django loads templates from),
   C{{"event": "failed",
   "error": ..., "files": [...]}} when set-up fails (with the files named in
   the traceback), and C{{"event": "files", ...}} when modules are imported
   later. After "booted" it waits, before its reactor runs, until the
   supervisor writes to the gate descriptor: the supervisor lets it start
   only once the previous server is gone. End of file on the gate (the
   supervisor died) stops the server gracefully. While the server runs,
   C{{"event": "templates", "files": [...]}} on the gate makes it reload
   its templates, without a restart (L{twistedlrp.server.Server.reload_templates}).

This module must not import Twisted's endpoints before C{LISTEN_PID} is set:
L{twisted.internet.endpoints} reads the environment once, at import.
"""

from __future__ import annotations

import json
import os
import re
import sys

# Set by the supervisor: "REPORT_FD,GATE_FD".
FDS_VARIABLE = "LRP_RELOAD_FDS"
# Set by the supervisor for a spare: a process that imports what every
# server needs (Twisted, Django's framework, not the site) ahead of time and
# waits for "boot" on the gate, so that a restart skips that part.
SPARE_VARIABLE = "LRP_RELOAD_SPARE"
PREIMPORT = (
    "twisted.internet.defer",
    "twisted.internet.endpoints",
    "twisted.internet.protocol",
    "twisted.application.service",
    "twisted.scripts.twistd",
    "twisted.logger",
    "twisted.protocols.amp",
    "twisted.web.server",
    "twisted.web.resource",
    "twisted.web.static",
    "django",
    "django.core.checks",
    "django.core.handlers.wsgi",
    "django.core.management",
    "django.db.migrations.executor",
    "django.db.models",
    "django.forms",
    "django.http",
    "django.shortcuts",
    "django.template",
    "django.urls",
    "twistedlrp.boot",
    "twistedlrp.server",
    "twistedlrp.tap",
    "twistedlrp.web.ports",
)
# How often the running server looks for newly imported modules.
FILES_INTERVAL = 2.0

_TRACEBACK_FILE = re.compile(r'File "([^"]+)", line \d+')


class _Channel:
    """The two pipes to the supervisor."""

    def __init__(self, report_fd: int, gate_fd: int):
        self.report_fd = report_fd
        self.gate_fd = gate_fd
        self.reported: set[str] = set()
        self._gate_buffer = b""

    def send(self, message: dict) -> None:
        data = (json.dumps(message) + "\n").encode("utf-8")
        try:
            while data:
                written = os.write(self.report_fd, data)
                data = data[written:]
        except OSError:
            pass  # The supervisor is gone; the gate tells us so.

    def send_files(self, event: str, **extra) -> None:
        files = imported_files() - self.reported
        self.reported |= files
        if files or event != "files":
            self.send({"event": event, "pid": os.getpid(), "files": sorted(files), **extra})

    def wait_for_gate(self) -> bool:
        """
        Block until the supervisor writes a line (the reactor does not run
        yet): "boot" to a spare, "go" to a server that is set up.

        @return: C{False} if the supervisor closed the gate instead.
        """
        while b"\n" not in self._gate_buffer:
            try:
                data = os.read(self.gate_fd, 64)
            except InterruptedError:
                continue
            except OSError:
                return False
            if not data:
                return False
            self._gate_buffer += data
        _, self._gate_buffer = self._gate_buffer.split(b"\n", 1)
        return True


def imported_files() -> set[str]:
    """The source files of the modules imported so far, standard library excluded."""
    import sysconfig

    stdlib = tuple(
        os.path.realpath(p) + os.sep
        for p in {sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["platstdlib"]}
    )
    files = set()
    for module in list(sys.modules.values()):
        spec = getattr(module, "__spec__", None)
        path = getattr(spec, "origin", None) if spec is not None else None
        if not path or not getattr(spec, "has_location", False):
            path = getattr(module, "__file__", None)
        if not isinstance(path, str) or not path.endswith(".py"):
            continue
        path = os.path.realpath(path)
        if path.startswith(stdlib) and "site-packages" not in path:
            continue
        files.add(path)
    return files


def traceback_files(text: str) -> list[str]:
    """The files a traceback (or a SyntaxError message) names."""
    files = [m.group(1) for m in _TRACEBACK_FILE.finditer(text)]
    return [os.path.realpath(f) for f in files if os.path.isfile(f)]


def _error_text(error: BaseException) -> str:
    if isinstance(error, SystemExit):
        return str(error.code) if error.code not in (None, 0, 1) else ""
    import traceback

    return "".join(traceback.format_exception(error))


def _report_builds(channel: _Channel) -> None:
    import twistedlrp.tap as tap

    def build_and_report(build, options):
        # The child is the server: a `reload = true` in a --config file
        # must not make it a supervisor too.
        options["reload"] = False
        try:
            service = build()
        except BaseException as e:
            text = _error_text(e)
            extra = traceback_files(text)
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
        if not channel.wait_for_gate():
            raise SystemExit(0)
        _watch_supervisor(channel, service)
        return service

    tap.wrap_builds(build_and_report)


def _template_dirs() -> list[str]:
    """The template directories to report (none if they cannot be known)."""
    from twisted.logger import Logger

    from twistedlrp.reload.templates import template_directories

    try:
        return template_directories()
    except Exception as e:
        Logger(namespace="twistedlrp.reload").warn(
            "The template directories are unknown ({error}): template changes are not watched",
            error=f"{type(e).__name__}: {e}",
        )
        return []


class _Lifeline:
    """
    Reads the gate descriptor in the reactor: end of file means the
    supervisor is gone, and the server stops gracefully. The JSON objects
    the supervisor writes on it go to C{on_message}.
    """

    def __init__(self, reactor, fd: int, on_message=None, buffered: bytes = b""):
        self.reactor = reactor
        self.fd = fd
        self.closed = False
        self.on_message = on_message
        self._buffer = buffered

    def fileno(self) -> int:
        return self.fd

    def logPrefix(self) -> str:
        return "reload-supervisor"

    def doRead(self):
        try:
            data = os.read(self.fd, 4096)
        except BlockingIOError:
            return None
        except OSError:
            data = b""
        if not data:
            from twisted.internet.main import CONNECTION_DONE

            self.closed = True
            return CONNECTION_DONE
        self._buffer += data
        self._deliver()
        return None

    def _deliver(self) -> None:
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            try:
                message = json.loads(line)
            except ValueError:
                continue  # "go", "boot": read before the reactor ran
            if not isinstance(message, dict) or self.on_message is None:
                continue
            try:
                self.on_message(message)
            except Exception:
                from twisted.logger import Logger

                Logger(namespace="twistedlrp.reload").failure(
                    "The reload supervisor's {event!r} message failed", event=message.get("event")
                )

    def connectionLost(self, reason) -> None:
        from twisted.internet.error import ConnectionDone
        from twisted.logger import Logger

        self.reactor.removeReader(self)
        # The reactor reports the pipe's hang-up as ConnectionDone without
        # calling doRead; at its own shutdown it lets go of every reader
        # with ConnectionLost.
        if not (self.closed or reason.check(ConnectionDone)):
            return
        from twistedlrp.server import set_exit_code

        Logger(namespace="twistedlrp.reload").warn(
            "The reload supervisor is gone: stopping the server"
        )
        set_exit_code(1)  # A stop nobody asked for.
        if self.reactor.running:
            self.reactor.stop()


def _supervisor_said(service, message: dict) -> None:
    if message.get("event") == "templates":
        reload_templates = getattr(service, "reload_templates", None)
        if reload_templates is not None:
            reload_templates(list(message.get("files", [])))


def _watch_supervisor(channel: _Channel, service=None) -> None:
    from twisted.internet import reactor, task

    os.set_blocking(channel.gate_fd, False)
    # What the gate held after "go" (a message sent right after it).
    buffered, channel._gate_buffer = channel._gate_buffer, b""

    def begin():
        lifeline = _Lifeline(
            reactor, channel.gate_fd, lambda message: _supervisor_said(service, message), buffered
        )
        reactor.addReader(lifeline)
        lifeline._deliver()
        files = task.LoopingCall(channel.send_files, "files")
        files.start(FILES_INTERVAL, now=False)

    reactor.callWhenRunning(begin)


def _preimport() -> None:
    import importlib

    for name in PREIMPORT:
        try:
            importlib.import_module(name)
        except Exception:
            pass  # The server imports it again, and reports the error.


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        os.setsid()
    except OSError:
        pass  # Already a session leader.
    if os.environ.get("LISTEN_FDS"):
        os.environ["LISTEN_PID"] = str(os.getpid())
    fds = os.environ.pop(FDS_VARIABLE, "")
    spare = os.environ.pop(SPARE_VARIABLE, "")
    if fds:
        report_fd, gate_fd = (int(fd) for fd in fds.split(","))
        for fd in (report_fd, gate_fd):
            os.set_inheritable(fd, False)
        channel = _Channel(report_fd, gate_fd)
        if spare:
            _preimport()
            channel.send({"event": "spare", "pid": os.getpid(), "files": sorted(imported_files())})
            if not channel.wait_for_gate():
                raise SystemExit(0)
        _report_builds(channel)

    from twisted.scripts.twistd import run

    sys.argv = ["twistd", "--nodaemon", "--pidfile=", "lrp", *argv]
    run()


if __name__ == "__main__":
    main()
