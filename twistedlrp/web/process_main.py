"""
A web process of C{--web-workers N}, seen from inside: forked by the template
(L{twistedlrp.web.preload}) with a channel to the main process, it serves the
inherited sockets and writes to the main process's output (a template that
dies leaves it serving). A template that cannot fork with Django set up execs
this module with C{--web} instead.
"""

from __future__ import annotations

import os
import signal
import socket
import sys

from twisted.application import service
from twisted.internet import task
from twisted.logger import Logger

from twistedlrp import logs
from twistedlrp.process.channel import Channel, adopt
from twistedlrp.process.forkserver import flush_stdio

log = Logger(namespace="twistedlrp.web")

# Imported by the template ahead of the forks (none imports the reactor).
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
    "twistedlrp.jobs.client.calls",
    "twistedlrp.jobs.wiring",
    "twistedlrp.server",
    "twistedlrp.web.service",
    "twistedlrp.web.site",
    "twistedlrp.web.wsgi",
)
STATUS_INTERVAL = 1.0


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
        elif name == "--jobs-connect":
            ours.setdefault("jobs-connect", []).append(value)
        else:
            ours[name.lstrip("-")] = value or True
    return ours, list(rest)


def prepare(lrp_args: list[str]):
    """Set Django up as the main process did (no checks): @return: C{(options, application)}."""
    from twistedlrp import boot
    from twistedlrp.onefile import site
    from twistedlrp.options import Options

    options = Options()
    options.parseOptions(lrp_args)
    boot.prepare_path(options["pythonpath"])
    boot.configure_settings(site.configure(options))
    logs.bridge_stdlib_logging(options["log-level"])
    boot.django_setup()
    boot.sqlite_immediate_transactions()
    boot.load_root_urlconf()
    application = boot.load_wsgi_application()
    boot.close_connections()
    return options, application


def run_web(options, application, channel_fd: int, sockets, jobs_connect, index) -> int:
    """Run one web process on C{sockets} until it stops: @return: its exit code."""
    from twisted.internet import reactor

    from twistedlrp import boot
    from twistedlrp.jobs import registry
    from twistedlrp.jobs.wiring import JobClientService
    from twistedlrp.server import WebProcessServer

    try:
        boot.import_app_modules("lrp")
        registry.discover()
    except boot.BootError as e:
        sys.stderr.write(f"twistd lrp: error: {e}\n")
        return 1
    if jobs_connect:
        options["jobs-connect"] = jobs_connect
    channel = MainChannel(reactor, channel_fd, index)
    server = WebProcessServer(
        options, application, JobClientService(reactor, options, None), sockets, channel, reactor
    )
    server.startService()
    reactor.addSystemEventTrigger("before", "shutdown", server.stopService)
    reactor.run()
    return server.exit_code


def web_main(ours: dict, lrp_args: list[str]) -> int:
    """A web process exec'd by a template that could not fork (no preload)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # ignored in the template
    logs.begin(lrp_args, sys.stdout)
    options, application = prepare(lrp_args)
    return run_web(
        options,
        application,
        int(ours["channel-fd"]),
        ours["sockets"],
        ours.get("jobs-connect"),
        int(ours["index"]),
    )


class MainChannel(service.Service):
    """
    The link to the main process: the status goes up; every web process's state,
    the job service's and template changes come down; at its end, this process stops.
    """

    name = "main-process"

    def __init__(self, reactor, fd: int, index: int):
        self.reactor, self.fd, self.index = reactor, fd, index
        self.server = self.pool = None  # the WebProcessServer and its pool, set by it
        self.protocol: Channel | None = None
        self.workers: dict | None = None
        self._loop = task.LoopingCall(self.send_status)

    def startService(self):
        super().startService()
        self.protocol = adopt(
            self.reactor, socket.socket(fileno=self.fd), Channel(self._said, self.lost)
        )
        self._loop.start(STATUS_INTERVAL, now=True)

    def _said(self, message: dict) -> None:
        event = message.get("event")
        if event == "workers":
            message["received_at"] = self.reactor.seconds()
            self.workers = message
        elif event == "templates":  # a template changed (--reload)
            from twistedlrp.reload.templates import reset_in_thread

            reset_in_thread(self.reactor).addCallbacks(
                lambda _: log.debug("Templates reloaded"),
                lambda f: log.failure("Reloading the templates failed", f),
            )

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
        if self.protocol is not None:
            self.protocol.send({"event": "status", **self.status()})

    def lost(self, reason=None) -> None:
        self.protocol = None
        if not self.running:  # stopped: the channel closes
            return
        log.warn("The main process is gone: stopping this web process")
        if self.server is not None:
            self.server.exit_code = 1
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
        return None if self.workers is None else self.workers.get("jobs")

    def stopService(self):
        super().stopService()
        if self._loop.running:
            self._loop.stop()
        if self.protocol is not None:
            self.protocol.close()


def main(argv: list[str] | None = None) -> None:
    ours, lrp_args = _parse(list(sys.argv[1:] if argv is None else argv))
    if "template" in ours:
        from twistedlrp.web.preload import template_main

        code = template_main(ours, lrp_args)
    else:
        code = web_main(ours, lrp_args)
    flush_stdio()
    os._exit(code)


if __name__ == "__main__":
    main()
