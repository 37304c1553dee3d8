"""Authenticating a signed request: api_key and cdn, timestamp window, signature, account
state. Each failure maps to its API code."""

from __future__ import annotations

import time
from typing import Any, Protocol

from vodpush.core.accounts import AccountRecord
from vodpush.protocol.envelope import ApiError, Code
from vodpush.protocol.fields import as_int, require
from vodpush.protocol.signing import DEFAULT_FALLBACK_MAX_CHARS, SignedRequest, verify

ENVELOPE_FIELDS = ("command", "cdn", "api_key", "timestamp")
MAX_API_KEY_CHARS = 64  # the column's size; a longer key is unknown without asking


class AccountLookup(Protocol):
    def by_api_key(self, api_key: str) -> AccountRecord | None: ...

    def api_secret(self, account: AccountRecord) -> str: ...


def authenticate(
    signed: SignedRequest,
    accounts: AccountLookup,
    *,
    window: int,
    now: float | None = None,
    fallback_max_chars: int = DEFAULT_FALLBACK_MAX_CHARS,
    inline: bool = False,
) -> AccountRecord:
    """The account that signed ``signed``, or ApiError. With ``inline``, raises
    FallbackDeferred where verifying would need the re-encoding fallback."""
    payload: dict[str, Any] = signed.payload
    require(payload, ENVELOPE_FIELDS)
    cdn = as_int(payload["cdn"], "cdn")
    timestamp = as_int(payload["timestamp"], "timestamp")
    if signed.digest is None:
        # Checked before any lookup: a signature that names no digest cannot match.
        raise ApiError(
            Code.BAD_SIGNATURE,
            "signature is not the base64 of an HMAC-SHA256 digest (44 characters)",
        )
    api_key = payload["api_key"]
    known = isinstance(api_key, str) and len(api_key) <= MAX_API_KEY_CHARS
    account = accounts.by_api_key(api_key) if known else None
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
    secret = accounts.api_secret(account)
    if not verify(signed, secret, fallback_max_chars=fallback_max_chars, inline=inline):
        hint = ""
        if signed.signed_text is None and not signed.fallback_allowed(fallback_max_chars):
            hint = (
                f" (a request over {fallback_max_chars} characters must carry the signature "
                "as the last member)"
            )
        raise ApiError(
            Code.BAD_SIGNATURE,
            "HMAC-SHA256 signature does not match; check your API secret" + hint,
        )
    if not account.enabled:
        raise ApiError(Code.UNAUTHORIZED, "unauthorized access: this account is disabled")
    return account
