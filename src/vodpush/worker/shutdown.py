"""When a stopping worker gives up on what still runs: pure arithmetic on monotonic times.

A stop at time t with ``grace`` seconds:

- until the deadline, t + grace, running uploads and callbacks may finish normally;
- from the deadline an upload is asked to stop at its next part boundary, and hands its
  request back itself (back to queued, the attempt not counted);
- at the deadline + SETTLE_SECONDS (``give_up_at``) the worker hands back whatever is
  still running, an S3 call or a callback that did not return, and stops waiting for it:
  the process exits then, abandoning those threads (the lease guard refuses anything they
  try afterwards).

So the process is gone SETTLE_SECONDS after the grace, plus the few database writes of
the hand-back: HAND_BACK_SECONDS at most, even when the database is away or slow (what
is not handed back by then is left to its lease). A second stop can only bring the
deadline nearer (``stop(grace=0)``: now).
"""

from __future__ import annotations

import math

__all__ = [
    "HAND_BACK_SECONDS",
    "NOT_STOPPING",
    "SETTLE_SECONDS",
    "deadline_after",
    "give_up_at",
    "time_left",
]

# A part in flight at the deadline usually lands within a second on a healthy link; waiting
# this long lets it be recorded (the next worker need not send it again) without letting a
# stuck one hold the exit.
SETTLE_SECONDS = 2.0

# How long the hand-back at give_up_at may take: a database that is away (a refused or
# unanswered connection) must not hold the exit past grace + SETTLE_SECONDS + this.
HAND_BACK_SECONDS = 1.5

NOT_STOPPING = math.inf


def deadline_after(now: float, grace: float, current: float = NOT_STOPPING) -> float:
    """The deadline of a stop at ``now`` with ``grace`` seconds, given the ``current``
    deadline (NOT_STOPPING before the first stop): never later than ``current``."""
    if math.isnan(grace) or grace < 0:
        raise ValueError("grace must be a number of seconds, 0 or more")
    return min(current, now + grace)


def give_up_at(deadline: float) -> float:
    """When the worker hands back what still runs and stops waiting for it."""
    return deadline + SETTLE_SECONDS


def time_left(until: float, now: float) -> float:
    """Seconds from ``now`` to ``until``, never negative (``inf`` when not stopping)."""
    return max(until - now, 0.0)
