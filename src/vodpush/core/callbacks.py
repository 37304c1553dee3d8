"""A request's callback history (aws.callbacks) and what asking for a redelivery
(aws.redeliver) came to: plain values the stores hand out, the one rule both stores apply
before a redelivery, and the public record of a history."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from vodpush.core.records import format_time
from vodpush.core.requests import FINAL_STATES, CallbackState

# The attempts aws.callbacks lists at most, newest first (the total says how many there are).
HISTORY_LIMIT = 100
# The redelivery limit counts the redeliveries of a request in this many seconds back, on
# the store's clock.
REDELIVERY_WINDOW = 3600.0
# request_events.event of a redelivery.
REDELIVERED_EVENT = "callback_redelivered"


@dataclass(frozen=True)
class AttemptRecord:
    """One POST of a request's callback, as recorded (callback_attempts)."""

    at: datetime | str
    ok: bool
    http_status: int | None
    error: str | None
    duration: float


@dataclass(frozen=True)
class CallbackHistory:
    """A request's callback: where it stands now, and the POSTs made so far."""

    id: int
    state: str  # the request's
    callback: str  # the URL; "" for none
    callback_state: str
    # POSTs of the current delivery (its retry schedule); a redelivery starts at 0 again.
    callback_attempts: int
    next_at: datetime | str | None  # when the next POST is due, while pending
    msg_id: str | None  # the webhook-id of the current delivery
    last_error: str | None
    total: int  # POSTs recorded in all, every delivery of the request
    redeliveries: int
    last_redelivered: datetime | str | None
    attempts: tuple[AttemptRecord, ...] = field(default=())  # newest first, bounded


class Redelivery(enum.StrEnum):
    """What a redelivery request came to."""

    QUEUED = "queued"  # due now under a new webhook-id
    REPLAYED = "replayed"  # the same request again (its webhook-id is there): nothing changed
    NOT_FOUND = "not_found"  # no such request in the caller's account
    NOT_FINISHED = "not_finished"  # queued, running or retrying: its callback comes later
    NO_CALLBACK = "no_callback"
    PENDING = "pending"  # a delivery is under way (due, or waiting for a retry)
    TOO_MANY = "too_many"  # the limit of redeliveries in REDELIVERY_WINDOW is reached


@dataclass(frozen=True)
class RedeliveryResult:
    outcome: Redelivery
    state: str = ""  # the request's
    callback_state: str = ""
    msg_id: str | None = None  # the webhook-id of the callback's current delivery
    # QUEUED: when it is due; PENDING: the next POST; TOO_MANY: when a redelivery is
    # allowed again. Store times (naive UTC, or SQLite's text).
    at: datetime | str | None = None
    redeliveries: int = 0  # TOO_MANY: how many there were in the window
    retry_after: float = 0.0  # TOO_MANY: seconds from now (store clock) until ``at``


def judge_redelivery(
    *,
    state: str,
    callback: str,
    callback_state: str,
    msg_id: str | None,
    next_at: datetime | str | None,
    new_msg_id: str,
) -> RedeliveryResult | None:
    """Whether a request's callback may be made due again under ``new_msg_id``: None if so,
    else the answer (a replay of the same redelivery first: it changes nothing). Both
    stores apply it, under the lock they write with; the limit in time is theirs to count."""
    if msg_id == new_msg_id:
        return RedeliveryResult(
            Redelivery.REPLAYED,
            state=state,
            callback_state=callback_state,
            msg_id=msg_id,
            at=next_at,
        )
    if state not in FINAL_STATES:
        return RedeliveryResult(Redelivery.NOT_FINISHED, state=state)
    if not callback:
        return RedeliveryResult(Redelivery.NO_CALLBACK, state=state)
    if callback_state == CallbackState.PENDING.value:
        # A redelivery would cut the retry schedule short: a receiver that keeps failing
        # would be hit as often as the customer asks.
        return RedeliveryResult(
            Redelivery.PENDING, state=state, callback_state=callback_state, at=next_at
        )
    return None


def render_history(history: CallbackHistory) -> dict[str, Any]:
    """The aws.callbacks record of ``history``."""
    pending = history.callback_state == CallbackState.PENDING.value
    return {
        "id": history.id,
        "state": history.state,
        "callback": history.callback,
        "callback_state": history.callback_state,
        "callback_attempts": history.callback_attempts,
        "next_attempt_at": format_time(history.next_at) if pending else "",
        "webhook_id": history.msg_id,
        "callback_error": history.last_error,
        "redeliveries": history.redeliveries,
        "last_redelivered": format_time(history.last_redelivered),
        "total": history.total,
        "attempts": [
            {
                "at": format_time(a.at),
                "ok": a.ok,
                "http_status": a.http_status,
                "error": a.error,
                "duration": round(a.duration, 3),
            }
            for a in history.attempts
        ],
    }
