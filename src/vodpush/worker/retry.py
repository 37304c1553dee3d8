"""When to try an upload, or the abort of an orphaned one, again: pure decisions, no I/O, no
clock (the store puts an upload's delay on its own clock)."""

from __future__ import annotations

import random

from vodpush.core.retry import RetryDecision, backoff_ceiling


def decide(
    *,
    transient: bool,
    attempts_made: int,
    max_attempts: int,
    base_delay: float,
    max_delay: float,
    rng: random.Random | None = None,
) -> RetryDecision:
    """Retry transient errors with exponential backoff and jitter until ``max_attempts``
    attempts have been made; never retry a permanent error.

    The wait after attempt ``n`` is drawn from [c/2, c], c = min(max_delay, base_delay *
    2^(n-1)) ("equal jitter": never less than half the backoff, so retries neither bunch up
    at zero nor shorten the schedule below ``core.retry.shortest_retry_span``)."""
    if not transient or attempts_made >= max_attempts:
        return RetryDecision(retry=False)
    ceiling = backoff_ceiling(max(attempts_made, 1), base_delay, max_delay)
    delay = ceiling / 2 + (rng or random).uniform(0, ceiling / 2)
    return RetryDecision(retry=True, delay=delay)


def after_store_error(
    *, base_delay: float, max_delay: float, rng: random.Random | None = None
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
        rng=rng,
    )


def store_delay(tries: int, *, first: float = 0.1, cap: float = 2.0) -> float:
    """Seconds before trying a store call again after ``tries`` StoreUnavailable in a row:
    doubling from ``first``, at most ``cap`` (a restarted database is back within seconds,
    and the call is then done within ``cap`` of it)."""
    return min(cap, first * 2 ** max(0, tries - 1))


def abort_delay(attempts_made: int, *, base: float, cap: float) -> float:
    """Seconds before the abort of an orphaned upload is tried again after its
    ``attempts_made``-th failure: ``base``, doubling each time, at most ``cap``."""
    return min(cap, base * 2 ** min(max(attempts_made - 1, 0), 32))
