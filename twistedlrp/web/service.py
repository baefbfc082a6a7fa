"""
The web side of the server as two services of its parent: the thread pool
(started first, stopped last) and the listening site, whose stop is step 1
of the shut-down (docs/design.md): stop listening, close idle connections,
let requests in flight finish, and cut what is left at the deadline.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.application import service
from twisted.internet import defer, fdesc

from twistedlrp import boot, metrics
from twistedlrp.jobs.client import calls as client
from twistedlrp.ordered_service import StartupFailed, within
from twistedlrp.web import metrics as web_metrics
from twistedlrp.web import ports
from twistedlrp.web.limits import Limits, StreamSlots
from twistedlrp.web.pool import ThreadPool
from twistedlrp.web.progress_stream import JobEvents
from twistedlrp.web.site import LRPSite, Router
from twistedlrp.web.static import default_static_mapping
from twistedlrp.web.wsgi import WSGIResource


class WebService(service.Service):
    """Listens on C{--listen} (or adopts C{sockets}) when it starts; drains when it stops."""

    def __init__(self, reactor, site: LRPSite, endpoints: list[str], sockets=None, name="web"):
        self.name = name
        self.reactor = reactor
        self.site = site
        self.endpoints = endpoints
        self.sockets = sockets
        self.ports: list = []

    def startService(self) -> defer.Deferred:
        super().startService()
        return defer.ensureDeferred(self._listen())

    async def _listen(self) -> None:
        if self.sockets is not None:
            for fd, family in self.sockets:
                try:
                    # A blocking socket (systemd's) would block the reactor in accept().
                    fdesc.setNonBlocking(fd)
                    # The other web processes accept on the same sockets.
                    port = ports.adopt(self.reactor, fd, family, self.site, shared=True)
                except Exception as e:
                    raise StartupFailed(f"cannot adopt listening socket {fd}: {e}") from e
                self.ports.append(port)
            return
        for endpoint in self.endpoints:
            try:
                port = await ports.listen(self.reactor, endpoint, self.site)
            except Exception as e:
                raise StartupFailed(f"cannot listen on {endpoint}: {e}") from e
            self.ports.append(port)

    def stop_by(self, deadline: float) -> defer.Deferred:
        super().stopService()
        return defer.ensureDeferred(self._drain(deadline))

    async def _drain(self, deadline: float) -> None:
        reactor = self.reactor

        def left() -> float:
            return max(deadline - reactor.seconds(), 0.2)

        for port in self.ports:
            await within(reactor, defer.maybeDeferred(port.stopListening), left())
        self.ports = []
        drained = await within(reactor, self.site.drain(), left(), "draining requests")
        if not drained:
            self.site.abort_all()
        self.site.access_log.close()


def build_web(
    reactor,
    options,
    application,
    server_state: Callable[[], str],
    started_at: float,
    sockets=None,
) -> tuple[ThreadPool, WebService, web_metrics.HealthResource]:
    """
    @return: the thread pool (a service), the site's service (listening on
        C{--listen}, or adopting the inherited C{sockets}) and the health resource.
    """
    # Django keeps a connection per thread (CONN_MAX_AGE): it dies with the thread.
    pool = ThreadPool(
        reactor, options["threads"], options["max-waiting"], on_thread_exit=boot.close_connections
    )
    health = web_metrics.HealthResource(reactor, server_state, pool, started_at)
    limits = Limits.from_options(options)
    streams, multiprocess = StreamSlots(limits.stream_threads), options["web-workers"] > 1
    wsgi = WSGIResource(reactor, pool, application, _saturated, streams, multiprocess)
    health.streams = wsgi.streams
    statics = list(options["static"])
    if not statics and not options["no-static"]:
        statics = default_static_mapping()
    events = JobEvents(reactor, client.installed)
    health.sections["progress_streams"] = events.describe
    router = Router(options["health-path"], health, statics, wsgi, events)
    site = LRPSite(
        reactor,
        router,
        max_body_size=options["max-body-size"],
        proxy_headers=options["proxy-headers"],
        forwarded_allow_ips=options["forwarded-allow-ips"],
        access_log_path=options["access-log"],
        access_log_format=options["access-log-format"],
        limits=limits,
    )
    if metrics.current is not None:  # serve this process's metrics, and count requests
        path = options["metrics-path"].encode()
        allowed = options["metrics-allow-ips"]
        router.endpoints.setdefault(path, web_metrics.MetricsResource(metrics.current, allowed))
        site.metrics = web_metrics.HTTPMetrics(metrics.current, path)
        web_metrics.watch_pool(metrics.current, pool)
    web = WebService(reactor, site, options["listen"], sockets)
    return pool, web, health


def _saturated(request) -> bytes:
    request.setResponseCode(503)
    request.setHeader(b"retry-after", b"1")
    request.setHeader(b"content-type", b"text/plain; charset=utf-8")
    return b"Server busy: every thread is taken and the queue is full. Retry shortly.\n"
