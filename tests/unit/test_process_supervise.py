"""The one fork server (a real one, in a child process) and the shared stop and restart policies."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.error import ProcessTerminated
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from twistedlrp.process import supervise
from twistedlrp.process.channel import BlockingChannel
from twistedlrp.process.exits import Exit
from twistedlrp.process.forkserver import ForkServerProcess

SERVER = textwrap.dedent(
    """
    import os, socket, sys
    from twistedlrp.process.channel import BlockingChannel
    from twistedlrp.process.forkserver import ForkServer

    server = ForkServer(BlockingChannel(socket.socket(fileno=int(sys.argv[1]))))
    server.send({"event": "ready"})
    request = server.serve(lambda message: server.send({"event": "echo", **message}))
    if request is None:
        server.end_children(5)
        os._exit(0)
    os.write(request["fds"][0], b"hello from %d" % os.getpid())
    os._exit(request["code"])
    """
)


def test_the_fork_server_forks_reports_and_reaps():
    ours, theirs = socket.socketpair()
    server = subprocess.Popen(
        [sys.executable, "-c", SERVER, str(theirs.fileno())], pass_fds=[theirs.fileno()]
    )
    theirs.close()
    control = BlockingChannel(ours)
    read, write = os.pipe()
    try:
        assert control.wait() == {"event": "ready"}
        assert control.send({"op": "hello"})
        assert control.wait() == {"event": "echo", "op": "hello"}
        assert control.send({"op": "fork", "index": 7, "code": 3}, [write])
        forked = control.wait()
        assert forked["event"] == "forked" and forked["index"] == 7
        assert os.read(read, 100) == b"hello from %d" % forked["pid"]
        exited = control.wait()
        assert exited == {
            "event": "exited",
            "index": 7,
            "pid": forked["pid"],
            "code": 3,
            "signal": None,
        }
        control.close()  # the server ends
        assert server.wait(timeout=30) == 0
    finally:
        if server.poll() is None:
            server.kill()
        os.close(read)
        os.close(write)


def test_the_restart_back_off_resets_after_a_good_run():
    backoff = supervise.restart_backoff()
    assert [supervise.restart_delay(backoff, 1.0) for _ in range(8)] == [
        0.5, 1, 2, 4, 8, 16, 30, 30,
    ]  # fmt: skip
    assert supervise.restart_delay(backoff, supervise.RESET_AFTER) == supervise.FIRST_DELAY


def _stop(clock, ended, seconds, after_kill=None):
    sent, late = [], []
    result = ensureDeferred(
        supervise.stop_within(
            clock, ended, sent.append, seconds, lambda: late.append(1), after_kill
        )
    )
    return result, sent, late


def test_a_process_that_stops_in_time_gets_sigterm_only():
    clock, ended = Clock(), Deferred()
    result, sent, late = _stop(clock, ended, 10)
    clock.advance(3)
    ended.callback(None)
    assert result.result is True and sent == [signal.SIGTERM] and late == []


def test_a_late_process_is_killed_and_waited_for():
    clock, ended = Clock(), Deferred()
    result, sent, late = _stop(clock, ended, 10, after_kill=5)
    clock.advance(10)
    assert sent == [signal.SIGTERM, signal.SIGKILL] and late == [1] and not result.called
    ended.callback(None)
    assert result.result is False


def test_a_process_that_ignores_sigkill_is_not_waited_for_past_after_kill():
    clock, ended = Clock(), Deferred()
    result, sent, late = _stop(clock, ended, 1, after_kill=5)
    clock.advance(1)
    clock.advance(5)
    assert result.result is False


def test_signals_to_a_missing_process_are_not_errors():
    assert supervise.send_signal(None, signal.SIGTERM) is False
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    assert supervise.send_signal(dead.pid, signal.SIGTERM, group=True) is False


def test_the_parent_side_passes_output_on_line_by_line_and_keeps_its_tail():
    ended, lines = [], []
    server = ForkServerProcess(
        Clock(), None, lambda s, e: ended.append(e), lambda fd, line: lines.append((fd, line))
    )
    server.childDataReceived(1, b"one\ntw")
    server.childDataReceived(1, b"o\nthree")
    assert lines == [(1, b"one\n"), (1, b"two\n")]
    server.processExited(Failure(ProcessTerminated(None, signal.SIGKILL)))
    server.processEnded(Failure(ProcessTerminated(None, signal.SIGKILL)))
    assert lines[-1] == (1, b"three\n") and server.output() == "one\ntwo\nthree"
    assert ended == [Exit(None, signal.SIGKILL)] and server.state == "ended"


def test_descriptors_sent_with_a_fork_are_closed_once_answered():
    class Sent(ForkServerProcess):
        def send(self, message, fds=()):
            return True

    server = Sent(Clock(), lambda s, m: None, lambda s, e: None)
    read, write = os.pipe()
    assert server.fork({"index": 1}, [write])
    os.fstat(write)  # held until the answer
    server._said({"event": "forked", "index": 1, "pid": 42})
    with pytest.raises(OSError):
        os.fstat(write)
    os.close(read)


@pytest.mark.parametrize("where", ["twistedlrp.reload.server_main", "twistedlrp.web.process_main"])
def test_every_preimported_module_exists(where):
    """
    preimport() skips a module it cannot import (the process that needs it
    reports the error): a name left behind by a move would silently cost
    every fork its warm import.
    """
    import importlib.util

    names = importlib.import_module(where).PREIMPORT
    assert names
    assert [n for n in names if importlib.util.find_spec(n) is None] == []
