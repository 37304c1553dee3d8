"""What a retry policy decides; the policies themselves are pure functions elsewhere
(``worker.retry.decide`` for uploads, ``callbacks.schedule.next_delivery`` for callbacks)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

# Delays (seconds) before each retry of a failed callback delivery: the last one comes about
# 15 hours after the first try. The default of Settings.callback_schedule.
DEFAULT_CALLBACK_SCHEDULE: tuple[float, ...] = (10, 60, 300, 1800, 3600, 7200, 14400, 28800)


@dataclass(frozen=True)
class RetryDecision:
    """Try again at ``at``, or (``retry`` false) give up."""

    retry: bool
    at: datetime | None = None
