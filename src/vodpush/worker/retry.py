"""When to try an upload again: a pure decision, no I/O."""

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


def after_store_error(
    *, base_delay: float, max_delay: float, now: datetime, rng: random.Random | None = None
) -> RetryDecision:
    """An attempt cut short by the database (StoreUnavailable): always tried again, about
    ``base_delay`` later. It costs no attempt, so it never exhausts ``max_attempts`` and
    its backoff does not grow: a database outage is not the upload's fault."""
    return decide(
        transient=True,
        attempts_made=1,
        max_attempts=2,
        base_delay=base_delay,
        max_delay=max_delay,
        now=now,
        rng=rng,
    )


def store_delay(tries: int, *, first: float = 0.1, cap: float = 2.0) -> float:
    """Seconds before trying a store call again after ``tries`` StoreUnavailable in a row:
    doubling from ``first``, at most ``cap`` (a restarted database is back within seconds,
    and the call is then done within ``cap`` of it)."""
    return min(cap, first * 2 ** max(0, tries - 1))
