"""The pure retry decisions (no I/O): backoff for uploads, a schedule for callbacks, and
the one RetryDecision both return."""

from __future__ import annotations

import datetime as dt

import pytest

from vodpush.retry import RetryDecision, backoff, on_schedule

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


class Extreme:
    """An rng that always picks the low or the high end."""

    def __init__(self, high: bool) -> None:
        self.high = high

    def uniform(self, a: float, b: float) -> float:
        return b if self.high else a


def test_backoff_never_retries_a_permanent_error_or_past_the_last_attempt() -> None:
    common = {"max_attempts": 3, "base_delay": 1.0, "max_delay": 60.0, "now": NOW}
    assert backoff(transient=False, attempts_made=1, **common) == RetryDecision(retry=False)
    assert backoff(transient=True, attempts_made=3, **common) == RetryDecision(retry=False)
    assert backoff(transient=True, attempts_made=2, **common).retry


@pytest.mark.parametrize(("attempts_made", "ceiling"), [(1, 10.0), (2, 20.0), (3, 40.0), (6, 60.0)])
def test_backoff_doubles_up_to_the_ceiling_with_equal_jitter(
    attempts_made: int, ceiling: float
) -> None:
    common = {
        "transient": True,
        "attempts_made": attempts_made,
        "max_attempts": 10,
        "base_delay": 10.0,
        "max_delay": 60.0,
        "now": NOW,
    }
    low = backoff(**common, rng=Extreme(False))  # type: ignore[arg-type]
    high = backoff(**common, rng=Extreme(True))  # type: ignore[arg-type]
    assert (low.delay, high.delay) == (ceiling / 2, ceiling)
    assert high.at == NOW + dt.timedelta(seconds=ceiling)
    assert low.at == NOW + dt.timedelta(seconds=ceiling / 2)


def test_on_schedule_uses_the_same_decision_type() -> None:
    decision = on_schedule(2, [10, 60], NOW, jitter=0)
    assert decision == RetryDecision(retry=True, at=NOW + dt.timedelta(seconds=60))
    assert decision.delay == 60
    high = on_schedule(1, [100], NOW, jitter=0.1, rng=Extreme(True))
    assert high.at == NOW + dt.timedelta(seconds=110) and high.delay == pytest.approx(110)
    assert on_schedule(3, [10, 60], NOW) == RetryDecision(retry=False, at=None)


def test_decisions_compare_by_what_they_decide() -> None:
    # The delay is derived from ``at``: two decisions for the same moment are equal.
    at = NOW + dt.timedelta(seconds=5)
    assert RetryDecision(True, at, 5.0) == RetryDecision(True, at)
    assert RetryDecision(True, at) != RetryDecision(True, at + dt.timedelta(seconds=1))
