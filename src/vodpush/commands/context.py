from __future__ import annotations

from dataclasses import dataclass

from vodpush.config import Settings
from vodpush.core.accounts import AccountRecord
from vodpush.core.ports import RequestStorePort
from vodpush.core.preflight import PreflightPort
from vodpush.operations import OperationContext


@dataclass(frozen=True)
class CommandContext:
    """What a command may use: the caller's account, the request's signature, the stores."""

    account: AccountRecord
    signature: str
    settings: Settings
    requests: RequestStorePort
    preflight: PreflightPort | None = None

    def operation(self) -> OperationContext:
        """The context the operations run in (the signature is the adapter's business)."""
        return OperationContext(
            account=self.account,
            settings=self.settings,
            requests=self.requests,
            preflight=self.preflight,
        )
