"""
The one table of the job service's operations (wire.OPERATIONS) and what is
derived from it, the box reader the AMP front end reads with, and AMP put
together from its public parts: in memory, no sockets.
"""

from __future__ import annotations

import pytest
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.protocols import amp
from twisted.python.failure import Failure

from twistedlrp.jobs import pb
from twistedlrp.jobs.protocol import wire
from twistedlrp.jobs.protocol.amp import ServiceProtocol
from twistedlrp.jobs.protocol.framing import BoxReader, BoxTooLarge, encode_box


def test_every_operation_has_its_responder_and_the_public_ones_their_pb_signature():
    server = ServiceProtocol(object(), None)
    for op in wire.OPERATIONS.values():
        assert server.locateResponder(op.command.commandName) is not None, op.name
    assert pb.OPERATIONS == ("submit", "status", "cancel", "wait", "list_jobs", "stats")
    assert str(pb._SIGNATURES["wait"]) == "(job_id, timeout=60.0)"
    assert str(pb._SIGNATURES["submit"]) == (
        "(name, args=(), kwargs=None, priority=None, run_after=None, key=None, timeout=None, "
        "id=None)"
    )


def test_an_operation_takes_its_arguments_in_order_with_their_defaults():
    class Service:
        def wait(self, job_id, timeout, seen):
            return (job_id, timeout, seen)

    op = wire.OPERATIONS["wait"]
    assert op.answer == "job" and op.parameters == ["job_id", "timeout", "seen"]
    arguments = op.arguments({"job_id": "x", "timeout": 5}, encoded=True)
    assert arguments == {"job_id": "x", "timeout": 5.0, "seen": None}
    assert isinstance(arguments["timeout"], float)
    assert op.call(Service(), op.arguments({"job_id": "x"})) == ("x", 60.0, None)
    with pytest.raises(KeyError):
        wire.OPERATIONS["status"].arguments({})


def test_the_box_reader_keeps_a_limit_and_drops_a_refused_box_as_it_arrives():
    box = {b"_ask": b"1", b"_command": b"Submit", b"payload": b"x" * 60_000}
    data = encode_box(box)
    reader = BoxReader()
    assert reader.feed(data[:1000]) == [] and reader.feed(data[1000:]) == [box]
    assert reader.consumed == len(data) and reader.size == 0 and reader.buffered == 0
    reader.add(data[:30_000])
    with pytest.raises(BoxTooLarge):
        reader.next_box(limit=10_000)
    # What was read of it says what it was.
    assert reader.box == {b"_ask": b"1", b"_command": b"Submit"}
    reader.box.clear()
    assert reader.next_box(keep=False) is None
    assert reader.buffered == 0 and reader.box == {}
    reader.add(data[30_000:-2])
    assert reader.next_box(keep=False) is None and reader.buffered == 0
    reader.add(data[-2:] + data)
    assert reader.next_box(keep=False) == {}
    assert reader.next_box() == box
    with pytest.raises(ValueError, match="at most 255"):
        BoxReader().feed(b"\x01\x00" + b"k" * 256)


def test_quiet_amp_answers_commands_and_logs_no_line_per_connection():
    events = []
    globalLogPublisher.addObserver(events.append)
    try:

        class Answering(wire.QuietAMP):
            @wire.Stats.responder
            def stats(self):
                return {"stats": {"ok": 1}}

        proto = Answering()
        transport = StringTransport()
        proto.makeConnection(transport)
        proto.dataReceived(amp.Box({b"_command": b"Stats", b"_ask": b"7"}).serialize())
        (answer,) = amp.parseString(transport.value())
        assert answer[b"_answer"] == b"7"
        proto.connectionLost(Failure(ConnectionDone()))
        assert proto.transport is None
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert events == []
    assert not isinstance(proto, amp.AMP)
