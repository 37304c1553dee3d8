"""Verifying the callbacks a vodpush server sends: Standard Webhooks
(https://www.standardwebhooks.com), keyed by the account's API secret.

The server signs with :func:`signature` from here too (``vodpush.webhooks.sign``), so both
sides compute the one HMAC. Receivers call :func:`verify`, or give any Standard Webhooks
library :func:`standard_webhooks_secret`::

    from standardwebhooks.webhooks import Webhook
    Webhook(standard_webhooks_secret(api_secret)).verify(body, headers)

The HMAC key is the UTF-8 encoding of the API secret string, so the receiver needs nothing
beyond the credentials it already uses to call the API. An account may instead have its
own webhook secret, given in the ``whsec_...`` form: every function here taking
``api_secret`` takes that form too (its key is the base64-decoded part), so a webhook relay
can verify callbacks without API access.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import time
from collections.abc import Mapping

__all__ = [
    "HEADER_ID",
    "HEADER_SIGNATURE",
    "HEADER_TIMESTAMP",
    "WebhookVerificationError",
    "signature",
    "standard_webhooks_secret",
    "verify",
    "webhook_key",
]

HEADER_ID = "webhook-id"
HEADER_TIMESTAMP = "webhook-timestamp"
HEADER_SIGNATURE = "webhook-signature"

SIGNATURE_VERSION = "v1"
_TIMESTAMP = re.compile(r"[0-9]{1,12}")
_WHSEC = "whsec_"


class WebhookVerificationError(Exception):
    """The webhook could not be verified; the message says why."""


def webhook_key(api_secret: str) -> bytes:
    """The HMAC key of an API secret (its UTF-8 bytes) or of a ``whsec_`` webhook secret
    (its base64-decoded part). ValueError for an empty one or bad base64."""
    if not api_secret:
        raise ValueError("the API secret used as webhook key may not be empty")
    # API secrets are hex, so a whsec_ prefix can only be a webhook secret's.
    if api_secret.startswith(_WHSEC):
        try:
            key = base64.b64decode(api_secret[len(_WHSEC) :], validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ValueError("a whsec_ webhook secret must be followed by base64") from exc
        if not key:
            raise ValueError("the webhook secret may not be empty")
        return key
    return api_secret.encode("utf-8")


def standard_webhooks_secret(api_secret: str) -> str:
    """The ``whsec_...`` form of an API secret (a webhook secret is returned as it is), for
    Standard Webhooks libraries."""
    return _WHSEC + base64.b64encode(webhook_key(api_secret)).decode("ascii")


def signature(api_secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """``v1,<base64 HMAC-SHA256(key, "{id}.{timestamp}.{body}")>``."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(webhook_key(api_secret), signed, hashlib.sha256).digest()
    return f"{SIGNATURE_VERSION},{base64.b64encode(digest).decode('ascii')}"


def verify(
    api_secret: str,
    headers: Mapping[str, str],
    body: bytes,
    *,
    tolerance: int = 300,
    now: float | None = None,
) -> None:
    """Check a received webhook; raise :class:`WebhookVerificationError` if it fails.

    ``headers`` may be any mapping (a dict, httpx or Starlette headers, http.server's
    message); names are matched case-insensitively. ``body`` must be the raw bytes as
    received, not re-encoded JSON. The timestamp must lie within ``tolerance`` seconds of
    ``now`` (replay protection).
    """
    lowered = {name.lower(): value for name, value in headers.items()}
    missing = [h for h in (HEADER_ID, HEADER_TIMESTAMP, HEADER_SIGNATURE) if not lowered.get(h)]
    if missing:
        raise WebhookVerificationError(f"missing header(s): {', '.join(missing)}")
    msg_id = lowered[HEADER_ID]
    timestamp_text = lowered[HEADER_TIMESTAMP].strip()

    if not _TIMESTAMP.fullmatch(timestamp_text):
        raise WebhookVerificationError(
            f"{HEADER_TIMESTAMP} must be an integer number of unix seconds"
        )
    timestamp = int(timestamp_text)
    current = time.time() if now is None else now
    if timestamp < current - tolerance:
        raise WebhookVerificationError(
            f"timestamp too old: {current - timestamp:.0f} s ago, tolerance is {tolerance} s"
        )
    if timestamp > current + tolerance:
        raise WebhookVerificationError(
            f"timestamp too new: {timestamp - current:.0f} s ahead, tolerance is {tolerance} s"
        )

    expected = base64.b64decode(signature(api_secret, msg_id, timestamp, body).split(",", 1)[1])
    # Senders may list several signatures (e.g. during key rotation); any v1 match is enough.
    # Entries of other versions or malformed entries are skipped, never fatal.
    matched = False
    for entry in lowered[HEADER_SIGNATURE].split():
        version, _, encoded = entry.partition(",")
        if version != SIGNATURE_VERSION:
            continue
        try:
            candidate = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            continue
        # Constant-time, and no early exit, so timing says nothing about which entry matched.
        matched |= hmac.compare_digest(expected, candidate)
    if not matched:
        raise WebhookVerificationError("no matching signature (wrong secret or altered body?)")
