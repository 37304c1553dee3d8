"""When to try again: pure decisions, no I/O, and one decision type for uploads and
callbacks (the worker acts on them)."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Protocol

__all__ = ["RetryDecision", "backoff", "on_schedule"]


@dataclass(frozen=True)
class RetryDecision:
    retry: bool
    at: datetime | None = None  # when to try again; None when giving up
    # Seconds from the decision to ``at``, for messages and logs: derived from ``at``, so
    # decisions compare by what they decide.
    delay: float = field(default=0.0, compare=False)


class _Uniform(Protocol):
    def uniform(self, a: float, b: float) -> float: ...


def backoff(
    *,
    transient: bool,
    attempts_made: int,
    max_attempts: int,
    base_delay: float,
    max_delay: float,
    now: datetime,
    rng: _Uniform = random,  # the module itself satisfies the protocol
) -> RetryDecision:
    """For uploads: retry transient errors with exponential backoff and jitter until
    ``max_attempts`` attempts have been made; never retry a permanent error."""
    if not transient or attempts_made >= max_attempts:
        return RetryDecision(retry=False)
    ceiling = min(max_delay, base_delay * 2 ** (attempts_made - 1))
    # "Equal jitter": at least half the backoff, so retries never bunch up at zero.
    delay = ceiling / 2 + rng.uniform(0, ceiling / 2)
    return RetryDecision(retry=True, at=now + timedelta(seconds=delay), delay=delay)


def on_schedule(
    attempts_made: int,
    schedule: Sequence[float],
    now: datetime,
    *,
    jitter: float = 0.1,
    rng: _Uniform = random,
) -> RetryDecision:
    """For callbacks: when to try again after ``attempts_made`` failed attempts (the first
    one included).

    ``schedule[i]`` is the delay before retry ``i + 1``, stretched or shrunk by up to
    ``jitter`` (a fraction) so that many callbacks failing together do not return together.
    Once the schedule is used up, give up.
    """
    if attempts_made < 1:
        raise ValueError("attempts_made counts attempts already made: it must be at least 1")
    if not 0 <= jitter < 1:
        raise ValueError("jitter must be a fraction in [0, 1)")
    if any(not math.isfinite(d) or d < 0 for d in schedule):
        raise ValueError("schedule delays must be finite and not negative")
    if attempts_made > len(schedule):
        return RetryDecision(retry=False, at=None)
    delay = schedule[attempts_made - 1]
    if jitter:
        delay *= 1 + rng.uniform(-jitter, jitter)
    return RetryDecision(retry=True, at=now + timedelta(seconds=delay), delay=delay)
