"""Retention's durations, rules and the pruner's timing, driven by a fake clock and store."""

from __future__ import annotations

import datetime as dt

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from twistedlrp.jobs import InvalidArguments, job
from twistedlrp.jobs.errors import JobServiceUnavailable
from twistedlrp.jobs.registry import JobDefinition
from twistedlrp.jobs.service import retention


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (90, 90.0),
        (1.5, 1.5),
        ("90", 90.0),
        ("30s", 30.0),
        ("15m", 900.0),
        ("12h", 43200.0),
        (" 2D ", 172800.0),
        ("1w", 604800.0),
        ("0.5h", 1800.0),
        (dt.timedelta(days=3), 259200.0),
    ],
)
def test_durations(value, seconds):
    assert retention.parse_duration(value, "x") == seconds


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("2x", "x: expected a number with an optional unit s, m, h, d or w"),
        ("", "x: expected a number with an optional unit"),
        ("-1d", "x: expected a number with an optional unit"),
        ("forever", "x: expected a number with an optional unit"),
        (0, "x: must be more than 0 s"),
        (-5, "x: must be more than 0 s"),
        (float("nan"), "x: must be more than 0 s"),
        (1e10, "at most 1e+09 s"),
        (dt.timedelta(0), "x: must be more than 0 s"),
        (True, "x: expected a duration, got True"),
        ([1], "x: expected seconds, a datetime.timedelta or a string"),
    ],
)
def test_bad_durations_say_why(value, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("+", r"\+")):
        retention.parse_duration(value, "x")


def test_none_and_forever_keep_for_ever():
    assert retention.parse_keep(None, "k") is None
    assert retention.parse_keep("Forever", "k") is None
    assert retention.parse_keep("2d", "k") == 172800.0


def test_job_keep_is_checked_at_definition():
    with pytest.raises(InvalidArguments, match="keep: expected a number with an optional unit"):
        job(keep="soon")
    with pytest.raises(InvalidArguments, match="keep: must be more than 0 s"):
        job(keep=0)


def definition(name, keep=None):
    return JobDefinition(name=name, function=print, keep=keep)


def test_rules_group_the_jobs_own_keeps_and_exclude_them_from_the_default():
    found = retention.rules(
        604800.0,
        [
            definition("a"),
            definition("b", 60.0),
            definition("c", retention.FOREVER),
            definition("d", 60.0),
            definition("e", 3600.0),
        ],
    )
    assert found == [
        retention.Rule(60.0, ("b", "d")),
        retention.Rule(3600.0, ("e",)),
        retention.Rule(604800.0, None, ("b", "c", "d", "e")),
    ]
    # Kept for ever by default: only the jobs' own keeps apply.
    assert retention.rules(None, [definition("b", 60.0)]) == [retention.Rule(60.0, ("b",))]
    assert retention.interval_for(found) == 6.0
    assert retention.interval_for([retention.Rule(2.0)]) == 1.0
    assert retention.interval_for([retention.Rule(604800.0)]) == 60.0
    assert retention.interval_for([]) == 60.0


def test_describe():
    assert [retention.describe(s) for s in (604800, 172800, 7200, 5400, 45, 1.5)] == [
        "1w",
        "2d",
        "2h",
        "90m",
        "45s",
        "1.5s",
    ]


class FakeStore:
    """Each run() is answered by the test: C{pending} holds (rule, size, Deferred)."""

    def __init__(self):
        self.pending = []

    def take(self):
        """@return: the one batch asked for, C{(rule, size, Deferred)}, now answered by the test."""
        [batch] = self.pending
        self.pending.clear()
        return batch

    def run(self, fn, rule, size):
        assert fn is retention.prune_batch
        d = defer.Deferred()
        self.pending.append((rule, size, d))
        return d


def make_pruner(keep=100.0, batch_size=500):
    clock, store = Clock(), FakeStore()
    pruner = retention.Pruner(clock, store, keep, lambda: [], batch_size=batch_size)
    return clock, store, pruner


def test_the_first_pass_waits_an_interval_then_batches_follow_with_pauses():
    clock, store, pruner = make_pruner(keep=100.0)
    pruner.start()
    clock.advance(9.9)
    assert store.pending == []
    clock.advance(0.1)
    rule, size, d = store.take()
    assert (rule, size) == (retention.Rule(100.0), 500)
    d.callback(500)  # a full batch, at once: the next one after the shortest pause
    assert store.pending == []
    clock.advance(retention.MIN_PAUSE)
    _, size, d = store.take()
    d.callback(7)  # the last one: the pass is over, the next in an interval
    assert pruner.deleted == 507 and pruner.passes == 1
    clock.advance(9.9)
    assert store.pending == []
    clock.advance(0.1)
    assert len(store.pending) == 1


def test_with_a_long_keep_the_first_pass_comes_soon_then_one_a_minute():
    clock, store, pruner = make_pruner(keep=604800.0)
    pruner.start()
    clock.advance(retention.FIRST_PASS)
    _, _, d = store.take()
    d.callback(0)
    clock.advance(59.9)
    assert store.pending == []
    clock.advance(0.1)
    assert len(store.pending) == 1


def test_a_slow_batch_halves_the_next_and_pauses_as_long_as_it_took():
    clock, store, pruner = make_pruner()
    pruner.start()
    clock.advance(10)
    _, size, d = store.take()
    clock.advance(0.2)  # the batch took 0.2 s
    d.callback(size)
    assert pruner.size == 250
    clock.advance(0.19)
    assert store.pending == []
    clock.advance(0.01)
    _, size, d = store.take()
    assert size == 250
    d.callback(size)  # quick: back to twice as many
    assert pruner.size == 500


def test_stop_ends_the_timer_and_a_closing_store_is_not_an_error():
    clock, store, pruner = make_pruner()
    pruner.start()
    clock.advance(10)
    _, _, d = store.take()
    pruner.stop()
    d.errback(JobServiceUnavailable("the job store is closed"))
    assert clock.getDelayedCalls() == []
    pruner.start()
    pruner.stop()
    assert clock.getDelayedCalls() == []
