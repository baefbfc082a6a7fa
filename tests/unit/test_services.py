"""OrderedService: ordered, awaited start; reverse stop within one deadline (fake clock)."""

from twisted.application import service
from twisted.internet import defer
from twisted.internet.task import Clock, deferLater

from twistedlrp.ordered_service import LATE_STEP_SECONDS, OrderedService, StartupFailed, within


class Step(service.Service):
    def __init__(self, name, log, start=None, stop=None):
        self.name, self.log = name, log
        self._start, self._stop = start, stop

    def startService(self):
        super().startService()
        self.log.append(f"start {self.name}")
        return self._start

    def stopService(self):
        super().stopService()
        self.log.append(f"stop {self.name}")
        return self._stop


class Deadlined(service.Service):
    name = "deadlined"

    def __init__(self, log):
        self.log = log

    def stop_by(self, deadline):
        self.log.append(f"stop_by {deadline}")


def test_children_start_in_order_each_awaited_and_stop_in_reverse():
    clock, log = Clock(), []
    slow = defer.Deferred()
    parent = OrderedService(clock, graceful_timeout=10)
    for child in (Step("a", log, start=slow), Step("b", log), Deadlined(log)):
        parent.addService(child)
    started = parent.startService()
    assert log == ["start a"] and not started.called
    slow.callback(None)
    assert log == ["start a", "start b"] and started.called
    clock.advance(3)
    stopped = parent.stopService()
    assert stopped.called
    assert log[2:] == ["stop_by 13.0", "stop b", "stop a"]


def test_a_stop_that_hangs_is_cut_at_the_deadline_and_the_rest_still_stop():
    clock, log = Clock(), []
    parent = OrderedService(clock, graceful_timeout=5)
    hung = defer.Deferred()
    parent.addService(Step("first", log))
    parent.addService(Step("hangs", log, stop=hung))
    parent.startService()
    stopped = parent.stopService()
    assert log[-1] == "stop hangs" and not stopped.called
    clock.advance(5)
    # A step's own cut-offs aim at the deadline; the step is cut just after.
    assert not stopped.called
    clock.advance(LATE_STEP_SECONDS)
    assert stopped.called and log[-1] == "stop first"


class Draining(service.Service):
    """Stops as the web service does: a first step, then a drain cut at the deadline."""

    name = "draining"

    def __init__(self, clock, log):
        self.clock, self.log = clock, log

    def stop_by(self, deadline):
        return defer.ensureDeferred(self._drain(deadline))

    async def _drain(self, deadline):
        await deferLater(self.clock, 0.5)  # closing the listeners, say
        if not await within(self.clock, defer.Deferred(), deadline - self.clock.seconds(), "drain"):
            self.log.append("connections aborted")


def test_a_step_cut_by_its_own_deadline_is_not_cancelled_first():
    # The drain's cut-off is set after the step's, for the same moment: the
    # step's must still come second, or the drain never aborts what is left.
    clock, log = Clock(), []
    parent = OrderedService(clock, graceful_timeout=5)
    parent.addService(Draining(clock, log))
    parent.startService()
    stopped = parent.stopService()
    clock.advance(0.5)
    clock.advance(4.5)
    assert log == ["connections aborted"]
    assert stopped.called


def test_a_failing_start_names_the_child_and_starts_nothing_after_it():
    clock, log = Clock(), []
    parent = OrderedService(clock)
    parent.addService(Step("broken", log, start=defer.fail(ValueError("no database"))))
    parent.addService(Step("after", log))
    failures = []
    parent.startService().addErrback(failures.append)
    assert failures and failures[0].check(StartupFailed)
    assert "service 'broken' failed to start: ValueError: no database" in str(failures[0].value)
    assert log == ["start broken"]


def test_a_child_added_while_running_starts_at_once_and_stops_first():
    clock, log = Clock(), []
    parent = OrderedService(clock)
    parent.addService(Step("early", log))
    parent.startService()
    parent.addService(Step("late", log))
    assert log == ["start early", "start late"]
    parent.stopService()
    assert log[2:] == ["stop late", "stop early"]


def test_waiters_fire_every_deferred_handed_out_so_far_once():
    from twistedlrp.ordered_service import Waiters

    waiters, results = Waiters(), []
    first, second = waiters.wait(), waiters.wait()
    second.cancel()  # a cancelled one is left alone
    second.addErrback(lambda f: results.append("cancelled"))
    first.addCallback(results.append)
    waiters.fire("done")
    assert results == ["cancelled", "done"]
    later = waiters.wait()
    assert not later.called  # only those handed out before a fire
    waiters.fire(2)
    assert later.result == 2
