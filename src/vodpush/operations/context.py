"""What an operation works with: the caller's account, the settings and the stores. Who the
caller is (a signed API request, the operator's CLI, a web page) is not its business."""

from __future__ import annotations

from dataclasses import dataclass

from vodpush.config import Settings
from vodpush.core.accounts import AccountRecord
from vodpush.core.ports import RequestStorePort
from vodpush.core.preflight import PreflightPort


@dataclass(frozen=True)
class OperationContext:
    account: AccountRecord
    settings: Settings
    requests: RequestStorePort
    # Checks a bucket against S3 before an upload is queued (None: this process has none,
    # and a preflight asked for is refused).
    preflight: PreflightPort | None = None
