"""An operation's refusal as the API answers it: its code, and the operation's message."""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

from vodpush.operations import (
    InvalidField,
    MissingFields,
    PreflightFailed,
    RateLimited,
    Refused,
    Unauthorized,
)
from vodpush.protocol.envelope import ApiError, Code, RetryLater

_Answer = TypeVar("_Answer")

_CODES: dict[type[Refused], Code] = {
    MissingFields: Code.MISSING_FIELDS,
    InvalidField: Code.INVALID_FIELD,
    Unauthorized: Code.UNAUTHORIZED,
    PreflightFailed: Code.PREFLIGHT_FAILED,
}


def api_error(refused: Refused) -> ApiError:
    if isinstance(refused, RateLimited):
        return RetryLater(refused.message, refused.retry_after)
    for kind, code in _CODES.items():
        if isinstance(refused, kind):
            return ApiError(code, refused.message)
    raise TypeError(f"no API code for {type(refused).__name__}")  # a new refusal: map it


def answering_refusals(
    handler: Callable[[Any, dict[str, Any]], _Answer],
) -> Callable[[Any, dict[str, Any]], _Answer]:
    """``handler`` with the operations' refusals raised as ApiError."""

    @wraps(handler)
    def adapted(ctx: Any, payload: dict[str, Any]) -> _Answer:
        try:
            return handler(ctx, payload)
        except Refused as exc:
            raise api_error(exc) from exc

    return adapted
