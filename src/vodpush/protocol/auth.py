"""Authenticating a signed request: api_key and cdn, timestamp window, signature, account
state. Each failure maps to its API code."""

from __future__ import annotations

import time
from typing import Any, Protocol

from vodpush.persistence.accounts import AccountRecord
from vodpush.protocol.envelope import ApiError, Code
from vodpush.protocol.fields import as_int, require
from vodpush.protocol.signing import SignedRequest, verify

ENVELOPE_FIELDS = ("command", "cdn", "api_key", "timestamp")


class AccountLookup(Protocol):
    def by_api_key(self, api_key: str) -> AccountRecord | None: ...

    def api_secret(self, account: AccountRecord) -> str: ...


def authenticate(
    signed: SignedRequest,
    accounts: AccountLookup,
    *,
    window: int,
    now: float | None = None,
) -> AccountRecord:
    payload: dict[str, Any] = signed.payload
    require(payload, ENVELOPE_FIELDS)
    cdn = as_int(payload["cdn"], "cdn")
    timestamp = as_int(payload["timestamp"], "timestamp")
    api_key = payload["api_key"]
    account = accounts.by_api_key(api_key) if isinstance(api_key, str) else None
    if account is None or account.cdn != cdn:
        raise ApiError(
            Code.CDN_AUTH_FAILED, "CDN authorization failed: unknown api_key for this cdn"
        )
    now = time.time() if now is None else now
    if abs(now - timestamp) > window:
        raise ApiError(
            Code.BAD_TIMESTAMP,
            f"timestamp is outside the valid range of ±{window} s of server time "
            f"({int(now)}); send the current UTC unix time",
        )
    if not verify(signed, accounts.api_secret(account)):
        raise ApiError(
            Code.BAD_SIGNATURE,
            "HMAC-SHA256 signature does not match; check your API secret",
        )
    if not account.enabled:
        raise ApiError(Code.UNAUTHORIZED, "unauthorized access: this account is disabled")
    return account
