"""
The reactor's job client (L{twistedlrp.jobs.client.connection.JobClient}) against
fake job nodes in this process (AMP servers on UNIX sockets): calls go to
the first node that is up, move to the next when it is lost (a request in
flight is sent again), come back to the first once it is up again, fail at
once when no node is up, and a frozen node is dropped by the ping.
"""

from __future__ import annotations

import time

import pytest
import pytest_twisted
from twisted.internet import defer, protocol, reactor, task
from twisted.internet.endpoints import UNIXServerEndpoint

from twistedlrp.jobs.client import calls as client
from twistedlrp.jobs.client import connection
from twistedlrp.jobs.errors import JobServiceUnavailable
from twistedlrp.jobs.protocol import wire


class FakeNode:
    """A job node that answers from memory: jobs by id, one per id."""

    def __init__(self, path, name: str):
        self.path = str(path)
        self.name = name
        self.port = None
        self.connections: list = []
        self.submits: list[str | None] = []
        self.jobs: dict[str, dict] = {}
        self.waits: list[tuple[str, float]] = []
        self.frozen = False
        self.drop_next_submit = False
        # Its store cannot be reached: a submission waits for it as long as
        # the client says it may ("wait"), then is refused, not stored.
        self.store_away = False
        self.submit_waits: list[float | None] = []
        # Answers to Wait that are held until release().
        self.held: list[defer.Deferred] = []

    async def start(self):
        node = self

        class Responder(wire.QuietAMP):
            def connectionMade(self):
                super().connectionMade()
                node.connections.append(self)

            def connectionLost(self, reason):
                if self in node.connections:
                    node.connections.remove(self)
                super().connectionLost(reason)

            @wire.Submit.responder
            def submit(
                self,
                name,
                payload,
                priority=None,
                run_after=None,
                key=None,
                timeout=None,
                id=None,
                wait=None,
            ):
                node.submits.append(id)
                node.submit_waits.append(wait)
                if node.store_away:
                    refused = JobServiceUnavailable(
                        "the job store cannot be reached (connection refused); "
                        "the job was not stored"
                    )
                    return task.deferLater(reactor, min(wait or 8.0, 8.0), _raise, refused)
                if node.drop_next_submit:
                    # Stored, but the answer never leaves: the connection breaks.
                    node.drop_next_submit = False
                    node.jobs.setdefault(id, {"id": id, "state": "queued", "node": node.name})
                    self.transport.abortConnection()
                    return defer.Deferred()
                return node.answer(
                    node.jobs.setdefault(id, {"id": id, "state": "queued", "node": node.name})
                )

            @wire.Status.responder
            def status(self, job_id):
                return node.answer({"id": job_id, "state": "running", "node": node.name})

            @wire.Wait.responder
            def wait(self, job_id, timeout, seen=None):
                node.waits.append((job_id, timeout))
                d = defer.Deferred()
                node.held.append(d)
                if not node.frozen:
                    reactor.callLater(
                        min(timeout, 0.2),
                        _fire,
                        d,
                        {"job": {"id": job_id, "state": "succeeded", "node": node.name}},
                    )
                return d

            @wire.Announce.responder
            def announce(self, job_ids):
                return node.answer_raw({"ok": True})

        factory = protocol.Factory.forProtocol(Responder)
        self.port = await UNIXServerEndpoint(reactor, self.path).listen(factory)

    def answer(self, job):
        return self.answer_raw({"job": dict(job, node=self.name)})

    def answer_raw(self, value):
        if self.frozen:
            return defer.Deferred()  # never answered
        return defer.succeed(value)

    async def kill(self):
        """As a kill -9: the socket stops listening and every connection breaks."""
        for conn in list(self.connections):
            conn.transport.abortConnection()
        if self.port is not None:
            await self.port.stopListening()
            self.port = None


def _raise(error):
    raise error


def _fire(d, value):
    if not d.called:
        d.callback(value)


async def until(predicate, timeout: float = 10.0, message: str = ""):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s: {message or predicate}")
        await task.deferLater(reactor, 0.02, lambda: None)


@pytest.fixture
def sockets(tmp_path):
    return [tmp_path / "a", tmp_path / "b"]


async def two_nodes(sockets):
    a, b = FakeNode(sockets[0], "a"), FakeNode(sockets[1], "b")
    await a.start()
    await b.start()
    jobs = connection.JobClient(
        reactor, [client.unix_client_endpoint(str(s)) for s in sockets], None, timeout=5
    )
    jobs.start()
    await until(lambda: jobs.current() is jobs.links[0], message="connected to a")
    await until(lambda: all(link.state == "up" for link in jobs.links), message="both up")
    return a, b, jobs


@pytest_twisted.ensureDeferred
async def test_calls_go_to_the_first_node_then_the_next_and_back(sockets):
    a, b, jobs = await two_nodes(sockets)
    try:
        assert (await jobs.request("status", {"job_id": "j"}))["node"] == "a"
        await a.kill()
        # The next call goes to b at once: a is known to be down.
        started = time.monotonic()
        assert (await jobs.request("status", {"job_id": "j"}))["node"] == "b"
        assert time.monotonic() - started < 0.5
        section = jobs.describe()
        assert section["node"] == jobs.links[1].endpoint and section["state"] == "up"
        assert [n["state"] for n in section["nodes"]] == ["down", "up"]
        # a comes back: it is retried in the background and used again.
        await a.start()
        await until(lambda: jobs.current() is jobs.links[0], 10, "back to a")
        assert (await jobs.request("status", {"job_id": "j"}))["node"] == "a"
    finally:
        await jobs.stop()
        await a.kill()
        await b.kill()


@pytest_twisted.ensureDeferred
async def test_a_wait_in_flight_on_a_node_that_dies_is_sent_to_the_next(sockets):
    a, b, jobs = await two_nodes(sockets)
    a.frozen = True  # a holds its Wait answers
    try:
        waiting = defer.ensureDeferred(jobs.request("wait", {"job_id": "j", "timeout": 3.0}, 8))
        await until(lambda: a.waits, message="the wait on a")
        await a.kill()
        answer = await waiting
        assert answer["node"] == "b"
        # Sent again with what was left of its timeout, not more.
        assert len(b.waits) == 1 and 2.0 < b.waits[0][1] < 3.0
    finally:
        await jobs.stop()
        await b.kill()


@pytest_twisted.ensureDeferred
async def test_a_submit_whose_answer_is_lost_is_sent_again_with_its_id(sockets):
    a, b, jobs = await two_nodes(sockets)
    a.drop_next_submit = True
    try:
        kw = {"name": "f", "payload": b"{}", "id": "11111111-1111-4111-8111-111111111111"}
        answer = await jobs.request("submit", kw)
        # a stored it and broke; the same id went to b, which answered.
        assert a.submits == [kw["id"]] and b.submits == [kw["id"]]
        assert answer["id"] == kw["id"] and answer["node"] == "b"
        # Without an id it is not sent again: the error says the outcome is unknown.
        await until(lambda: jobs.links[0].state == "up", 10, "a reconnected")
        a.drop_next_submit = True
        with pytest.raises(JobServiceUnavailable, match="may or may not have been stored"):
            await jobs.request("submit", {"name": "f", "payload": b"{}"})
        assert a.submits[-1] is None and b.submits == [kw["id"]]
    finally:
        await jobs.stop()
        await a.kill()
        await b.kill()


@pytest_twisted.ensureDeferred
async def test_a_submit_refused_for_the_shared_store_says_not_stored_in_time(sockets):
    """
    The nodes share the store: while it is away, the first node refuses
    after the share of the call's time the client gave it, and the next one
    within what is left, so that the caller hears "not stored" (safe to
    submit again) before its deadline, not "may or may not have been stored".
    """
    a, b, jobs = await two_nodes(sockets)
    a.store_away = b.store_away = True
    try:
        kw = {"name": "f", "payload": b"{}", "id": "22222222-2222-4222-8222-222222222222"}
        started = time.monotonic()
        with pytest.raises(JobServiceUnavailable) as refused:
            await jobs.request("submit", kw)
        took = time.monotonic() - started
        assert "not stored" in str(refused.value), refused.value
        assert "may or may not" not in str(refused.value), refused.value
        assert took < 5.0, took
        # 80 % of the 5 s to the first node, 80 % of the rest to the next.
        assert a.submit_waits == [pytest.approx(4.0, abs=0.1)], a.submit_waits
        assert b.submit_waits == [pytest.approx(0.8, abs=0.1)], b.submit_waits
    finally:
        await jobs.stop()
        await a.kill()
        await b.kill()


@pytest_twisted.ensureDeferred
async def test_with_no_node_up_calls_fail_at_once_and_the_link_comes_back(sockets):
    jobs = connection.JobClient(reactor, client.unix_client_endpoint(str(sockets[0])), None, 5)
    jobs.start()
    node = FakeNode(sockets[0], "a")
    try:
        for _ in range(20):
            started = time.monotonic()
            with pytest.raises(JobServiceUnavailable, match="its socket does not exist"):
                await jobs.request("status", {"job_id": "j"})
            assert time.monotonic() - started < 0.05
        assert jobs.describe()["state"] == "down"
        await node.start()
        # Retried in the background, at most every 5 s.
        await until(lambda: jobs.current() is not None, 8, "the link up")
        assert (await jobs.request("status", {"job_id": "j"}))["node"] == "a"
        # Lost: fails at once again (no other node), then reconnects.
        await node.kill()
        with pytest.raises(JobServiceUnavailable):
            started = time.monotonic()
            await jobs.request("status", {"job_id": "j"})
        assert time.monotonic() - started < 0.5
    finally:
        await jobs.stop()
        await node.kill()


@pytest_twisted.ensureDeferred
async def test_a_frozen_node_is_dropped_by_the_ping(sockets, monkeypatch):
    monkeypatch.setattr(connection, "PING_IDLE", 0.3)
    monkeypatch.setattr(connection, "PING_TIMEOUT", 0.5)
    a, b, jobs = await two_nodes(sockets)
    try:
        a.frozen = True
        started = time.monotonic()
        # A status in flight on the frozen node is sent to b once a is dropped.
        answer = await jobs.request("status", {"job_id": "j"}, 8)
        assert answer["node"] == "b"
        assert time.monotonic() - started < 3
        assert jobs.links[0].state != "up" or jobs.current() is jobs.links[0]
    finally:
        await jobs.stop()
        await a.kill()
        await b.kill()


def test_call_slots_wait_for_quick_calls_and_refuse_beside_slow_ones():
    import threading

    slots = client.CallSlots(2)
    first, second = slots.take(), slots.take()
    assert first and second and slots.taken == 2
    # Both calls are young: a third waits for a slot, and gets the one given back.
    threading.Timer(0.05, slots.give_back, [first]).start()
    started = time.monotonic()
    third = slots.take()
    assert third and 0.04 < time.monotonic() - started < 0.2
    # Both holders are old (a slow service, long waits): refused at once.
    time.sleep(slots.QUICK + 0.05)  # let them age, nothing to synchronise
    started = time.monotonic()
    assert slots.take() is None
    assert time.monotonic() - started < 0.05
    slots.give_back(second)
    assert slots.take()
    assert slots.describe() == {"busy": 2, "max": 2, "refused": 1}


def test_endpoints_separated_by_commas():
    assert client.split_endpoints(" tcp:a:1 , unix:path=/x\\,y,, tcp:b:2") == [
        "tcp:a:1",
        "unix:path=/x\\,y",
        "tcp:b:2",
    ]
    assert client.split_endpoints("") == []
