"""The one control channel (both ends) and the one description of an exit."""

from __future__ import annotations

import os
import signal
import socket

from twisted.internet.error import ProcessDone, ProcessTerminated

from twistedlrp.process.channel import BlockingChannel, Channel, Decoder
from twistedlrp.process.exits import Exit


def test_lines_across_reads_and_what_is_not_an_object_is_skipped():
    decoder = Decoder()
    assert decoder.feed(b'{"event": "a"}\n[1]\nnot json\n{"ev') == [{"event": "a"}]
    assert decoder.feed(b'ent": "b"}\n') == [{"event": "b"}]


def test_descriptors_travel_with_their_message():
    ours, theirs = socket.socketpair()
    sender, receiver = BlockingChannel(ours), BlockingChannel(theirs)
    read, write = os.pipe()
    try:
        assert sender.send({"op": "first"})
        assert sender.send({"op": "fork", "index": 1}, [write])
        assert receiver.wait() == {"op": "first"}
        message = receiver.wait()
        assert message["op"] == "fork" and len(message["fds"]) == 1
        os.write(message["fds"][0], b"x")
        assert os.read(read, 1) == b"x"
        os.close(message["fds"][0])
        sender.close()
        assert receiver.wait() is None  # end of file
    finally:
        receiver.close()
        os.close(read)
        os.close(write)


def test_the_reactor_end_reads_what_the_blocking_end_left():
    decoder = Decoder()
    decoder.feed(b'{"event": "go"}\n{"event": "tem')
    got = []
    channel = Channel(got.append, decoder=decoder)
    channel.dataReceived(b'plates"}\n')
    assert got == [{"event": "templates"}]
    assert not channel.open and channel.send({"event": "x"}) is False


def test_how_a_process_ended():
    assert str(Exit(3)) == "exited with code 3" and Exit(3).status() == "exit code 3"
    killed = Exit(None, signal.SIGKILL)
    assert str(killed) == "killed by signal 9 (SIGKILL)" and killed.status() == "signal SIGKILL"
    assert Exit.of(ProcessTerminated(None, signal.SIGTERM)) == Exit(None, signal.SIGTERM)
    assert Exit.of(ProcessDone(0)) == Exit(0)
    assert Exit.of_status(3 << 8) == Exit(3)
    lost = Exit(lost="ended with its template")
    assert str(lost) == lost.status() == "ended with its template"
    assert Exit.of(lost.reason()) == lost
    assert Exit.of(Exit(0).reason()) == Exit(0)
