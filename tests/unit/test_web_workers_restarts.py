"""WebProcesses on a fake clock: the back-off of restarts, and what a stop signals."""

from __future__ import annotations

import signal

import pytest
from twisted.internet.task import Clock

from twistedlrp.options import Options
from twistedlrp.services import StartupFailed
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
    clock.advance(processes.RESET_AFTER)
    web._slot_ended(slot, 1, None)
    assert slot.restart_call.getTime() - clock.seconds() == processes.FIRST_DELAY


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
