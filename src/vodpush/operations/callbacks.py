"""callbacks, redeliver: the history of a request's callback (aws.callbacks) and sending it
again (aws.redeliver).

A redelivery is a new delivery of the request's current record with a new webhook-id: a
receiver that deduplicates by webhook-id would drop a message with the id it has seen, and
the usual reason to ask is that the receiver lost what it had acknowledged. Every retry of
the redelivery keeps its own id, as for any delivery."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from vodpush.core.callbacks import (
    HISTORY_LIMIT,
    REDELIVERY_WINDOW,
    CallbackHistory,
    Redelivery,
    RedeliveryResult,
)
from vodpush.core.fields import InvalidField
from vodpush.core.records import format_time
from vodpush.core.requests import CallbackState
from vodpush.operations.context import OperationContext
from vodpush.operations.errors import RateLimited
from vodpush.operations.lookup import RequestRef, no_such_request
from vodpush.webhooks import new_message_id

log = logging.getLogger(__name__)

MAX_ID = 2**62


def callback_history(ctx: OperationContext, ref: RequestRef) -> CallbackHistory:
    """The callback of the caller's request ``ref.id`` and its newest attempts (at most
    HISTORY_LIMIT, newest first)."""
    history = ctx.requests.callback_history(ctx.account.id, ref.id, limit=HISTORY_LIMIT)
    if history is None:
        raise no_such_request(ref)
    return history


@dataclass(frozen=True)
class Redelivered:
    """The delivery now under way: due at ``due`` (store time), webhook-id ``msg_id``."""

    id: int
    callback_state: str
    msg_id: str | None
    due: datetime | str | None
    replayed: bool

    def record(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "callback_state": self.callback_state,
            "webhook_id": self.msg_id,
            "next_attempt_at": format_time(self.due)
            if self.callback_state == CallbackState.PENDING.value
            else "",
        }


def redelivery_message_id(request_id: int, replay_key: str | None) -> str:
    """The webhook-id of a redelivery. From an API request it is derived from the request's
    signature digest, so that the same signed request sent again (a client's retry after a
    lost answer, a replay inside the timestamp window) is recognised by the store and sends
    nothing more; otherwise (the operator) a fresh one."""
    if replay_key is None:
        return new_message_id()
    digest = hashlib.sha256(f"vodpush redeliver {request_id} {replay_key}".encode()).hexdigest()
    return f"msg_{digest[:32]}"


def redeliver(
    ctx: OperationContext, ref: RequestRef, *, replay_key: str | None = None
) -> Redelivered:
    """Send the callback of the caller's finished request ``ref.id`` again, as a new
    delivery due now. Refused (InvalidField on ``id``) for a request that is not the
    caller's, not finished, without a callback URL or with a delivery pending; RateLimited
    past ``callback_redeliveries_per_hour``."""
    limit = ctx.settings.callback_redeliveries_per_hour
    result = ctx.requests.redeliver_callback(
        ctx.account.id,
        ref.id,
        msg_id=redelivery_message_id(ref.id, replay_key),
        limit=limit,
        window=REDELIVERY_WINDOW,
    )
    _refuse(ref.id, result, limit)
    if result.outcome == Redelivery.QUEUED:
        log.info(
            "callback redelivery queued",
            extra={
                "action": "callback.redelivered",
                "request_id": ref.id,
                "account_id": ctx.account.id,
                "msg_id": result.msg_id,
            },
        )
    return Redelivered(
        id=ref.id,
        callback_state=result.callback_state,
        msg_id=result.msg_id,
        due=result.at,
        replayed=result.outcome == Redelivery.REPLAYED,
    )


def _refuse(request_id: int, result: RedeliveryResult, limit: int) -> None:
    outcome = result.outcome
    if outcome == Redelivery.NOT_FOUND:
        raise no_such_request(RequestRef(request_id))
    if outcome == Redelivery.NOT_FINISHED:
        raise InvalidField(
            "id",
            f"request {request_id} has not finished (it is {result.state}); "
            "its callback is sent when it does",
        )
    if outcome == Redelivery.NO_CALLBACK:
        raise InvalidField("id", f"request {request_id} has no callback URL")
    if outcome == Redelivery.PENDING:
        raise InvalidField(
            "id",
            f"a delivery of request {request_id}'s callback is already pending "
            f"(next attempt at {format_time(result.at)} UTC)",
        )
    if outcome == Redelivery.TOO_MANY:
        raise RateLimited(
            f"the callback of request {request_id} was redelivered {result.redeliveries} "
            f"times in the past hour, the most allowed ({limit}); "
            f"try again after {format_time(result.at)} UTC",
            retry_after=result.retry_after,
        )


__all__ = [
    "Redelivered",
    "RequestRef",
    "callback_history",
    "redeliver",
    "redelivery_message_id",
]
