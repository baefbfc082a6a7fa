"""
The server: one Twisted service that starts and stops every part in the
order DESIGN.md sets.

Start: thread pool, components (the job service), registered services,
start-up hooks, and only then the listening ports. Stop (SIGTERM/SIGINT):
health turns 503, ports close, connections drain, components stop, shut-down
hooks run in reverse, services stop in reverse, persistent connections
close, threads exit; one graceful deadline bounds it. A second signal ends
the process at once.

``MultiService`` is not used on purpose: it ignores Deferreds returned by
``startService`` and stops its children concurrently.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
from collections.abc import Callable

from twisted.application import service
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger

from twistedlrp import lifecycle, threads
from twistedlrp.signals import StopSignals
from twistedlrp.web.health import HealthResource
from twistedlrp.web.pool import ThreadPool
from twistedlrp.web.site import LRPSite, Router
from twistedlrp.web.wsgi import WSGIResource

log = Logger()

# Shut-down steps still get this long when the deadline has passed, so
# quick hooks run and slow ones are cut promptly.
_LATE_STEP_SECONDS = 0.2


class Component:
    """
    A part of the server with an ordered, awaited start and stop (the job
    service, the job client). Subclasses override what they need.
    """

    name = "component"

    async def start(self) -> None:
        pass

    async def stop(self, deadline: float) -> None:
        pass

    def health(self) -> dict | None:
        return None

    def force_exit(self) -> None:
        """The process is about to end at once: release what must not leak."""


class LRPServer(service.Service):
    """
    @param options: checked L{twistedlrp.options.Options}.
    @param application: the WSGI application, or C{None} with C{--jobs-only}.
    """

    name = "lrp"

    def __init__(self, options, application, reactor=None):
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.options = options
        self.application = application
        self.state = "starting"
        self.exit_code = 0
        self.components: list[Component] = []
        self.closers: list[Callable[[], object]] = []
        self.ports: list = []
        self._started_services: list[service.IService] = []
        self._starting: defer.Deferred | None = None
        self._stopping: defer.Deferred | None = None
        self.stop_signals = StopSignals(reactor, self._first_signal, self._second_signal)
        self.started_at = reactor.seconds()
        self.pool = None
        self.site = None
        self.health = None
        if application is not None:
            self._build_web()
        from twistedlrp import http as outbound

        self.closers.append(outbound.close_connections)

    def _build_web(self) -> None:
        options = self.options
        self.pool = ThreadPool(
            self.reactor,
            options["threads"],
            options["max-waiting"],
            on_thread_exit=_close_thread_connections,
        )
        self.health = HealthResource(self.reactor, lambda: self.state, self.pool, self.started_at)
        application = WSGIResource(self.reactor, self.pool, self.application, _saturated)
        statics = list(options["static"])
        if not statics and not options["no-static"]:
            from twistedlrp.web.static import default_static_mapping

            statics = default_static_mapping()
        self.static_mapping = statics
        router = Router(options["health-path"], self.health, statics, application)
        self.site = LRPSite(
            self.reactor,
            router,
            max_body_size=options["max-body-size"],
            proxy_headers=options["proxy-headers"],
            forwarded_allow_ips=options["forwarded-allow-ips"],
            access_log_path=options["access-log"],
        )

    # -- start ----------------------------------------------------------

    def startService(self):
        super().startService()
        threads.serving_reactor()
        lifecycle._server = self
        # twistd calls startService before the reactor runs; the real start
        # (and our signal handlers, which must replace the reactor's) waits
        # for the reactor.
        self._starting = defer.Deferred()
        self.reactor.callWhenRunning(self._begin)
        return self._starting

    def _begin(self) -> None:
        self.stop_signals.install()
        defer.ensureDeferred(self._start()).chainDeferred(self._starting)

    async def _start(self) -> None:
        try:
            if self.pool is not None:
                self.pool.start()
            for component in self.components:
                await component.start()
                if component.health is not None and self.health is not None:
                    section = component.health
                    if section() is not None:
                        self.health.sections[component.name] = section
            for name, svc in list(lifecycle._services.items()):
                await self._start_registered(name, svc)
            for hook in list(lifecycle._startup_hooks):
                if self.state != "starting":
                    return
                try:
                    await lifecycle.run_hook(hook)
                except Exception as e:
                    raise StartupFailed(
                        f"start-up hook {lifecycle.hook_name(hook)} failed: {type(e).__name__}: {e}"
                    ) from e
            if self.state != "starting":
                return
            if self.site is not None:
                for endpoint in self.options["listen"]:
                    try:
                        port = await serverFromString(self.reactor, endpoint).listen(self.site)
                    except Exception as e:
                        raise StartupFailed(f"cannot listen on {endpoint}: {e}") from e
                    self.ports.append(port)
            if self.state != "starting":
                return
            self.state = "running"
            addresses = ", ".join(_describe_port(p) for p in self.ports) or "no HTTP port"
            log.info(
                "twistedlrp running (pid {pid}): {addresses}, {threads} threads",
                pid=os.getpid(),
                addresses=addresses,
                threads=self.options["threads"] if self.pool else 0,
            )
        except StartupFailed as e:
            log.failure("twistd lrp: {error}", error=str(e), failure=_cause_failure(e))
            self._fail_startup(str(e))
        except Exception as e:
            log.failure("twistd lrp: start-up failed: {error}", error=f"{type(e).__name__}: {e}")
            self._fail_startup(f"start-up failed: {type(e).__name__}: {e}")

    async def _start_registered(self, name: str, svc) -> None:
        try:
            await defer.maybeDeferred(svc.startService)
        except Exception as e:
            raise StartupFailed(f"service {name!r} failed to start: {type(e).__name__}: {e}") from e
        self._started_services.append(svc)

    def service_added(self, name: str, svc) -> None:
        """A service registered while the server runs starts at once."""
        if self.state == "running":
            d = defer.ensureDeferred(self._start_registered(name, svc))
            d.addErrback(lambda f: log.failure("Service {name} failed to start", f, name=name))

    def _fail_startup(self, message: str) -> None:
        set_exit_code(1)
        self.exit_code = 1
        # One plain line on the terminal too, in case the log goes elsewhere.
        _write_stderr(f"twistd lrp: error: {message.splitlines()[0]}\n")
        if self.reactor.running:
            self.reactor.stop()

    # -- signals --------------------------------------------------------

    def _first_signal(self, name: str) -> None:
        log.info(
            "Received {signal}: shutting down gracefully (up to {timeout:g} s); "
            "send it again to stop at once.",
            signal=name,
            timeout=self.options["graceful-timeout"],
        )

    def _second_signal(self, name: str) -> None:
        _write_stderr(f"twistd lrp: second {name}: exiting at once\n")
        for component in self.components:
            try:
                component.force_exit()
            except Exception:
                pass
        _flush_everything()
        os._exit(1)

    # -- stop -----------------------------------------------------------

    def stopService(self):
        super().stopService()
        if self._stopping is None:
            self._stopping = defer.ensureDeferred(self._stop())
        return self._stopping

    async def _stop(self) -> None:
        reactor = self.reactor
        deadline = reactor.seconds() + self.options["graceful-timeout"]
        was_running = self.state == "running"
        self.state = "stopping"
        if was_running:
            log.info("Stopping: draining requests")
        # 1. No new connections; idle ones close; requests in flight finish.
        for port in self.ports:
            await self._within(defer.maybeDeferred(port.stopListening), deadline, "closing a port")
        self.ports = []
        if self.site is not None:
            drained = await self._within(self.site.drain(), deadline, "draining requests")
            if not drained:
                self.site.abort_all()
        # Nothing from a request can need the reactor any more.
        threads.begin_shutdown()
        # 2. Jobs.
        for component in reversed(self.components):
            await self._within(
                defer.ensureDeferred(component.stop(deadline)),
                deadline,
                f"stopping {component.name}",
            )
        # 3. The site's shut-down hooks, newest first.
        for hook in reversed(list(lifecycle._shutdown_hooks)):
            await self._within(
                lifecycle.run_hook(hook), deadline, f"shut-down hook {lifecycle.hook_name(hook)}"
            )
        for svc in reversed(self._started_services):
            await self._within(defer.maybeDeferred(svc.stopService), deadline, "stopping a service")
        # 4. Persistent connections, then the threads.
        for close in self.closers:
            await self._within(defer.maybeDeferred(close), deadline, "closing connections")
        if self.pool is not None:
            await self._within(self.pool.stop(), deadline, "stopping the thread pool")
        if self.site is not None:
            self.site.close_access_log()
        lifecycle._server = None
        log.info("twistedlrp stopped")

    async def _within(self, d: defer.Deferred, deadline: float, what: str) -> bool:
        """
        Wait for C{d} until C{deadline}.

        @return: C{True} if it finished (successfully or not) in time.
        """
        remaining = max(deadline - self.reactor.seconds(), _LATE_STEP_SECONDS)
        d.addTimeout(remaining, self.reactor)
        try:
            await d
        except defer.TimeoutError:
            log.warn("{what} did not finish before the graceful deadline", what=what)
            return False
        except Exception:
            log.failure("Error while {what}", what=what)
        return True


class StartupFailed(Exception):
    """A start-up step failed; the message says which and why."""


def _cause_failure(error: StartupFailed):
    from twisted.python.failure import Failure

    cause = error.__cause__ or error
    return Failure(cause, type(cause), cause.__traceback__)


def _saturated(request) -> bytes:
    request.setResponseCode(503)
    request.setHeader(b"retry-after", b"1")
    request.setHeader(b"content-type", b"text/plain; charset=utf-8")
    return b"Server busy: every thread is taken and the queue is full. Retry shortly.\n"


def _close_thread_connections() -> None:
    # Django keeps a connection per thread (CONN_MAX_AGE): it dies with the thread.
    from django.db import connections

    connections.close_all()


def _describe_port(port) -> str:
    host = port.getHost()
    if hasattr(host, "port"):
        return f"http://{host.host}:{host.port}/"
    return f"unix:{getattr(host, 'name', host)}"


_exit_code = 0


def set_exit_code(code: int) -> None:
    """
    Make the process exit with C{code} once twistd returns (twistd itself
    always exits 0 after the reactor stops).
    """
    global _exit_code
    if _exit_code == 0:
        atexit.register(_exit_with_code)
    _exit_code = code


def _exit_with_code() -> None:
    if _exit_code:
        _flush_everything()
        os._exit(_exit_code)


def _flush_everything() -> None:
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            stream.flush()
        except Exception:
            pass


def _write_stderr(text: str) -> None:
    try:
        os.write(2, text.encode("utf-8", "replace"))
    except OSError:
        pass


def build_server(options, reactor=None) -> LRPServer:
    """
    Run the start-up steps that precede the reactor (DESIGN.md 1 to 3) and
    return the L{LRPServer}.

    @raise twistedlrp.boot.BootError: Django could not be set up.
    """
    from twistedlrp import boot

    threads.serving_reactor()
    boot.prepare_path(options["pythonpath"])
    boot.configure_settings(options["settings"])
    boot.bridge_stdlib_logging()
    boot.setup_django()
    application = None if options["jobs-only"] else boot.load_wsgi_application()
    boot.import_app_modules("lrp")
    boot.close_connections()

    from twistedlrp.jobs.components import add_job_components

    server = LRPServer(options, application, reactor=reactor)
    add_job_components(server, options)
    boot.close_connections()
    return server
