"""Login to the AMP front end, over an in-memory connection (no sockets)."""

from twisted.internet import defer
from twisted.protocols import amp
from twisted.test import iosim

from twistedlrp.jobs.errors import AuthenticationFailed
from twistedlrp.jobs.protocol import framing, wire
from twistedlrp.jobs.protocol.amp import ServiceProtocol

SECRET = b"correct horse battery staple"


class FakeService:
    """Answers stats() like the job service would (the front end only relays)."""

    def stats(self):
        return {"counters": {"submitted": 7}}


def connect(secret):
    client = wire.QuietAMP()
    server = ServiceProtocol(FakeService(), secret)
    pump = iosim.connect(server, iosim.makeFakeServer(server), client, iosim.makeFakeClient(client))
    return client, server, pump


def result_of(d, pump):
    outcome = []
    d.addBoth(outcome.append)
    pump.flush()
    assert outcome, "no answer"
    return outcome[0]


def test_login_with_the_secret_lets_commands_through():
    client, server, pump = connect(SECRET)
    assert result_of(defer.ensureDeferred(wire.login(client, SECRET)), pump) is None
    assert server.authenticated
    answer = result_of(client.callRemote(wire.Stats), pump)
    assert answer["stats"] == {"counters": {"submitted": 7}}


def test_a_wrong_secret_is_refused_and_the_connection_closed():
    client, server, pump = connect(SECRET)
    failure = result_of(defer.ensureDeferred(wire.login(client, b"wrong")), pump)
    assert failure.check(AuthenticationFailed), failure
    assert not server.authenticated
    assert server.transport is None or server.transport.disconnecting


def test_commands_before_login_are_refused_and_disconnected():
    client, server, pump = connect(SECRET)
    failure = result_of(client.callRemote(wire.Stats), pump)
    assert failure.check(AuthenticationFailed, amp.RemoteAmpError), failure
    assert "requires Login" in failure.getErrorMessage()
    pump.flush()
    assert server.transport is None or server.transport.disconnecting


def test_a_replayed_digest_is_refused():
    # Each Challenge's nonce answers one Login only.
    client, server, pump = connect(SECRET)
    nonce = result_of(client.callRemote(wire.Challenge), pump)["nonce"]
    first = wire.digest(SECRET, nonce)
    assert result_of(client.callRemote(wire.Login, digest=first), pump)["ok"] is True
    other, other_server, other_pump = connect(SECRET)
    failure = result_of(other.callRemote(wire.Login, digest=first), other_pump)
    assert failure.check(AuthenticationFailed), failure
    assert not other_server.authenticated


def test_big_values_are_split_and_joined():
    big = {"text": "x" * 200_000}
    strings = {}
    wire.BigJSON().toBox(b"job", strings, {"job": big}, None)
    assert int(strings[b"job"]) == 4 and all(len(v) <= framing.CHUNK for v in strings.values())
    objects = {}
    wire.BigJSON().fromBox(b"job", dict(strings), objects, None)
    assert objects["job"] == big
