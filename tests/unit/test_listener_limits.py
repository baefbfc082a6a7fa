"""
The job listeners' limits (size before and after login, login deadline,
connections waiting to log in, rate-limited warnings) and the permission
checks of the secret file and the state directory: in memory, on a fake
clock, no sockets.
"""

from __future__ import annotations

import os
import struct

import pytest
from twisted.cred import credentials, portal
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import Logger, LogLevel, formatEvent, globalLogPublisher
from twisted.protocols import amp
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.spread import banana, pb
from twisted.test import iosim

from twistedlrp.jobs.pb import GuardedPBServerFactory, JobsRealm, SecretChecker
from twistedlrp.jobs.protocol import limits, wire
from twistedlrp.jobs.protocol.amp import AMPFrontEnd, ServiceFactory, ServiceProtocol
from twistedlrp.options import Options
from twistedlrp.ordered_service import StartupFailed

SECRET = b"correct horse battery staple"
MAX_PAYLOAD = 100_000


class FakeService:
    max_payload = MAX_PAYLOAD

    def __init__(self):
        self.submitted = []

    def stats(self):
        return {"counters": {}}

    def submit(self, name, payload, *rest, **options):
        self.submitted.append((name, len(payload)))
        return {"id": "1", "name": name}


@pytest.fixture
def warnings():
    """The text of the warnings logged during the test."""
    seen = []

    def observer(event):
        if event.get("log_level") == LogLevel.warn:
            seen.append(formatEvent(event))

    globalLogPublisher.addObserver(observer)
    yield seen
    globalLogPublisher.removeObserver(observer)


def encode(box: dict) -> bytes:
    """One AMP box on the wire, keys in the order given."""
    data = b"".join(
        struct.pack("!H", len(k)) + k + struct.pack("!H", len(v)) + v for k, v in box.items()
    )
    return data + b"\x00\x00"


def boxes(transport: StringTransport) -> list[amp.AmpBox]:
    return amp.parseString(transport.value())


def amp_server(secret=SECRET, bounds=limits.Limits(), service=None):
    clock = Clock()
    gate = limits.Gate(clock, "tcp:8001", bounds)
    factory = ServiceFactory(service or FakeService(), secret, gate)
    return clock, gate, factory


def connect(factory, port=40000, host="127.0.0.1"):
    peer = IPv4Address("TCP", host, port)
    proto = factory.buildProtocol(peer)
    if proto is None:
        return None, None
    transport = StringTransport(peerAddress=peer)
    proto.makeConnection(transport)
    return proto, transport


def login(proto, transport):
    proto.dataReceived(encode({b"_command": b"Challenge", b"_ask": b"1"}))
    (answer,) = boxes(transport)
    transport.clear()
    digest = wire.digest(SECRET, answer[b"nonce"])
    proto.dataReceived(encode({b"_command": b"Login", b"_ask": b"2", b"digest": digest}))
    assert boxes(transport)[0][b"ok"] == b"True"
    transport.clear()
    assert proto.authenticated


def submit_box(payload_size: int, ask=b"9") -> bytes:
    strings = {}
    wire.BigBytes().toBox(b"payload", strings, {"payload": b"x" * payload_size}, None)
    return encode({b"_ask": ask, b"_command": b"Submit", b"name": b"app.jobs.add", **strings})


# -- AMP before login ----------------------------------------------------------


def test_a_large_box_before_login_is_refused_as_it_arrives(warnings):
    clock, gate, factory = amp_server()
    proto, transport = connect(factory)
    data = submit_box(5_000_000)
    # Fed the way a socket would: the refusal comes after a few KiB.
    for offset in range(0, len(data), 1024):
        proto.dataReceived(data[offset : offset + 1024])
        if transport.disconnecting:
            break
    assert transport.disconnecting
    assert offset <= limits.PRE_LOGIN_BYTES
    (error,) = boxes(transport)
    assert error[b"_error"] == b"9" and error[b"_error_code"] == b"AUTHENTICATION_FAILED"
    assert b"at most 4096 bytes before" in error[b"_error_description"]
    # What comes after is dropped.
    proto.dataReceived(data[offset : offset + 65536])
    assert proto.reader.buffered < 65536
    assert any("sent more than 4096 bytes before logging in" in w for w in warnings)
    assert "127.0.0.1:40000" in warnings[-1]


def test_one_large_value_before_login_is_refused_before_it_is_complete():
    clock, gate, factory = amp_server()
    proto, transport = connect(factory)
    proto.dataReceived(encode({b"_ask": b"1", b"_command": b"Challenge"})[:-2])
    proto.dataReceived(struct.pack("!H", 4) + b"junk" + struct.pack("!H", 60_000) + b"y" * 5000)
    assert transport.disconnecting


def test_many_small_boxes_before_login_add_up():
    clock, gate, factory = amp_server()
    proto, transport = connect(factory)
    challenge = encode({b"_command": b"Challenge", b"_ask": b"1"})
    for _ in range(limits.PRE_LOGIN_BYTES // len(challenge) + 1):
        proto.dataReceived(challenge)
    assert transport.disconnecting


def test_login_then_commands_within_the_limits():
    service = FakeService()
    clock, gate, factory = amp_server(service=service)
    proto, transport = connect(factory)
    login(proto, transport)
    # A payload at the limit, in a box with the other keys, goes through to the service.
    proto.dataReceived(submit_box(MAX_PAYLOAD))
    assert service.submitted == [("app.jobs.add", MAX_PAYLOAD)]
    assert not transport.disconnecting
    # Box after box: each is counted on its own.
    for _ in range(5):
        proto.dataReceived(submit_box(MAX_PAYLOAD))
    assert len(service.submitted) == 6 and not transport.disconnecting


def test_boxes_arriving_together_or_in_pieces_are_each_answered_in_order():
    service = FakeService()
    clock, gate, factory = amp_server(service=service)
    proto, transport = connect(factory)
    login(proto, transport)
    stream = b"".join(submit_box(size, ask=b"%d" % size) for size in (10, 20, 30, 40))
    # Two whole boxes and part of the third, then the rest one byte at a time.
    cut = len(submit_box(10, b"10")) + len(submit_box(20, b"20")) + 7
    proto.dataReceived(stream[:cut])
    assert service.submitted == [("app.jobs.add", 10), ("app.jobs.add", 20)]
    for i in range(cut, len(stream)):
        proto.dataReceived(stream[i : i + 1])
    assert [size for _, size in service.submitted] == [10, 20, 30, 40]
    assert [box[b"_answer"] for box in boxes(transport)] == [b"10", b"20", b"30", b"40"]
    assert not transport.disconnecting


def test_a_box_over_the_limit_after_good_ones_in_the_same_read_is_refused(warnings):
    service = FakeService()
    clock, gate, factory = amp_server(service=service)
    proto, transport = connect(factory)
    login(proto, transport)
    limit = MAX_PAYLOAD + limits.BOX_FRAMING
    proto.dataReceived(submit_box(10, b"1") + submit_box(2 * limit, b"2"))
    first, refused = boxes(transport)
    assert first[b"_answer"] == b"1" and service.submitted == [("app.jobs.add", 10)]
    assert refused[b"_error"] == b"2" and refused[b"_error_code"] == b"PAYLOAD_TOO_LARGE"
    assert transport.disconnecting


def test_a_key_longer_than_amp_allows_after_login_closes_the_connection():
    clock, gate, factory = amp_server()
    proto, transport = connect(factory)
    login(proto, transport)
    proto.dataReceived(encode({b"_ask": b"1", b"k" * 256: b"v"}))
    assert transport.disconnecting


def test_the_login_deadline(warnings):
    clock, gate, factory = amp_server(bounds=limits.Limits(login_timeout=10))
    slow, slow_transport = connect(factory)
    quick, quick_transport = connect(factory, 40001)
    assert gate.waiting == 2
    clock.advance(5)
    login(quick, quick_transport)
    assert gate.waiting == 1
    clock.advance(4.9)
    assert not slow_transport.disconnecting
    clock.advance(0.2)
    assert slow_transport.disconnecting
    assert not quick_transport.disconnecting
    assert "did not log in within 10 s" in warnings[-1]
    slow.connectionLost(Failure(ConnectionDone()))
    assert gate.waiting == 0 and not clock.getDelayedCalls()


def test_connections_from_one_address_make_room_among_themselves(warnings):
    bounds = limits.Limits(max_unauthenticated=5, max_unauthenticated_per_peer=2)
    clock, gate, factory = amp_server(bounds=bounds)
    first = connect(factory, 40000)
    second = connect(factory, 40001)
    other = connect(factory, 40100, host="127.0.0.2")
    assert gate.waiting == 3 and gate.waiting_from(first[0].peer) == 2
    # A third from 127.0.0.1 closes the one from there that has waited longest ...
    third = connect(factory, 40002)
    assert third[0] is not None
    assert first[1].disconnecting and first[0]._refused
    assert not second[1].disconnecting and not other[1].disconnecting
    assert gate.waiting == 3 and gate.evictions == 1
    # ... and that one's data is dropped, its deadline is gone.
    first[0].dataReceived(encode({b"_command": b"Challenge", b"_ask": b"1"}))
    assert boxes(first[1]) == []
    assert len(clock.getDelayedCalls()) == 3
    # Many more from 127.0.0.1: 127.0.0.2 keeps its place and logs in.
    for port in range(40003, 40050):
        connect(factory, port)
    assert gate.waiting == 3 and gate.evictions == 48
    assert not other[1].disconnecting
    login(*other)
    assert gate.waiting == 2
    refused = [w for w in warnings if "from one address" in w]
    assert len(refused) == 1 and "127.0.0.1:40000" in refused[0]
    assert "2 connections from 127.0.0.1 were waiting to log in" in refused[0]
    clock.advance(limits.REFUSAL_LOG_INTERVAL)
    refused = [w for w in warnings if "from one address" in w]
    assert len(refused) == 2 and "47 more like this in the last 5 s" in refused[1]


def test_when_all_are_waiting_the_one_that_waited_longest_makes_room(warnings):
    bounds = limits.Limits(max_unauthenticated=3, max_unauthenticated_per_peer=2)
    clock, gate, factory = amp_server(bounds=bounds)
    waiting = [connect(factory, 40000 + n, host=f"127.0.0.{n + 2}") for n in range(3)]
    clock.advance(1)
    newcomer = connect(factory, 40010, host="127.0.0.9")
    assert waiting[0][1].disconnecting
    assert not any(transport.disconnecting for _, transport in waiting[1:])
    assert gate.waiting == 3
    assert "connections were waiting to log in, the most allowed" in warnings[-1]
    assert "127.0.0.2:40000" in warnings[-1]
    # A login, or a connection that goes away, makes room without closing any.
    login(*newcomer)
    waiting[1][0].connectionLost(Failure(ConnectionDone()))
    connect(factory, 40011, host="127.0.0.9")
    connect(factory, 40012, host="127.0.0.10")
    assert gate.evictions == 1 and gate.waiting == 3


def test_ipv6_peers_are_counted_by_their_64():
    assert limits.peer_key(IPv6Address("TCP", "2001:db8:1:2:aaaa::1", 1)) == "2001:db8:1:2::/64"
    assert limits.peer_key(IPv6Address("TCP", "2001:db8:1:2:bbbb::7", 1)) == "2001:db8:1:2::/64"
    assert limits.peer_key(IPv6Address("TCP", "2001:db8:1:3::1", 1)) == "2001:db8:1:3::/64"
    assert limits.peer_key(IPv6Address("TCP", "::ffff:10.0.0.7", 1)) == "10.0.0.7"
    assert limits.peer_key(IPv4Address("TCP", "10.0.0.7", 1)) == "10.0.0.7"


def test_the_trusted_socket_has_no_deadline_and_no_cap():
    clock, gate, factory = amp_server(secret=None, bounds=limits.Limits(max_unauthenticated=1))
    connections = [connect(factory, n) for n in range(3)]
    assert all(proto is not None and proto.authenticated for proto, _ in connections)
    assert gate.waiting == 0 and not clock.getDelayedCalls()


# -- AMP after login -------------------------------------------------------------


@pytest.mark.parametrize("secret", [SECRET, None])
def test_a_box_over_the_payload_limit_is_refused_and_dropped(secret, warnings):
    service = FakeService()
    clock, gate, factory = amp_server(secret=secret, service=service)
    proto, transport = connect(factory)
    if secret:
        login(proto, transport)
    limit = MAX_PAYLOAD + limits.BOX_FRAMING
    data = submit_box(limit * 20)
    sent = 0
    for offset in range(0, len(data), 65536):
        proto.dataReceived(data[offset : offset + 65536])
        sent = offset + 65536
        if boxes(transport):
            break
    # Answered as soon as the box is over the limit ...
    assert sent <= limit + 2 * 65536
    (error,) = boxes(transport)
    assert error[b"_error"] == b"9" and error[b"_error_code"] == b"PAYLOAD_TOO_LARGE"
    assert b"(--max-job-payload)" in error[b"_error_description"]
    assert "sent a Submit of more than" in warnings[-1]
    # ... then the rest is read without being kept, and the connection
    # closes at the end of the box.
    for offset in range(sent, len(data) - 2, 65536):
        proto.dataReceived(data[offset : min(offset + 65536, len(data) - 2)])
        assert len(proto.reader.box) == 0
        assert proto.reader.buffered <= 65537
    assert not transport.disconnecting
    proto.dataReceived(data[-2:])
    assert transport.disconnecting
    assert service.submitted == []


def test_a_refused_box_that_never_ends_is_closed_after_a_while():
    clock, gate, factory = amp_server()
    proto, transport = connect(factory)
    login(proto, transport)
    proto.dataReceived(submit_box(3 * (MAX_PAYLOAD + limits.BOX_FRAMING))[:-2])
    assert boxes(transport)[0][b"_error_code"] == b"PAYLOAD_TOO_LARGE"
    assert not transport.disconnecting
    clock.advance(limits.DISCARD_TIMEOUT)
    assert transport.disconnecting


def test_the_protocol_alone_keeps_the_size_limits():
    # Without a gate (as tests build it): no deadline, but the same sizes.
    proto = ServiceProtocol(FakeService(), SECRET)
    transport = StringTransport()
    proto.makeConnection(transport)
    proto.dataReceived(submit_box(10_000))
    assert transport.disconnecting


# -- the rate-limited warnings -------------------------------------------------------


def test_refusals_are_logged_at_most_once_per_interval_and_kind(warnings):
    clock = Clock()
    refusals = limits.RefusalLog(clock, Logger(), interval=5)
    for n in range(100):
        refusals.warn("a", "refused {peer}", peer=n)
    refusals.warn("b", "other {peer}", peer="x")
    assert warnings == ["refused 0", "other x"]
    clock.advance(5)
    assert warnings[-1].startswith("refused 99 (99 more like this in the last 5 s")
    refusals.warn("a", "refused {peer}", peer="late")
    assert len(warnings) == 3
    clock.advance(5)
    assert warnings[-1].startswith("refused late (1 more like this")
    clock.advance(10)
    refusals.warn("a", "refused {peer}", peer="again")
    assert warnings[-1] == "refused again"


# -- Perspective Broker ---------------------------------------------------------------


def b128(number: int) -> bytes:
    """A Banana length prefix."""
    pieces = []
    banana.int2b128(number, pieces.append)
    return b"".join(pieces)


def pb_server(bounds=limits.Limits(), max_message=300_000):
    clock = Clock()
    guard = portal.Portal(JobsRealm(FakeService()), [SecretChecker(clock, SECRET)])
    gate = limits.Gate(clock, "tcp:8002", bounds)
    return clock, gate, GuardedPBServerFactory(guard, gate, max_message)


def pb_connect(factory, host="127.0.0.1"):
    peer = IPv4Address("TCP", host, 40100)
    server = factory.buildProtocol(peer)
    client_factory = pb.PBClientFactory()
    client = client_factory.buildProtocol(None)
    server_transport = iosim.makeFakeServer(server)
    server_transport.peerAddress = peer
    pump = iosim.connect(server, server_transport, client, iosim.makeFakeClient(client))
    return server, client_factory, pump


def pb_login(client_factory, pump, secret=SECRET):
    outcome = []
    client_factory.login(credentials.UsernamePassword(b"lrp", secret)).addBoth(outcome.append)
    pump.flush()
    return outcome[0]


def test_pb_login_then_calls():
    clock, gate, factory = pb_server()
    server, client_factory, pump = pb_connect(factory)
    assert gate.waiting == 1
    avatar = pb_login(client_factory, pump)
    assert server.authenticated and gate.waiting == 0
    answers = []
    avatar.callRemote("stats").addBoth(answers.append)
    pump.flush()
    assert answers == [{"counters": {}}]
    clock.advance(60)
    assert not server.transport.disconnecting


def test_pb_bytes_before_login_are_capped(warnings):
    clock, gate, factory = pb_server()
    server, client_factory, pump = pb_connect(factory)
    pump.flush()
    # A list of many long strings: Banana would keep it all until the end.
    server.dataReceived(b128(1000) + banana.LIST)
    for _ in range(3):
        server.dataReceived(b128(65536) + banana.STRING + b"z" * 65536)
    assert server.transport.disconnecting
    assert all(not items for _, items in server.listStack)
    assert "sent more than 4096 bytes before logging in" in warnings[-1]


def test_pb_login_deadline():
    clock, gate, factory = pb_server(bounds=limits.Limits(login_timeout=3))
    server, client_factory, pump = pb_connect(factory)
    clock.advance(2.9)
    assert not server.transport.disconnecting
    clock.advance(0.2)
    assert server.transport.disconnecting


def test_pb_connections_from_one_address_make_room_among_themselves():
    bounds = limits.Limits(max_unauthenticated=4, max_unauthenticated_per_peer=2)
    clock, gate, factory = pb_server(bounds=bounds)
    other = pb_connect(factory, host="127.0.0.2")
    first = pb_connect(factory)
    pb_connect(factory)
    pb_connect(factory)
    assert first[0]._refused and first[0].transport.disconnecting
    assert gate.waiting == 3
    # The one from the other address was not pushed out: it logs in.
    avatar = pb_login(other[1], other[2])
    assert other[0].authenticated and gate.waiting == 2
    answers = []
    avatar.callRemote("stats").addBoth(answers.append)
    other[2].flush()
    assert answers == [{"counters": {}}]


def test_pb_a_message_over_the_limit_after_login_disconnects(warnings):
    clock, gate, factory = pb_server(max_message=300_000)
    server, client_factory, pump = pb_connect(factory)
    avatar = pb_login(client_factory, pump)
    # Within the limit, message after message.
    answers = []
    for _ in range(5):
        avatar.callRemote("submit", "app.jobs.add", ["y" * 200_000]).addBoth(answers.append)
        pump.flush()
    assert [answer["name"] for answer in answers] == ["app.jobs.add"] * 5
    assert not server.transport.disconnecting
    # Over it: closed as it arrives.
    avatar.callRemote("submit", "app.jobs.add", ["y" * 200_000] * 3).addErrback(answers.append)
    pump.flush()
    assert server.transport.disconnecting or server.disconnected
    assert "sent a message of more than 300000 bytes" in warnings[-1]


# -- permissions --------------------------------------------------------------------


def parse_options(*args):
    options = Options()
    options.parseOptions(list(args))
    return options


@pytest.mark.parametrize(
    "mode, message",
    [
        (0o644, "is readable by others (mode 0644)"),
        (0o640, "is readable by its group (mode 0640)"),
        (0o602, "is writable by others (mode 0602)"),
    ],
)
def test_a_secret_file_others_can_read_is_refused(tmp_path, mode, message):
    secret = tmp_path / "secret"
    secret.write_text("s3cret\n")
    secret.chmod(mode)
    with pytest.raises(usage.UsageError) as raised:
        parse_options("--jobs-secret-file", str(secret))
    assert str(raised.value) == (
        f"--jobs-secret-file {secret} {message}: chmod 600 it, or pass --allow-open-permissions"
    )
    # The explicit option allows it, wherever it comes on the command line.
    options = parse_options("--jobs-secret-file", str(secret), "--allow-open-permissions")
    assert options["jobs-secret-file"] == str(secret)
    secret.chmod(0o600)
    assert parse_options("--jobs-secret-file", str(secret))["jobs-secret-file"] == str(secret)
    secret.chmod(0o400)
    assert parse_options("--jobs-secret-file", str(secret))["jobs-secret-file"] == str(secret)


def test_a_state_dir_others_can_write_to_is_refused(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    state.chmod(0o777)
    front_end = AMPFrontEnd(None, None, str(state), None)
    with pytest.raises(StartupFailed) as raised:
        front_end._prepare_socket_path()
    assert str(raised.value) == (
        f"--state-dir {state} is writable by others (mode 0777): chmod 700 it, or pass "
        "--allow-open-permissions"
    )
    state.chmod(0o1703)
    with pytest.raises(StartupFailed, match=r"writable by others \(mode 1703\)"):
        front_end._prepare_socket_path()
    state.chmod(0o775)
    with pytest.raises(StartupFailed, match=r"writable by its group \(mode 0775\)"):
        front_end._prepare_socket_path()
    assert front_end._prepare_socket_path(allow_open_permissions=True) == str(state / "jobs.sock")
    # Readable is fine: the socket itself has mode 0600.
    state.chmod(0o755)
    assert front_end._prepare_socket_path() == str(state / "jobs.sock")


def test_a_missing_state_dir_is_created_private(tmp_path):
    old = os.umask(0o022)
    try:
        path = AMPFrontEnd(None, None, str(tmp_path / "new" / "state"), None)._prepare_socket_path()
    finally:
        os.umask(old)
    assert os.stat(os.path.dirname(path)).st_mode & 0o777 == 0o700


def test_tcp_job_listeners_get_a_longer_listen_queue():
    assert limits.with_backlog("tcp:8790") == "tcp:8790:backlog=1024"
    assert limits.with_backlog("tcp6:port=8790:interface=\\:\\:1") == (
        "tcp6:port=8790:interface=\\:\\:1:backlog=1024"
    )
    assert (
        limits.with_backlog("ssl:443:privateKey=k.pem") == "ssl:443:privateKey=k.pem:backlog=1024"
    )
    assert limits.with_backlog("tcp:8790:backlog=10") == "tcp:8790:backlog=10"
    assert limits.with_backlog("unix:/run/x.sock") == "unix:/run/x.sock"
