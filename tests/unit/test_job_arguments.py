"""
What a job client may send, in memory: the checks of job ids, Wait
timeouts and ListJobs limits; AMP arguments that cannot be read answered
INVALID_ARGUMENTS; PB calls that cannot be made refused without a
traceback; and the internal errors' tracebacks, at most one per cause and
interval.
"""

from __future__ import annotations

import math
import time
import uuid

import pytest
from twisted.internet.task import Clock
from twisted.logger import Logger, LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure

from twistedlrp import jobs
from twistedlrp.jobs.errors import InvalidArguments, UnknownJob
from twistedlrp.jobs.protocol import arguments, limits, wire

JOB_ID = "0b5e4a8c-3f0e-4d7e-9a43-1f2b3c4d5e6f"


@pytest.fixture
def logged():
    """(level, text) of each event logged during the test."""
    seen = []

    def observer(event):
        seen.append((event.get("log_level"), formatEvent(event), event.get("log_failure")))

    globalLogPublisher.addObserver(observer)
    yield seen
    globalLogPublisher.removeObserver(observer)


# -- job ids --------------------------------------------------------------------


@pytest.mark.parametrize(
    "spelling",
    [
        JOB_ID,
        JOB_ID.upper(),
        JOB_ID.replace("-", ""),
        "{" + JOB_ID.upper() + "}",
        "urn:uuid:" + JOB_ID,
        uuid.UUID(JOB_ID),
    ],
)
def test_every_spelling_of_a_job_id_has_one_canonical_form(spelling):
    assert arguments.canonical_job_id(spelling) == JOB_ID
    assert arguments.check_job_id(spelling) == JOB_ID


@pytest.mark.parametrize("value", ["no-such-job", "", "x" * 100_000, JOB_ID + "0"])
def test_a_string_that_is_not_a_uuid_names_no_job(value):
    with pytest.raises(UnknownJob) as raised:
        arguments.canonical_job_id(value)
    assert "(a job id is a UUID)" in str(raised.value)
    assert len(str(raised.value)) < 200
    with pytest.raises(InvalidArguments, match="id: expected a UUID"):
        arguments.check_job_id(value)


@pytest.mark.parametrize(
    "value", [12, None, [JOB_ID], b"abc", pytest.param(10**5000, id="huge-int")]
)
def test_a_job_id_that_is_not_a_string_is_invalid(value):
    with pytest.raises(InvalidArguments, match="job_id: expected a job id"):
        arguments.canonical_job_id(value)


# -- Wait and ListJobs ------------------------------------------------------------


@pytest.mark.parametrize("value", [0, 0.5, 60, 3600, 3600.0])
def test_wait_timeouts_in_range(value):
    assert arguments.check_wait_timeout(value) == value


@pytest.mark.parametrize(
    "value, said",
    [
        (math.nan, "must be a finite number"),
        (math.inf, "must be a finite number"),
        (1e308, "from 0 to 3600 seconds"),
        pytest.param(10**400, "must be a finite number", id="huge-int"),
        (3600.001, "from 0 to 3600 seconds"),
        (-1, "from 0 to 3600 seconds"),
        (True, "expected a number"),
        ("60", "expected a number"),
        (None, "expected a number"),
    ],
)
def test_wait_timeouts_out_of_range(value, said):
    with pytest.raises(InvalidArguments, match=f"timeout: .*{said}"):
        arguments.check_wait_timeout(value)


def test_listing():
    assert arguments.check_listing() == {"state": None, "name": None, "limit": 100}
    assert arguments.check_listing("", "", 0) == {"state": None, "name": None, "limit": 0}
    assert arguments.check_listing("failed", "app.jobs.x", 1000.0)["limit"] == 1000
    for limit in (-1, 1001, 10**9, 1e9, 2.5, True, "10", None, math.nan):
        with pytest.raises(InvalidArguments, match="limit: expected a whole number from 0 to 1000"):
            arguments.check_listing(limit=limit)
    with pytest.raises(InvalidArguments, match="state: expected one of queued, running"):
        arguments.check_listing(state="done")
    with pytest.raises(InvalidArguments, match="name: expected a job name"):
        arguments.check_listing(name="x" * 256)


def test_a_name_longer_than_a_job_name_is_refused_before_it_is_looked_up():
    with pytest.raises(InvalidArguments, match="at most 255 characters, this one has 30000"):
        arguments.check_submission("\\" * 30_000)


def test_jobs_wait_waits_long_timeouts_in_several_calls(monkeypatch):
    now = [1000.0]
    calls = []

    def call(op, call_timeout=None, **kw):
        calls.append((op, kw["job_id"], kw["timeout"]))
        now[0] += kw["timeout"]
        return {"id": kw["job_id"], "name": "x", "state": "running"}

    monkeypatch.setattr("twistedlrp.jobs.client.calls.call", call)
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    with pytest.raises(TimeoutError):
        jobs.wait(JOB_ID.upper(), timeout=9000)
    assert calls == [("wait", JOB_ID, 3600), ("wait", JOB_ID, 3600), ("wait", JOB_ID, 1800)]
    with pytest.raises(InvalidArguments, match="timeout: must be 0 or more seconds"):
        jobs.wait(JOB_ID, timeout=-1)
    with pytest.raises(InvalidArguments, match="timeout: must be a finite number"):
        jobs.wait(JOB_ID, timeout=math.inf)


# -- AMP arguments -------------------------------------------------------------------


class FakeService:
    max_payload = 100_000

    def __init__(self):
        self.calls = []

    def wait(self, job_id, timeout, seen=None):
        self.calls.append(("wait", job_id, timeout))
        return {"id": job_id}

    def list_jobs(self, state, name, limit):
        self.calls.append(("list_jobs", state, name, limit))
        return {"jobs": []}

    def status(self, job_id):
        raise ZeroDivisionError("a bug")


def amp_connection(secret=None):
    from twisted.internet.address import IPv4Address
    from twisted.internet.testing import StringTransport

    from twistedlrp.jobs.protocol.amp import ServiceFactory

    service = FakeService()
    gate = limits.Gate(Clock(), "tcp:8001")
    proto = ServiceFactory(service, secret, gate).buildProtocol(None)
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
    proto.makeConnection(transport)
    return service, proto, transport


def box(**values) -> bytes:
    data = b""
    for key, value in values.items():
        key = key.encode()
        value = value if isinstance(value, bytes) else str(value).encode()
        data += len(key).to_bytes(2, "big") + key + len(value).to_bytes(2, "big") + value
    return data + b"\x00\x00"


def answers(transport):
    from twisted.protocols import amp

    found = amp.parseString(transport.value())
    transport.clear()
    return found


@pytest.mark.parametrize(
    "values, said",
    [
        ({"_command": "Wait", "job_id": JOB_ID}, b"timeout: missing"),
        ({"_command": "Wait", "job_id": JOB_ID, "timeout": "soon"}, b"timeout: cannot be read"),
        ({"_command": "Wait", "job_id": b"\xff", "timeout": "1"}, b"job_id: cannot be read"),
        ({"_command": "ListJobs", "limit": "1e9"}, b"limit: cannot be read (invalid literal"),
        ({"_command": "ListJobs", "limit": "9" * 5000}, b"limit: cannot be read"),
        ({"_command": "Submit", "name": "a", "payload": "0"}, b"payload: cannot be read"),
        ({"_command": "Submit", "name": "a", "payload": "2", "payload.0": "x"}, b"piece 1 of 2"),
    ],
)
def test_amp_arguments_that_cannot_be_read_are_invalid(values, said, logged):
    service, proto, transport = amp_connection()
    proto.dataReceived(box(_ask="1", **values))
    (answer,) = answers(transport)
    assert answer[b"_error_code"] == b"INVALID_ARGUMENTS", answer
    assert said in answer[b"_error_description"], answer
    assert not transport.disconnecting
    assert service.calls == []
    # The connection goes on.
    proto.dataReceived(box(_ask="2", _command="ListJobs", limit="5"))
    assert answers(transport)[0][b"_answer"] == b"2"
    assert service.calls == [("list_jobs", None, None, 5)]
    assert not [event for event in logged if event[0] >= LogLevel.error]


def test_amp_a_malformed_login_is_refused_and_closes():
    service, proto, transport = amp_connection(secret=b"s3cret")
    proto.dataReceived(box(_ask="1", _command="Login"))
    (answer,) = answers(transport)
    assert answer[b"_error_code"] == b"INVALID_ARGUMENTS"
    assert answer[b"_error_description"] == b"digest: missing"
    assert transport.disconnecting


def test_amp_an_internal_error_without_ask_is_logged_once_per_cause(logged, monkeypatch):
    clock = Clock()
    monkeypatch.setattr(limits, "internal_errors", limits.FailureLog(clock, interval=60))
    service, proto, transport = amp_connection()
    for n in range(3):
        proto.dataReceived(box(_ask=str(n), _command="Status", job_id=JOB_ID))
    assert [a[b"_error_code"] for a in answers(transport)] == [b"JOB_ERROR"] * 3
    # Without _ask: AMP would log it with a traceback and close; here it is the same cause.
    proto.dataReceived(box(_command="Status", job_id=JOB_ID))
    critical = [event for event in logged if event[0] == LogLevel.critical]
    assert len(critical) == 1 and critical[0][2] is not None
    assert "Job service operation status failed" in critical[0][1]
    assert not transport.disconnecting
    clock.advance(60)
    critical = [event for event in logged if event[0] == LogLevel.critical]
    assert len(critical) == 2 and critical[1][2] is None
    assert "(3 more times, of the same cause (ZeroDivisionError at " in critical[1][1]
    assert "the last: a bug" in critical[1][1]


def test_amp_a_box_that_is_not_a_command_closes_without_a_traceback(logged):
    service, proto, transport = amp_connection()
    proto.dataReceived(box(_answer="99", x="y"))
    assert transport.disconnecting
    assert answers(transport) == []
    assert [text for level, text, _ in logged if level == LogLevel.warn] == [
        "Job client 127.0.0.1:40000 sent a box that is not a command: disconnected"
    ]


def test_a_command_parses_each_argument_as_amp_does():
    strings = {b"job_id": JOB_ID.encode(), b"timeout": b"2.5", b"seen": b"abc"}
    assert wire.Wait.parseArguments(strings, None) == {
        "job_id": JOB_ID,
        "timeout": 2.5,
        "seen": "abc",
    }
    assert wire.Wait.parseArguments({b"job_id": b"x", b"timeout": b"1"}, None)["seen"] is None


# -- the failure log -----------------------------------------------------------------


def failure_of(error: Exception) -> Failure:
    try:
        raise error
    except Exception:
        return Failure()


def test_tracebacks_are_logged_once_per_cause_and_interval(logged):
    clock = Clock()
    failures = limits.FailureLog(clock, interval=60)
    log = Logger(namespace="test")
    for n in range(50):
        failures.failure(log, failure_of(KeyError(n)), "Operation {op} failed", op="status")
    failures.failure(log, failure_of(KeyError(0)), "Operation {op} failed", op="cancel")
    failures.failure(log, failure_of(ValueError(0)), "Operation {op} failed", op="status")
    critical = [event for event in logged if event[0] == LogLevel.critical]
    assert [text for _, text, _ in critical] == [
        "Operation status failed",
        "Operation cancel failed",
        "Operation status failed",
    ]
    assert all(failure is not None for _, _, failure in critical)
    clock.advance(59)
    assert len([event for event in logged if event[0] == LogLevel.critical]) == 3
    clock.advance(1)
    summary = [event for event in logged if event[0] == LogLevel.critical][3]
    assert summary[2] is None  # no traceback
    assert summary[1].startswith(
        "Operation status failed (49 more times, of the same cause (KeyError at "
    )
    assert "in the last 60 s" in summary[1] and summary[1].endswith("the last: 49)")
    # The next one waits for the end of the next interval ...
    failures.failure(log, failure_of(KeyError(99)), "Operation {op} failed", op="status")
    assert len([event for event in logged if event[0] == LogLevel.critical]) == 4
    clock.advance(60)
    critical = [event for event in logged if event[0] == LogLevel.critical]
    assert "(1 more times," in critical[4][1]
    # ... and a quiet interval later, one is logged whole again.
    clock.advance(120)
    failures.failure(log, failure_of(KeyError(7)), "Operation {op} failed", op="status")
    critical = [event for event in logged if event[0] == LogLevel.critical]
    assert len(critical) == 6 and critical[5][2] is not None
    assert not clock.getDelayedCalls()


# -- PB calls ---------------------------------------------------------------------------


def test_pb_calls_that_do_not_fit_are_invalid_without_a_traceback(logged):
    from twisted.cred import credentials, portal
    from twisted.internet.address import IPv4Address
    from twisted.spread import pb
    from twisted.test import iosim

    from twistedlrp.jobs.pb import GuardedPBServerFactory, JobsRealm, SecretChecker

    clock = Clock()
    guard = portal.Portal(JobsRealm(FakeService()), [SecretChecker(clock, b"s3cret")])
    factory = GuardedPBServerFactory(guard, limits.Gate(clock, "tcp:8002"), 300_000)
    server = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40100))
    client_factory = pb.PBClientFactory()
    client = client_factory.buildProtocol(None)
    server_transport = iosim.makeFakeServer(server)
    server_transport.peerAddress = IPv4Address("TCP", "127.0.0.1", 40100)
    pump = iosim.connect(server, server_transport, client, iosim.makeFakeClient(client))
    outcomes = []
    client_factory.getRootObject().addCallback(
        lambda root: root.callRemote("login", b"lrp", b"extra", b"junk")
    ).addBoth(outcomes.append)
    pump.flush()
    assert outcomes[0].check("twistedlrp.jobs.pb.InvalidArgumentsError"), outcomes[0]
    assert "the call cannot be made" in outcomes[0].getErrorMessage()
    outcomes.clear()
    client_factory.login(credentials.UsernamePassword(b"lrp", b"s3cret")).addBoth(outcomes.append)
    pump.flush()
    avatar = outcomes.pop()
    for call, said in [
        (("wait",), "wait: missing a required argument: 'job_id'"),
        (("stats", 1), "stats: too many positional arguments"),
        (("nope",), "the job service has no operation 'nope'"),
    ]:
        d = avatar.callRemote(*call)
        d.addBoth(outcomes.append)
        pump.flush()
        failure = outcomes.pop()
        assert failure.check("twistedlrp.jobs.pb.InvalidArgumentsError"), call
        assert said in failure.getErrorMessage(), (call, failure.getErrorMessage())
    assert not [event for event in logged if event[0] >= LogLevel.error]
