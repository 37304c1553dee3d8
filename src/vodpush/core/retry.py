"""What a retry policy decides, and the arithmetic of the upload backoff schedule; the
policies themselves are pure functions elsewhere (``worker.retry.decide`` for uploads,
``callbacks.schedule.next_delivery`` for callbacks).

A decision says how long to wait, never at what time: the store adds the delay to its own
clock (the database's), so a worker's clock, fast or slow, cannot move a due time."""

from __future__ import annotations

from dataclasses import dataclass

# Delays (seconds) before each retry of a failed callback delivery: the last one comes about
# 15 hours after the first try. The default of Settings.callback_schedule.
DEFAULT_CALLBACK_SCHEDULE: tuple[float, ...] = (10, 60, 300, 1800, 3600, 7200, 14400, 28800)

# The upload backoff defaults (Settings.retry_*): waits doubling from 5 s to 15 minutes, and
# enough attempts that even the shortest jitter draws keep retrying for an hour, so an S3
# outage shorter than that fails no upload (16 attempts: at least 3787 s, at most 7575 s).
DEFAULT_RETRY_BASE_DELAY = 5.0
DEFAULT_RETRY_MAX_DELAY = 900.0
DEFAULT_RETRY_WINDOW = 3600.0
DEFAULT_MAX_ATTEMPTS = 16


@dataclass(frozen=True)
class RetryDecision:
    """Try again ``delay`` seconds from now (on the store's clock), or (``retry`` false)
    give up."""

    retry: bool
    delay: float | None = None


def backoff_ceiling(retry: int, base: float, cap: float) -> float:
    """The longest wait before retry number ``retry`` (1: the wait after the first attempt):
    ``base`` doubled each time, at most ``cap``. A wait is drawn between half of this and
    all of it ("equal jitter")."""
    if retry < 1:
        raise ValueError("retry counts from 1")
    # The exponent is bounded so that a large retry number cannot overflow a float.
    return min(cap, base * 2.0 ** min(retry - 1, 1000))


def shortest_retry_span(max_attempts: int, base: float, cap: float) -> float:
    """How long an upload that fails every one of its ``max_attempts`` attempts keeps being
    retried at the least: the sum of its waits when every jitter draw is the lowest (half
    each ceiling). The attempts themselves only add to it."""
    return sum(backoff_ceiling(n, base, cap) / 2 for n in range(1, max_attempts))


def attempts_for_window(window: float, base: float, cap: float, limit: int = 10_000) -> int | None:
    """The fewest attempts whose shortest retry span is at least ``window``; None when no
    number up to ``limit`` reaches it (a zero delay)."""
    span, attempts = 0.0, 1
    while span < window:
        if attempts >= limit:
            return None
        span += backoff_ceiling(attempts, base, cap) / 2
        attempts += 1
    return attempts
