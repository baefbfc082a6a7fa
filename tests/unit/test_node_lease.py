"""
Fencing (jobs/service/lease.py NodeLease): a job node that cannot renew its
lease stops its jobs before the lease can expire elsewhere, measured on
its own monotonic clock from the last renewal that succeeded, and takes
work again only once a renewal dealt with the jobs it stopped. A fake
reactor clock and a fake monotonic clock; the store answers as the test says.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.task import Clock

from twistedlrp.jobs.service.lease import NodeLease, fence_margin, renewal_interval


class FakeRunner:
    """The lease thread: each heartbeat waits for the test's answer."""

    closed = False
    away = None

    def __init__(self):
        self.beats: list[tuple[tuple, defer.Deferred]] = []

    def run(self, fn, *args, within=None):
        d = defer.Deferred()
        if fn.__name__ == "heartbeat":
            self.beats.append((args, d))
        elif fn.__name__ == "expire_nodes":
            d.callback({"nodes": [], "jobs": []})
        else:
            d.callback(None)
        return d


class Monotonic:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def make_lease(lease=30.0):
    reactor, runner, mono = Clock(), FakeRunner(), Monotonic()
    fenced, unfenced = [], []

    def on_fenced():
        fenced.append(mono.now)
        return ["job-1", "job-2"]

    node = NodeLease(
        reactor,
        runner,
        "n1",
        "host",
        1,
        None,
        lease,
        True,
        on_requeued=lambda: None,
        on_fenced=on_fenced,
        on_unfenced=lambda: unfenced.append(mono.now),
        clock=mono,
    )
    return node, reactor, runner, mono, fenced, unfenced


def advance(reactor, mono, seconds, step=0.25):
    """Move both clocks on together, in small steps (as a running reactor would)."""
    end = mono.now + seconds
    while mono.now < end - 1e-9:
        delta = min(step, end - mono.now)
        mono.now += delta
        reactor.advance(delta)


def answer(runner, i, held=True, ended=()):
    runner.beats[i][1].callback({"held": held, "ended": list(ended)})


def test_the_defaults_leave_a_20_s_cut_alone():
    assert renewal_interval(30.0) == 2.0
    assert fence_margin(30.0) == 3.0
    # A node stops its jobs 27 s after its last renewal: a 20 s cut, plus the
    # seconds a broken connection takes to be replaced, stops nothing.
    assert 30.0 - fence_margin(30.0) - 20.0 > 2 * renewal_interval(30.0)
    assert fence_margin(4.0) == 1.0 and fence_margin(0.5) == 0.25


def test_renewals_that_succeed_never_fence():
    node, reactor, runner, mono, fenced, _ = make_lease()
    node.register()
    node.start()
    for _ in range(40):
        advance(reactor, mono, node.interval)
        answer(runner, len(runner.beats) - 1)
    assert not fenced and node.fenced is None


def test_a_node_that_cannot_renew_stops_its_jobs_at_the_lease_less_the_margin():
    node, reactor, runner, mono, fenced, _ = make_lease()
    node.register()
    started = mono.now
    node.start()
    advance(reactor, mono, node.interval)
    answer(runner, 0)  # renewed: sent 2 s after the start
    renewed = started + node.interval
    # The next heartbeat never answers (the database cannot be reached).
    advance(reactor, mono, 30.0 - fence_margin(30.0) - 0.2)
    assert not fenced
    advance(reactor, mono, 0.3)
    assert fenced and abs(fenced[0] - (renewed + 27.0)) < 0.3
    assert node.fenced == ["job-1", "job-2"]


def test_the_lease_is_measured_on_the_monotonic_clock():
    node, reactor, runner, mono, fenced, _ = make_lease()
    node.register()
    node.start()
    # The wall clock (the reactor's) jumps 60 s ahead: the timer fires, but
    # by the monotonic clock the lease is young, so nothing is stopped.
    reactor.advance(60.0)
    assert not fenced
    advance(reactor, mono, 27.1)
    assert fenced


def test_back_after_the_fence_it_reports_the_stopped_jobs_then_takes_work():
    node, reactor, runner, mono, fenced, unfenced = make_lease()
    node.register()
    node.start()
    advance(reactor, mono, 28.0)
    assert fenced and len(runner.beats) == 1
    # The heartbeat sent before the fence comes back: renewed, but the jobs
    # it stopped are not dealt with yet: another heartbeat at once, with them.
    answer(runner, 0)
    assert not unfenced
    reactor.advance(0)
    args = runner.beats[1][0]
    assert args[4] == ["job-1", "job-2"] and "could not renew its lease" in args[5]
    answer(runner, 1, held=False, ended=[{"id": "job-2", "state": "queued"}])
    assert unfenced and node.fenced is None
    # Fenced again only if renewals stop again, a whole lease later.
    advance(reactor, mono, 20.0)
    assert len(fenced) == 1


def test_the_server_fences_by_its_monotonic_clock_whatever_the_wall_clock_does():
    """The server's alarm is a thread on the monotonic clock, not a reactor timer."""
    import queue

    from twistedlrp.jobs.service.lease import MonotonicAlarm

    calls = queue.SimpleQueue()

    class Reactor:
        def callFromThread(self, fn, *args):
            calls.put(fn)

    mono = Monotonic()
    alarm = MonotonicAlarm(Reactor(), lambda: "fence", mono)
    try:
        alarm.set(mono.now + 100)
        # The monotonic clock gets there (the wall clock may have gone back):
        # the thread, which looks at least every second, calls it.
        mono.now += 100
        assert calls.get(timeout=5)() == "fence"
        alarm.set(mono.now + 3600)
        alarm.set(mono.now - 1)  # moved: due now
        assert calls.get(timeout=5)() == "fence"
    finally:
        alarm.stop()


def test_the_store_sessions_idle_limit_is_well_inside_the_lease():
    from twistedlrp.jobs.store import session_limit

    # A node blocked behind a cut-off node's locks gets them back before it must renew.
    assert session_limit(30) == 10 and session_limit(None) == 10
    assert session_limit(12) == 4 and session_limit(4) == 2 and session_limit(600) == 10
    for lease in (1, 4, 12, 30, 60):
        assert session_limit(lease) + renewal_interval(lease) <= max(lease - fence_margin(lease), 3)
