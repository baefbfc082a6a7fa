"""The health resource's answer in each server state (the states a load
balancer sees only for an instant on a real server)."""

import json

from twisted.internet.task import Clock
from twisted.web.test.requesthelper import DummyRequest

from twistedlrp.web.metrics import HealthResource
from twistedlrp.web.pool import ThreadPool


def _render(state: str):
    clock = Clock()
    clock.advance(100)
    pool = ThreadPool(clock, size=4, max_waiting=10)
    resource = HealthResource(clock, lambda: state, pool, started_at=40)
    resource.sections["jobs"] = lambda: {"queued": 3}
    request = DummyRequest([b""])
    body = resource.render(request)
    return request.responseCode, request.responseHeaders, json.loads(body)


def test_running_is_200_with_json():
    code, headers, body = _render("running")
    assert code == 200
    assert headers.getRawHeaders(b"content-type") == [b"application/json"]
    assert body["status"] == "running"
    assert body["uptime"] == 60
    assert body["threads"] == {"busy": 0, "idle": 0, "size": 4}
    assert body["jobs"] == {"queued": 3}


def test_starting_and_stopping_are_503():
    for state in ("starting", "stopping"):
        code, _, body = _render(state)
        assert code == 503
        assert body["status"] == state
