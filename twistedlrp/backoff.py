"""
The one back-off policy: the delay before another attempt after failures in
a row, growing by C{factor} from C{initial} up to C{maximum}, then moved by
up to C{jitter} of itself either way, so that what failed together does not
try again together. Used by job retries (L{twistedlrp.jobs.registry}), the
job client's reconnections, the job store's and its listener's, and the
restarts of web processes and job workers.

Twisted's C{backoffPolicy} adds a jitter in seconds whatever the delay;
here it is a fraction of the delay (a job's documented ±25 %), and a policy
also counts the failures in a row (L{Backoff.next}, L{Backoff.reset}).
"""

from __future__ import annotations

import random


class Backoff:
    """
    @param initial: the delay after one failure, in seconds.
    @param maximum: no delay is longer before jitter.
    @param factor: each next delay is the last one times this.
    @param jitter: the fraction of a delay it is moved by at most, either way (0.1: ±10 %).
    @ivar failures: the failures in a row counted by L{next} since L{reset}.
    """

    def __init__(self, initial: float, maximum: float, factor: float = 2.0, jitter: float = 0.0):
        self.initial, self.maximum, self.factor, self.jitter = initial, maximum, factor, jitter
        self.failures = 0

    def delay(self, attempt: int) -> float:
        """@return: the delay after C{attempt} failures in a row (C{initial} after 1, or 0)."""
        try:
            delay = min(self.initial * self.factor ** max(attempt - 1, 0), self.maximum)
        except OverflowError:
            delay = self.maximum
        return delay * (1 + random.uniform(-self.jitter, self.jitter)) if self.jitter else delay

    def next(self) -> float:
        """One more failure: @return: the delay before the next attempt."""
        self.failures += 1
        return self.delay(self.failures)

    def reset(self) -> None:
        """An attempt succeeded: the next failure waits C{initial} again."""
        self.failures = 0
