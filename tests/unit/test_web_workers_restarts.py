"""WebProcesses on a fake clock: the back-off of restarts (of web processes and of their template), and what a stop signals."""

from __future__ import annotations

import signal

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessTerminated
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from twistedlrp.options import Options
from twistedlrp.ordered_service import StartupFailed
from twistedlrp.process import supervise
from twistedlrp.process.forkserver import ForkServerProcess
from twistedlrp.web import processes
from twistedlrp.web.processes import WebProcesses
from twistedlrp.web.slot import how_ended


def make(count: int = 2) -> tuple[WebProcesses, Clock, list]:
    options = Options()
    options.parseOptions(["--web-workers", str(count)])
    clock = Clock()
    web = WebProcesses(clock, options)
    forks: list = []
    web._fork = lambda slot: (forks.append(slot.index), _forked(web, clock, slot))
    for slot in web.slots:
        slot.pid = 100 + slot.index
        slot.state = "running"
        slot.first_run.callback(None)
    return web, clock, forks


def _forked(web, clock, slot):
    slot.pid = (slot.pid or 0) + 1000
    slot.state = "running"
    slot.started_at = clock.seconds()


def test_a_web_process_that_keeps_dying_waits_longer_each_time_up_to_30_s():
    web, clock, forks = make()
    slot = web.slots[0]
    delays = []
    for _ in range(9):
        web._slot_ended(slot, None, signal.SIGKILL)
        assert slot.state == "waiting"
        delays.append(slot.restart_call.getTime() - clock.seconds())
        clock.advance(delays[-1])
        clock.advance(1)  # it dies one second after each start
    assert delays == [0.5, 1, 2, 4, 8, 16, 30, 30, 30]
    assert forks == [0] * 9
    assert slot.restarts == 9
    assert web.slots[1].restarts == 0


def test_the_back_off_resets_once_a_web_process_ran_a_while():
    web, clock, forks = make()
    slot = web.slots[1]
    for _ in range(3):
        web._slot_ended(slot, 1, None)
        clock.advance(slot.restart_call.getTime() - clock.seconds())
    clock.advance(supervise.RESET_AFTER)
    web._slot_ended(slot, 1, None)
    assert slot.restart_call.getTime() - clock.seconds() == supervise.FIRST_DELAY


def test_no_restart_while_stopping():
    web, clock, forks = make()
    web.stopping = True
    web._slot_ended(web.slots[0], 0, None)
    assert web.slots[0].state == "ended" and web.slots[0].restart_call is None


def test_dying_before_the_first_run_fails_the_start():
    options = Options()
    options.parseOptions(["--web-workers", "2"])
    web = WebProcesses(Clock(), options)
    slot = web.slots[0]
    slot.pid = 7
    failures = []
    slot.first_run.addErrback(failures.append)
    web._slot_ended(slot, 1, None)
    assert failures and failures[0].check(StartupFailed)
    assert "web process 0 (pid 7) failed to start (exit code 1)" in str(failures[0].value)


def test_health_describes_every_slot():
    web, clock, _ = make()
    web.slots[0].status = {"threads": {"busy": 1, "idle": 7, "size": 8}, "waiting": 0}
    clock.advance(2)
    listed = web.health()
    assert [w["index"] for w in listed] == [0, 1]
    assert listed[0]["threads"] == {"busy": 1, "idle": 7, "size": 8}
    assert listed[0]["state"] == "running" and listed[0]["uptime"] == 2


@pytest.mark.parametrize(
    "code, signal_number, text", [(3, None, "exit code 3"), (None, 9, "signal SIGKILL")]
)
def test_how(code, signal_number, text):
    assert how_ended(code, signal_number) == text


# -- the template --------------------------------------------------------------


class FakeTemplate(ForkServerProcess):
    """A template without a process: what it is asked is kept in C{asked}."""

    pids = iter(range(5000, 6000))

    def __init__(self, owner, reactor):
        super().__init__(reactor, owner._template_said, owner._template_ended)
        self.pid = next(self.pids)
        self.asked: list[dict] = []

    def send(self, message, fds=()):
        self.asked.append(message)
        return True

    def ready(self):
        self._said({"event": "ready", "pid": self.pid, "preload": True})

    def forked(self, index: int, pid: int):
        self._said({"event": "forked", "index": index, "pid": pid})

    def die(self, signal_number=signal.SIGKILL, code=None):
        reason = ProcessTerminated(code, signal_number)
        self.processExited(Failure(reason))


def running(monkeypatch, count: int = 2):
    """WebProcesses started on a fake clock, its template ready and its web processes running."""
    options = Options()
    options.parseOptions(["--web-workers", str(count)])
    clock = Clock()
    fatal: list[str] = []
    web = WebProcesses(clock, options, on_fatal=fatal.append)
    templates: list[FakeTemplate] = []

    def spawn():
        templates.append(FakeTemplate(web, clock))
        web.template = templates[-1]

    monkeypatch.setattr(web, "_spawn_template", spawn)
    monkeypatch.setattr(processes, "adopt", lambda reactor, sock, channel: sock.close())
    web.template_ready = Deferred()
    spawn()
    templates[0].ready()
    for slot in web.slots:
        web._fork(slot)
        templates[0].forked(slot.index, 100 + slot.index)
        web._web_said(slot, slot.channel, {"event": "status", "state": "running"})
    web.started = True
    return web, clock, templates, fatal


def test_a_template_that_dies_is_restarted_and_its_web_processes_keep_running(monkeypatch):
    web, clock, templates, fatal = running(monkeypatch)
    templates[0].die()
    assert web.template is None
    assert [slot.state for slot in web.slots] == ["running", "running"]
    assert [slot.pid for slot in web.slots] == [100, 101]
    clock.advance(supervise.FIRST_DELAY)
    assert len(templates) == 2 and web.template is templates[1]
    # A web process that ends while the new template starts waits for it...
    web._channel_lost(web.slots[0], web.slots[0].channel)
    assert web.slots[0].state == "waiting" and web.slots[1].state == "running"
    clock.advance(supervise.FIRST_DELAY)
    assert web.slots[0].state == "waiting" and templates[1].asked == []
    # ... and is forked by it once it is ready.
    templates[1].ready()
    assert templates[1].asked == [{"op": "fork", "index": 0, "jobs_connect": None}]
    templates[1].forked(0, 200)
    assert web.slots[0].state == "starting" and web.slots[0].pid == 200
    assert fatal == []


def test_a_fork_the_dead_template_never_answered_is_asked_of_the_next(monkeypatch):
    web, clock, templates, fatal = running(monkeypatch)
    slot = web.slots[1]
    web._slot_ended(slot, 1, None)
    clock.advance(slot.restart_call.getTime() - clock.seconds())
    assert templates[0].asked[-1]["index"] == 1 and slot.pending_fork is templates[0]
    templates[0].die()
    assert slot.state == "waiting" and slot.pending_fork is None and slot.channel is None
    clock.advance(supervise.FIRST_DELAY)
    templates[1].ready()
    assert templates[1].asked == [{"op": "fork", "index": 1, "jobs_connect": None}]


def test_templates_that_keep_failing_wait_longer_then_stop_the_server(monkeypatch):
    web, clock, templates, fatal = running(monkeypatch)
    delays = []
    for _ in range(processes.MAX_TEMPLATE_FAILURES - 1):
        templates[-1].die(None, 1)
        delays.append(web._template_call.getTime() - clock.seconds())
        clock.advance(delays[-1])
    assert delays == [0.5, 1, 2, 4]
    assert fatal == []
    templates[-1].die(None, 1)
    assert web._template_call is None
    assert fatal == [
        "the web process template failed 5 times in a row (the last one: exit code 1, "
        "before it was ready): stopping the server"
    ]
    # The web processes were left alone: the server's stop drains them.
    assert [slot.state for slot in web.slots] == ["running", "running"]


def test_a_template_that_ran_well_resets_the_count(monkeypatch):
    web, clock, templates, fatal = running(monkeypatch)
    for _ in range(processes.MAX_TEMPLATE_FAILURES * 2):
        clock.advance(supervise.RESET_AFTER)
        templates[-1].die()
        assert web._template_call.getTime() - clock.seconds() == supervise.FIRST_DELAY
        clock.advance(supervise.FIRST_DELAY)
        templates[-1].ready()
    assert fatal == [] and len(templates) == processes.MAX_TEMPLATE_FAILURES * 2 + 1


def test_a_template_that_dies_while_stopping_is_not_restarted(monkeypatch):
    web, clock, templates, fatal = running(monkeypatch)
    web.stopping = True
    templates[0].die()
    assert web._template_call is None and fatal == []
