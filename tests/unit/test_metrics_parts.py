"""The metrics' pieces without a server: labels kept few, gauges read at
scrape time, a gauge that cannot be read, the endpoint's refusals."""

from __future__ import annotations

import time

from prometheus_client.parser import text_string_to_metric_families
from twisted.web.test.requesthelper import DummyRequest

from twistedlrp.metrics import Metrics
from twistedlrp.web.metrics import HTTPMetrics, MetricsResource


class _Request:
    def __init__(self, method=b"GET", code=200, path=b"/hello"):
        self.method, self.code, self.path = method, code, path
        self.started = time.monotonic()


def samples(metrics: Metrics) -> dict:
    text = metrics.exposition().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_methods_and_status_classes_stay_few():
    metrics = Metrics()
    http = HTTPMetrics(metrics, b"/-/metrics")
    for n in range(300):
        http.observe(_Request(method=b"X%d" % n, code=200))
    http.observe(_Request(method=b"DELETE", code=503))
    http.observe(_Request(code=999))
    http.observe(_Request(path=b"/-/metrics"))  # not counted
    got = samples(metrics)
    total = "lrp_http_requests_total"
    assert got[total, (("method", "other"), ("status", "2xx"))] == 300
    assert got[total, (("method", "DELETE"), ("status", "5xx"))] == 1
    assert got[total, (("method", "GET"), ("status", "other"))] == 1
    assert got["lrp_http_request_duration_seconds_count", ()] == 302
    assert len(http._children) <= 100


def test_sampled_gauges_are_read_when_scraped():
    metrics = Metrics()
    state = {"busy": 1}
    metrics.sampled("t_busy", "busy", ("state",), lambda: {("busy",): state["busy"]})
    metrics.sampled("t_broken", "broken", (), lambda: 1 / 0)
    assert samples(metrics)["t_busy", (("state", "busy"),)] == 1
    state["busy"] = 5
    got = samples(metrics)
    assert got["t_busy", (("state", "busy"),)] == 5
    # A gauge that cannot be read is left out (and logged); the others stay.
    assert not [name for name, _ in got if name == "t_broken"]


def _render(client: str, method: bytes = b"GET"):
    metrics = Metrics()
    metrics.counter("t_scrapes", "scrapes").inc()
    resource = MetricsResource(metrics, ["127.0.0.1", "10.0.0.0/8"])
    request = DummyRequest([b""])
    request.method = method
    request.client = client
    return request, resource.render(request)


def test_the_endpoint_answers_allowed_clients_only():
    request, body = _render("10.1.2.3")
    assert request.responseCode in (None, 200)
    assert request.responseHeaders.getRawHeaders(b"content-type") == [
        b"text/plain; version=0.0.4; charset=utf-8"
    ]
    assert b"t_scrapes_total 1.0" in body
    for client in ("192.0.2.1", "", "not-an-address"):
        request, body = _render(client)
        assert request.responseCode == 403, client
        assert b"t_scrapes" not in body
    request, body = _render("127.0.0.1", b"POST")
    assert request.responseCode == 405
    assert request.responseHeaders.getRawHeaders(b"allow") == [b"GET, HEAD"]
