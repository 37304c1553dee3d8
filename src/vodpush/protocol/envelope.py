"""The response envelope shared by every command, the API's failure codes, and the
warnings about fields of a request that no command reads."""

from __future__ import annotations

import enum
import math
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from vodpush.core.fields import quoted

# The fields every request carries, whatever its command (the rest are the command's).
ENVELOPE_FIELDS = frozenset({"command", "api_key", "timestamp", "cdn", "signature"})
# Unknown fields named in one answer, at most; the rest are counted. A field name is the
# client's text: it is cut to WARNING_NAME_CHARS characters and quoted (core.fields.quoted).
MAX_WARNINGS = 10
WARNING_NAME_CHARS = 64


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


@dataclass(frozen=True)
class Answer:
    """A command's success: its message and data, and the members the envelope carries
    beside ``data`` (aws.status's ``total`` when filters were asked for). A command may
    also answer a plain (message, data) pair."""

    message: str
    data: Any
    members: Mapping[str, Any] = field(default_factory=dict)


def unknown_field_warnings(payload: Iterable[str], known: Collection[str]) -> list[str]:
    """A warning for each field of ``payload`` that is neither the envelope's nor in
    ``known``, in the order sent: at most MAX_WARNINGS named, then how many more."""
    unknown = [name for name in payload if name not in known and name not in ENVELOPE_FIELDS]
    warnings = [
        f"unknown field {quoted(name, WARNING_NAME_CHARS)} ignored"
        for name in unknown[:MAX_WARNINGS]
    ]
    if len(unknown) > MAX_WARNINGS:
        warnings.append(f"{len(unknown) - MAX_WARNINGS} more unknown fields ignored")
    return warnings


def success(
    message: str,
    data: Any,
    handle_time: float,
    *,
    members: Mapping[str, Any] | None = None,
    warnings: list[str] | None = None,
) -> dict[str, Any]:
    """The envelope of a success: the reference API's four members, then ``members``,
    then ``warnings`` only when there is one."""
    envelope = {
        "status": "success",
        "message": message,
        "handle_time": round(handle_time, 6),
        "data": data,
    }
    if members:
        if envelope.keys() & members.keys():
            raise ValueError(f"members would replace the envelope's: {sorted(members)}")
        envelope.update(members)
    if warnings:
        envelope["warnings"] = warnings
    return envelope


def failure(
    code: Code, message: str, handle_time: float, *, warnings: list[str] | None = None
) -> dict[str, Any]:
    envelope = {
        "status": "failure",
        "code": code.value,
        "message": message,
        "handle_time": round(handle_time, 6),
    }
    if warnings:
        envelope["warnings"] = warnings
    return envelope
