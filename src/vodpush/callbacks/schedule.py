"""When to try a failed callback again: a pure decision, no I/O, no clock."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Protocol

from vodpush.core.retry import RetryDecision


class _Uniform(Protocol):
    def uniform(self, a: float, b: float) -> float: ...


def next_delivery(
    attempts_made: int,
    schedule: Sequence[float],
    *,
    jitter: float = 0.1,
    rng: _Uniform = random,  # the module itself satisfies the protocol
) -> RetryDecision:
    """How long to wait before trying again after ``attempts_made`` failed attempts (the
    first one included); the store makes it a due time on its own clock.

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
        return RetryDecision(retry=False)
    delay = schedule[attempts_made - 1]
    if jitter:
        delay *= 1 + rng.uniform(-jitter, jitter)
    return RetryDecision(retry=True, delay=delay)
