"""
The endpoints answered by the reactor: health (JSON, 200 while the server
runs, 503 while it starts, stops, or is C{"degraded"}: a section says
C{"healthy": false}) and metrics (C{--metrics-path}, for C{--metrics-allow-ips}
only), and the HTTP side's metrics (docs/metrics.md), which do not count the
metrics endpoint's requests.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from time import monotonic

from twisted.internet import threads
from twisted.logger import Logger
from twisted.web import server

from twistedlrp.metrics import Metrics
from twistedlrp.web.site import LRPSite, TrustedProxies

log = Logger()

# Seconds; a Django view takes milliseconds, a slow one seconds.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Methods counted under their own name; a client's others are "other" (few labels).
_METHODS = {
    m: m.decode() for m in (b"GET", b"HEAD", b"POST", b"PUT", b"PATCH", b"DELETE", b"OPTIONS")
}
# The text format every Prometheus reads (newer prometheus_client names 1.0.0).
CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
_CLASSES = {n: f"{n}xx" for n in range(1, 6)}


class HealthResource:
    """The health endpoint; C{server_state()} is C{"starting"}, C{"running"} or C{"stopping"}."""

    def __init__(self, reactor, server_state: Callable[[], str], pool, started_at: float):
        self._reactor = reactor
        self._server_state = server_state
        self._pool = pool
        self._started_at = started_at
        # name -> callable returning a JSON-able dict (or None: no section).
        self.sections: dict[str, Callable[[], dict]] = {}
        self.streams = None  # StreamSlots, if any
        # Returns the threads in a job call (CallSlots), if limited.
        self.job_calls: Callable[[], dict | None] | None = None

    def render(self, request):
        state = self._server_state()
        body = {
            "status": state,
            "pid": os.getpid(),
            "uptime": round(self._reactor.seconds() - self._started_at, 3),
        }
        if self._pool is not None:
            stats = self._pool.stats()
            body["threads"] = {key: stats[key] for key in ("busy", "idle", "size")}
            if self.streams is not None:
                body["threads"]["streaming"] = self.streams.taken
            job_calls = self.job_calls() if self.job_calls is not None else None
            if job_calls is not None:
                body["threads"]["job_calls"] = job_calls
            body["waiting"] = stats["waiting"]
        healthy = True
        for name, section in self.sections.items():
            try:
                value = section()
            except Exception as e:
                value = {"healthy": False, "error": str(e)}
            if value is not None:
                body[name] = value
                healthy = healthy and value.get("healthy", True)
        if state == "running" and not healthy:
            body["status"] = "degraded"
        request.setResponseCode(200 if state == "running" and healthy else 503)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return json.dumps(body).encode() + b"\n"


class HTTPMetrics:
    """The request counter and latency histogram; C{skip_path}'s requests are not counted."""

    def __init__(self, metrics: Metrics, skip_path: bytes):
        self._skip = skip_path
        self._requests = metrics.counter(
            "lrp_http_requests",
            "HTTP requests answered, by method and status class (2xx, 4xx, ...)",
            ("method", "status"),
        )
        self._latency = metrics.histogram(
            "lrp_http_request_duration_seconds",
            "Seconds from a request's whole head to the end of its answer",
            LATENCY_BUCKETS,
        )
        # (method, status class) -> its counter: labels() costs a lock and a lookup.
        self._children: dict[tuple, object] = {}

    def observe(self, request) -> None:
        """Count C{request}, which finished (or was refused before it ran)."""
        if request.path == self._skip:
            return
        key = (request.method, request.code // 100)
        child = self._children.get(key)
        if child is None:
            method = _METHODS.get(request.method, "other")
            child = self._requests.labels(method, _CLASSES.get(key[1], "other"))
            if len(self._children) < 100:  # bounded: the methods are the client's
                self._children[key] = child
        child.inc()
        started = request.started
        if started is not None:
            self._latency.observe(monotonic() - started)


def watch_pool(metrics: Metrics, pool) -> None:
    """Add the gauges of the WSGI thread C{pool}, read at scrape time."""
    metrics.sampled(
        "lrp_http_threads",
        "Threads of the pool that runs the Django application, by state (busy, idle)",
        ("state",),
        lambda: {("busy",): pool.busy, ("idle",): pool.idle},
    )
    metrics.sampled(
        "lrp_http_requests_waiting",
        "Requests accepted and waiting for a thread of the pool",
        (),
        lambda: {(): pool.waiting},
    )


class MetricsResource:
    """The metrics endpoint: 403 to a client not allowed, 405 to a method but C{GET}, C{HEAD}."""

    def __init__(self, metrics: Metrics, allowed: list[str]):
        self._metrics = metrics
        self._allowed = TrustedProxies(allowed)

    def render(self, request):
        """@return: the answer's body, or C{NOT_DONE_YET} while the files are merged."""
        request.setHeader(b"cache-control", b"no-store")
        if not request.client or request.client not in self._allowed:
            # A UNIX-socket peer without forwarded headers is refused too.
            request.setResponseCode(403)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"Forbidden: not an address of --metrics-allow-ips.\n"
        if request.method not in (b"GET", b"HEAD"):
            request.setResponseCode(405)
            request.setHeader(b"allow", b"GET, HEAD")
            return b"Method Not Allowed\n"
        request.setHeader(b"content-type", CONTENT_TYPE)
        metrics = self._metrics
        if metrics.directory is None:
            return metrics.exposition()  # values in memory: quick
        # Merging the files of every process reads the disk: not in the reactor.
        metrics.refresh()
        d = threads.deferToThread(metrics.exposition)
        d.addCallbacks(request.answer, lambda f: _failed(request, f))
        return server.NOT_DONE_YET


def _failed(request, failure) -> None:
    log.failure("Could not collect the metrics", failure)
    request.answer_text(500, b"Could not collect the metrics.\n")


class MetricsOnly:
    """The root of the C{--metrics-listen} and C{--health-listen} sites: 404 but C{routes}."""

    def __init__(self, routes: dict):
        self._routes = routes

    def route(self, request):
        found = self._routes.get(request.path)
        if found is not None:
            return found.render(request)
        served = " and ".join(path.decode() for path in self._routes)
        request.setResponseCode(404)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return f"Not Found: this port serves {served} only.\n".encode()


def side_listeners(reactor, options, metrics: Metrics | None, health) -> list:
    """
    @return: the services listening on C{--metrics-listen} for the metrics
        endpoint and the C{health} one (with C{--jobs-only}, the only way to
        read a job node's metrics; none if the metrics are off), and on
        C{--health-listen} for the health endpoint, as asked for.
    """
    health_routes = {options["health-path"].encode(): health}
    served = {}
    if metrics is not None:
        allowed = options["metrics-allow-ips"]
        path = options["metrics-path"].encode()
        served["metrics"] = {path: MetricsResource(metrics, allowed), **health_routes}
    served["health"] = health_routes
    from twistedlrp.web.service import WebService  # which imports this module

    listeners = []
    for name, routes in served.items():
        endpoint = options[f"{name}-listen"]
        if endpoint:
            site = LRPSite(
                reactor,
                MetricsOnly(routes),
                max_body_size=0,
                proxy_headers=options["proxy-headers"],
                forwarded_allow_ips=options["forwarded-allow-ips"],
            )
            listeners.append(WebService(reactor, site, [endpoint], name=f"{name}-listener"))
    return listeners
