"""When to try an upload again: a pure decision, no I/O."""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timedelta


@dataclass(frozen=True)
class RetryDecision:
    retry: bool
    at: datetime | None = None
    delay: float = 0.0


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
    return RetryDecision(retry=True, at=now + timedelta(seconds=delay), delay=delay)
