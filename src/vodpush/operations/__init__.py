"""The operations every caller runs (the ScaleEngine API, the operator CLI, a web page):
typed arguments, checked once here, and typed results. They know nothing of signatures,
envelopes, HTTP or click."""

from __future__ import annotations

from vodpush.operations.context import OperationContext
from vodpush.operations.errors import (
    InvalidField,
    MissingFields,
    PreflightFailed,
    Refused,
    Unauthorized,
)
from vodpush.operations.status import StatusPage, StatusQuery, status
from vodpush.operations.upload import Queued, UploadArgs, upload

__all__ = [
    "InvalidField",
    "MissingFields",
    "OperationContext",
    "PreflightFailed",
    "Queued",
    "Refused",
    "StatusPage",
    "StatusQuery",
    "Unauthorized",
    "UploadArgs",
    "status",
    "upload",
]
