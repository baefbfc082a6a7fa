"""The one back-off policy (twistedlrp.backoff) and a job's retry delay built on it."""

import pytest

from twistedlrp.backoff import Backoff
from twistedlrp.jobs.registry import retry_delay


def test_doubles_from_initial_up_to_maximum():
    policy = Backoff(0.5, 30.0)
    assert [policy.delay(n) for n in range(1, 9)] == [0.5, 1, 2, 4, 8, 16, 30, 30]
    assert policy.delay(0) == 0.5  # no failure yet counts as the first


def test_factor():
    policy = Backoff(1.0, 100.0, factor=3)
    assert [policy.delay(n) for n in (1, 2, 3, 4, 5)] == [1, 3, 9, 27, 81]


def test_huge_attempt_is_the_maximum():
    assert Backoff(1.0, 60.0).delay(10_000) == 60.0


def test_next_counts_failures_and_reset_starts_again():
    policy = Backoff(0.05, 5.0)
    assert [policy.next() for _ in range(9)] == [0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0]
    assert policy.failures == 9
    policy.reset()
    assert policy.failures == 0
    assert policy.next() == 0.05


def test_jitter_is_a_fraction_either_way():
    policy = Backoff(1.0, 10.0, jitter=0.1)
    delays = [policy.delay(4) for _ in range(2000)]
    assert all(7.2 <= d <= 8.8 for d in delays)
    assert min(delays) < 7.5 and max(delays) > 8.5  # it does move, both ways
    capped = [policy.delay(50) for _ in range(2000)]
    assert all(9.0 <= d <= 11.0 for d in capped)


def test_no_jitter_is_exact():
    assert {Backoff(0.25, 1.0).delay(2) for _ in range(100)} == {0.5}


@pytest.mark.parametrize(
    "attempt, nominal", [(0, 2.0), (1, 2.0), (2, 4.0), (5, 32.0), (20, 3600.0)]
)
def test_retry_delay_doubles_capped_at_an_hour_with_a_quarter_jitter(attempt, nominal):
    delays = [retry_delay(2.0, attempt) for _ in range(500)]
    assert all(nominal * 0.75 <= d <= nominal * 1.25 for d in delays)
    assert len(set(delays)) > 1


@pytest.mark.parametrize("base", [0.0, -1.0])
def test_retry_delay_without_a_base_is_none(base):
    assert retry_delay(base, 3) == 0.0
