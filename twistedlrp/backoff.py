"""The one back-off policy: of job retries, reconnections and process restarts."""

import random


class Backoff:
    """
    After failures in a row: C{initial} seconds, times C{factor} each time up
    to C{maximum}, then moved by up to C{jitter} of itself either way (0.1:
    ±10 %) so that what failed together does not try again together. (Twisted's
    C{backoffPolicy} adds a jitter in seconds, whatever the delay.)
    """

    def __init__(self, initial: float, maximum: float, factor: float = 2.0, jitter: float = 0.0):
        self.initial, self.maximum, self.factor, self.jitter = initial, maximum, factor, jitter
        self.failures = 0  # in a row: counted by next(), forgotten by reset()

    def delay(self, attempt: int) -> float:
        """@return: the delay after C{attempt} failures in a row (C{initial} after 1, or 0)."""
        # (At most 100 steps: a float power overflows, a float product does not.)
        delay = min(self.initial * self.factor ** min(max(attempt - 1, 0), 100), self.maximum)
        return delay * (1 + random.uniform(-self.jitter, self.jitter)) if self.jitter else delay

    def next(self) -> float:
        """One more failure: @return: the delay before the next attempt."""
        self.failures += 1
        return self.delay(self.failures)

    def reset(self) -> None:
        self.failures = 0
