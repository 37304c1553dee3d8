"""When to try an upload, or the abort of an orphaned one, again: pure decisions, no I/O."""

from __future__ import annotations

import random
from datetime import datetime, timedelta

from vodpush.core.retry import RetryDecision


def decide(
    *,
    transient: bool,
    attempts_made: int,
    max_attempts: int,
    base_delay: float,
    max_delay: float,
    now: datetime,
    rng: random.Random | None = None,
) -> RetryDecision:
    """Retry transient errors with exponential backoff and jitter until ``max_attempts``
    attempts have been made; never retry a permanent error."""
    if not transient or attempts_made >= max_attempts:
        return RetryDecision(retry=False)
    ceiling = min(max_delay, base_delay * 2 ** (attempts_made - 1))
    # "Equal jitter": at least half the backoff, so retries never bunch up at zero.
    delay = ceiling / 2 + (rng or random).uniform(0, ceiling / 2)
    return RetryDecision(retry=True, at=now + timedelta(seconds=delay))


def abort_delay(attempts_made: int, *, base: float, cap: float) -> float:
    """Seconds before the abort of an orphaned upload is tried again after its
    ``attempts_made``-th failure: ``base``, doubling each time, at most ``cap``."""
    return min(cap, base * 2 ** min(max(attempts_made - 1, 0), 32))
