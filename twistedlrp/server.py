"""
The root service of ``twistd lrp``: its children start in the order of
docs/design.md's start-up contract (L{Server._add_children}) and stop in reverse.
"""

from __future__ import annotations

import contextlib
import os
import signal

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from twistedlrp import boot, lifecycle, logs, metrics, reactor_bridge
from twistedlrp import http as outbound
from twistedlrp.onefile import site
from twistedlrp.ordered_service import OrderedService, StartupFailed
from twistedlrp.reload import templates
from twistedlrp.signals import StopSignals, flush_everything, set_exit_code, write_stderr

log = Logger()


class Server(OrderedService):
    """What the three kinds of server process share; C{scope}: see L{lifecycle.in_scope}."""

    name = "lrp"
    role = scope = ""
    running_text = "twistedlrp running"
    channel = None
    web_processes = None

    def __init__(self, options, reactor, job_service=None):
        super().__init__(reactor, options["graceful-timeout"])
        self.options = options
        self.state = "starting"
        self.exit_code = 0
        self.stop_signals = StopSignals(reactor, self._first_signal, self._second_signal)
        self.started_at = reactor.seconds()
        self.web = self.health = None
        self.metrics = metrics.configure(self.role, options)
        if job_service is not None:
            from twistedlrp.jobs.service import metrics as job_metrics

            job_metrics.watch(self.metrics, job_service)

    def _add_children(self, job_service, job_client, pool=None, serving=()) -> None:
        for child in (
            self.channel,
            pool,
            _Closer("outbound-http", outbound.close_connections),
            lifecycle.SiteServices(self.scope),
            job_client,
            lifecycle.ShutdownHooks(self.reactor, self.scope),
            job_service,
            lifecycle.StartupHooks(self.scope),
            _Closer("calls-from-threads", reactor_bridge.begin_shutdown),
            metrics.refresh_service(self.reactor, self.metrics),
            *serving,
        ):
            if child is not None:
                self.addService(child)

    def _build_web(self, application, job_client, sections: dict, sockets=None):
        """@return: the thread pool service of the site built, whose health shows C{sections}."""
        from twistedlrp.web.service import build_web

        pool, self.web, self.health = build_web(
            self.reactor, self.options, application, lambda: self.state, self.started_at, sockets
        )
        self.health.sections.update(sections)
        if job_client is not None:
            # Job calls take at most this many of the pool's threads.
            threads = self.options["job-threads"] or max(self.options["threads"] // 2, 1)
            job_client.call_threads = threads
            self.health.sections["job_link"] = job_client.describe
            self.health.job_calls = _call_slots
        return pool

    def _side_listeners(self, job_service, job_client) -> tuple:
        """@return: the C{--metrics-listen} and C{--health-listen} services (or no web import)."""
        if not (self.options["metrics-listen"] or self.options["health-listen"]):
            return ()
        from twistedlrp.web import metrics as web_metrics

        health = self.health
        if health is None:  # a process that serves no site (a job node)
            health = web_metrics.HealthResource(
                self.reactor, lambda: self.state, None, self.started_at
            )
            if job_service is not None:
                health.sections["jobs"] = job_service.health
            if job_client is not None:
                health.sections["job_link"] = job_client.describe
        return web_metrics.side_listeners(self.reactor, self.options, self.metrics, health)

    def startService(self):
        service.Service.startService(self)
        reactor_bridge.serving_reactor()
        # Once the reactor runs: our signal handlers replace those it installs then.
        started = defer.Deferred()
        self.reactor.callWhenRunning(self._begin, started)
        return started

    def _begin(self, started: defer.Deferred) -> None:
        self._install_signals()
        defer.ensureDeferred(self._start()).chainDeferred(started)

    def _install_signals(self) -> None:
        self.stop_signals.install()

    async def _start(self) -> None:
        try:
            await self.start_children()
            if self.state != "starting":
                return
            self.state = "running"
            self._running()
        except StartupFailed as e:
            cause = e.__cause__ or e
            failure = Failure(cause, type(cause), cause.__traceback__)
            log.failure("twistd lrp: {error}", failure, error=str(e))
            self.fail(str(e))
        except Exception as e:
            log.failure("twistd lrp: start-up failed: {error}", error=f"{type(e).__name__}: {e}")
            self.fail(f"start-up failed: {type(e).__name__}: {e}")

    def fail(self, message: str) -> None:
        # Status 1, so that systemd's Restart=on-failure restarts; one plain
        # line on the terminal, in case the log goes elsewhere.
        set_exit_code(1)
        self.exit_code = 1
        write_stderr(f"twistd lrp: error: {message.splitlines()[0]}\n")
        if self.reactor.running:
            self.reactor.stop()

    def _running(self) -> None:
        ports = self.web.ports if self.web is not None else []
        log.info(
            self.running_text + " (pid {pid}): {addresses}, {threads} threads",
            pid=os.getpid(),
            addresses=", ".join(_describe_port(p) for p in ports) or "no HTTP port",
            threads=self.options["threads"] if self.web is not None else 0,
        )

    def reload_templates(self, files: list[str]) -> defer.Deferred:
        """Template C{files} changed: reset Django's template loaders here and in web processes."""
        told = self.web_processes and self.web_processes.reload_templates()

        def done(_):
            log.info(
                "{changes} changed: templates reloaded without a restart{where}",
                changes=templates.describe_changes(files),
                where=f"; {told} web processes told to reload theirs" if told is not None else "",
            )

        d = templates.reset_in_thread(self.reactor)
        d.addCallbacks(done, lambda f: log.failure("Reloading the templates failed", f))
        return d

    def _first_signal(self, name: str) -> None:
        log.info(
            "Received {signal}: shutting down gracefully (up to {timeout:g} s); "
            "send it again to stop at once.",
            signal=name,
            timeout=self.options["graceful-timeout"],
        )

    def _second_signal(self, name: str) -> None:
        write_stderr(f"twistd lrp: second {name}: exiting at once\n")
        for child in self:
            with contextlib.suppress(Exception):
                getattr(child, "force_exit", lambda: None)()
        flush_everything()
        os._exit(1)

    def stopService(self):
        if self._stopping is None:
            if self.state == "running":
                log.info("Stopping: draining requests")
            self.state = "stopping"
            if self.channel is not None:
                self.channel.send_status()
            super().stopService().addCallback(lambda _: log.info("twistedlrp stopped"))
        return self._stopping


class SingleServer(Server):
    """The one process that serves everything; C{application} is C{None} with C{--jobs-only}."""

    role, scope = "single", "all"

    def __init__(self, options, application, jobs, reactor):
        job_service, job_client = jobs
        super().__init__(options, reactor, job_service)
        pool = None
        if application is not None:
            sections = {"jobs": job_service.health} if job_service is not None else {}
            pool = self._build_web(application, job_client, sections)
        serving = (self.web, *self._side_listeners(job_service, job_client))
        self._add_children(job_service, job_client, pool, serving)


class MainServer(Server):
    """The main process of C{--web-workers} above 1: the jobs, the C{once} hooks, no HTTP."""

    role, scope = "main", "once"

    def __init__(self, options, jobs, reactor):
        job_service, job_client = jobs
        super().__init__(options, reactor, job_service)
        from twistedlrp.web.processes import WebProcesses

        health = job_service.health if job_service is not None else None
        self.web_processes = WebProcesses(
            self.reactor, options, health, job_service, on_fatal=self.fail
        )
        serving = (self.web_processes, *self._side_listeners(job_service, job_client))
        self._add_children(job_service, job_client, serving=serving)

    def _running(self) -> None:
        log.info(
            "twistedlrp running (pid {pid}): {addresses}, {count} web processes "
            "of {threads} threads each",
            pid=os.getpid(),
            addresses=", ".join(self.web_processes.addresses) or "no HTTP port",
            count=self.web_processes.count,
            threads=self.options["threads"],
        )


class WebProcessServer(Server):
    """One web process of C{--web-workers}: the site on inherited C{sockets}, plain hooks."""

    role, scope = "web", "each"
    running_text = "twistedlrp web process running"

    def __init__(self, options, application, job_client, sockets, channel, reactor):
        super().__init__(options, reactor)
        self.channel = channel
        sections = {"jobs": channel.jobs_section, "web_workers": channel.workers_section}
        pool = self._build_web(application, job_client, sections, sockets)
        channel.server = self
        channel.pool = pool
        self._add_children(None, job_client, pool, (self.web,))

    def _install_signals(self) -> None:
        super()._install_signals()
        if self.stop_signals.installed:
            # The main process stops its web processes (SIGTERM, or end of
            # file on the channel); a Ctrl-C on the terminal reaches it.
            signal.signal(signal.SIGINT, signal.SIG_IGN)

    def _running(self) -> None:
        self.channel.send_status()
        super()._running()

    def _second_signal(self, name: str) -> None:
        # SIGTERM to the whole group (systemd) and the main process's own:
        # still one graceful stop; the main process kills at its deadline.
        pass


class _Closer(service.Service):
    def __init__(self, name: str, close):
        self.name = name
        self.close = close

    def stopService(self):
        super().stopService()
        return self.close()


def build_server(options) -> Server:
    """@return: a L{SingleServer}, or L{MainServer} (C{--web-workers} above 1); @raise BootError."""
    reactor_bridge.serving_reactor()
    boot.prepare_path(options["pythonpath"])
    boot.configure_settings(site.configure(options))
    logs.bridge_stdlib_logging(options["log-level"])
    web = not options["jobs-only"]
    boot.setup_django(load_urlconf=web)
    application = boot.load_wsgi_application() if web else None
    boot.import_app_modules("lrp")

    from twisted.internet import reactor

    from twistedlrp.jobs.wiring import job_services

    jobs = job_services(reactor, options)
    if web and options["web-workers"] > 1:
        server = MainServer(options, jobs, reactor)
    else:
        server = SingleServer(options, application, jobs, reactor)
    boot.close_connections()
    return server


def _describe_port(port) -> str:
    host = port.getHost()
    if hasattr(host, "port"):
        return f"http://{host.host}:{host.port}/"
    name = getattr(host, "name", host)
    return f"unix:{name.decode(errors='replace') if isinstance(name, bytes) else name}"


def _call_slots() -> dict | None:
    from twistedlrp.jobs.client import calls as client

    slots = client.call_slots()
    return slots.describe() if slots is not None else None
