"""The response envelope shared by every command, and the API's failure codes."""

from __future__ import annotations

import enum
import math
from typing import Any


class Code(enum.StrEnum):
    """Stable failure codes of the ScaleEngine API."""

    UNKNOWN_COMMAND = "0000"
    CDN_AUTH_FAILED = "0001"
    BAD_TIMESTAMP = "0002"
    BAD_SIGNATURE = "0003"
    SERVER_ERROR = "0004"
    UNAUTHORIZED = "0005"
    MISSING_FIELDS = "0006"
    INVALID_FIELD = "0007"
    # vodpush's own: aws.upload's preflight found the bucket would not take the upload (or
    # could not check it); nothing was queued.
    PREFLIGHT_FAILED = "0008"
    BUSY = "1000"


class ApiError(Exception):
    """A command failed in a way the client should be told about."""

    def __init__(self, code: Code, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class RetryLater(ApiError):
    """Code 1000 from a command (a limit of its own): the answer tells the client to try
    again after ``retry_after`` seconds, as the API's rate limits do."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(Code.BUSY, message)
        self.retry_after = max(1, math.ceil(retry_after))


def success(message: str, data: Any, handle_time: float) -> dict[str, Any]:
    return {
        "status": "success",
        "message": message,
        "handle_time": round(handle_time, 6),
        "data": data,
    }


def failure(code: Code, message: str, handle_time: float) -> dict[str, Any]:
    return {
        "status": "failure",
        "code": code.value,
        "message": message,
        "handle_time": round(handle_time, 6),
    }
