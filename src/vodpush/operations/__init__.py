"""The operations every caller runs (the ScaleEngine API, the operator CLI, a web page):
typed arguments, checked once here, and typed results. They know nothing of signatures,
envelopes, HTTP or click."""

from __future__ import annotations

from vodpush.operations.callbacks import Redelivered, callback_history, redeliver
from vodpush.operations.cancel import cancel, cancel_any
from vodpush.operations.context import OperationContext
from vodpush.operations.errors import (
    InvalidField,
    MissingFields,
    PreflightFailed,
    RateLimited,
    Refused,
    Unauthorized,
)
from vodpush.operations.history import History, history
from vodpush.operations.lookup import Changed, RequestRef
from vodpush.operations.retry import retry, retry_any
from vodpush.operations.status import StatusPage, StatusQuery, status
from vodpush.operations.upload import Queued, UploadArgs, upload

__all__ = [
    "Changed",
    "History",
    "InvalidField",
    "MissingFields",
    "OperationContext",
    "PreflightFailed",
    "Queued",
    "RateLimited",
    "Redelivered",
    "Refused",
    "RequestRef",
    "StatusPage",
    "StatusQuery",
    "Unauthorized",
    "UploadArgs",
    "callback_history",
    "cancel",
    "cancel_any",
    "history",
    "redeliver",
    "retry",
    "retry_any",
    "status",
    "upload",
]
