"""Retry delays: exponential backoff with full jitter, honouring Retry-After, capped.

The n-th consecutive failure (n = 0, 1, 2, ...) waits a uniformly random time in
``[0, min(maximum, initial * 2**n)]`` ("full jitter": many agents that lost the same endpoint
do not come back in lock-step). A receiver's ``Retry-After`` is a floor, not a suggestion we
jitter below, but it is capped at ``maximum`` too, so a receiver that says "come back in a day"
cannot park a sink for longer than the configured ``max_backoff``.

Delays are durations for the event loop's monotonic clock; nothing here reads a wall clock.
"""

from __future__ import annotations

import random

__all__ = ["Backoff", "full_jitter"]


def full_jitter(attempt: int, initial: float, maximum: float, rng: random.Random) -> float:
    """A delay in ``[0, min(maximum, initial * 2**attempt)]``."""
    if attempt < 0:
        raise ValueError("attempt must be >= 0")
    # Cap the exponent so a long outage never overflows the float.
    ceiling = min(maximum, initial * 2.0 ** min(attempt, 64))
    return rng.uniform(0.0, max(ceiling, 0.0))


class Backoff:
    """Counts consecutive failures and hands out the next delay; ``reset()`` after a success."""

    def __init__(self, initial: float, maximum: float, rng: random.Random | None = None) -> None:
        if initial <= 0 or maximum <= 0:
            raise ValueError("backoff delays must be positive")
        self.initial = initial
        self.maximum = max(maximum, initial)
        self._rng = rng or random.Random()
        self.failures = 0

    def next_delay(self, retry_after: float | None = None) -> float:
        delay = full_jitter(self.failures, self.initial, self.maximum, self._rng)
        self.failures += 1
        if retry_after is not None and retry_after > delay:
            delay = retry_after
        return min(delay, self.maximum)

    def reset(self) -> None:
        self.failures = 0
