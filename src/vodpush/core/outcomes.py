"""What a request row holds once its upload has an outcome: the column values both stores
(SQL and in-memory) write, defined once.

``now`` is the store's own time: a datetime from the in-memory store's clock, or the SQL
store's stand-in for the database's clock (its value is computed by the database, so the
callback is due by the clock claims are judged by)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from vodpush.core.records import QUEUED_MESSAGE, SUCCESS_MESSAGE
from vodpush.core.requests import CallbackState, State


def succeeded(
    *,
    results: dict[str, str],
    http_status: int,
    sha256: str,
    size: int,
    has_callback: bool,
    now: Any,
    new_msg_id: Callable[[], str],
) -> dict[str, Any]:
    return {
        "state": State.SUCCEEDED.value,
        "message": SUCCESS_MESSAGE,
        "results_json": json.dumps(results),
        "http_status": http_status,
        "error_code": None,
        "sha256": sha256,
        "bytes_done": size,
        "bytes_total": size,
        **_finished(now),
        **callback_due(has_callback, now, new_msg_id),
    }


def failed(
    *,
    message: str,
    http_status: int | None,
    code: str | None,
    has_callback: bool,
    now: Any,
    new_msg_id: Callable[[], str],
) -> dict[str, Any]:
    return {
        "state": State.FAILED.value,
        "message": message,
        "http_status": http_status or 0,
        "error_code": code,
        **_finished(now),
        **callback_due(has_callback, now, new_msg_id),
    }


def canceled(
    *, message: str, has_callback: bool, now: Any, new_msg_id: Callable[[], str]
) -> dict[str, Any]:
    """A request stopped by aws.cancel (or the operator). The caller drops its part ledger
    in the same write, recording a checkpoint still there as an orphan for the reaper."""
    return {
        "state": State.CANCELED.value,
        "message": message,
        "http_status": 0,
        "error_code": None,
        **_finished(now),
        **callback_due(has_callback, now, new_msg_id),
    }


def requeued(now: Any) -> dict[str, Any]:
    """A failed or canceled request queued again by aws.retry: due now, as if new (its
    attempts, lease expiries, results and callback start over); its history keeps the rest.
    The callback, if any, is due again when it finishes, under a new webhook-id: a pending
    delivery of the old outcome is dropped (it would now show the new state)."""
    return {
        "state": State.QUEUED.value,
        "message": QUEUED_MESSAGE,
        "not_before": now,
        "attempts": 0,
        "lease_expiries": 0,
        "results_json": None,
        "http_status": 0,
        "error_code": None,
        "sha256": None,
        "bytes_done": 0,
        "bytes_total": None,
        "callback_state": CallbackState.NONE.value,
        "callback_attempts": 0,
        "callback_next_at": None,
        "callback_msg_id": None,
        "callback_last_error": None,
        **_finished(now),
    }


def _finished(now: Any) -> dict[str, Any]:
    # No lease, no multipart checkpoint (the caller drops the part ledger with it).
    return {
        "multipart_json": None,
        "lease_owner": None,
        "lease_expires_at": None,
        "updated_at": now,
    }


def callback_due(has_callback: bool, now: Any, new_msg_id: Callable[[], str]) -> dict[str, Any]:
    if not has_callback:
        return {}
    # The webhook-id is fixed here, once, before any POST: every retry and every worker
    # sends this same id, so receivers that deduplicate by id see the delivery once.
    return {
        "callback_state": CallbackState.PENDING.value,
        "callback_next_at": now,
        "callback_attempts": 0,
        "callback_msg_id": new_msg_id(),
    }
