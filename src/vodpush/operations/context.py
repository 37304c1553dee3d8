"""What an operation works with: the caller's account, the settings and the stores. Who the
caller is (a signed API request, the operator's CLI, a web page) is not its business."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from vodpush.config import Settings
from vodpush.core.accounts import AccountRecord
from vodpush.core.requests import Enqueued, NewRequest


class RequestLog(Protocol):
    """The part of the request store the operations use."""

    def enqueue(self, new: NewRequest) -> Enqueued: ...

    def list_for_account(
        self, account_id: int, *, limit: int, offset: int, request_id: int | None = None
    ) -> Sequence[Any]: ...


@dataclass(frozen=True)
class OperationContext:
    account: AccountRecord
    settings: Settings
    requests: RequestLog
