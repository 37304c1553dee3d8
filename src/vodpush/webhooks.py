"""Standard Webhooks (https://www.standardwebhooks.com): the server's signing side.

The HMAC, the key forms (the API secret, or an account's own ``whsec_...`` webhook secret)
and verification live once, in the client distribution (:mod:`vodpush_client.webhooks`),
which receivers install; they are re-exported here. What only a sender needs is here: the
three headers of a delivery (:func:`sign`) and a fresh delivery id (:func:`new_message_id`).
"""

from __future__ import annotations

import math
import re
import uuid

from vodpush_client.webhooks import (
    HEADER_ID,
    HEADER_SIGNATURE,
    HEADER_TIMESTAMP,
    WebhookVerificationError,
    signature,
    standard_webhooks_secret,
    verify,
)

__all__ = [
    "HEADER_ID",
    "HEADER_SIGNATURE",
    "HEADER_TIMESTAMP",
    "WebhookVerificationError",
    "new_message_id",
    "sign",
    "signature",
    "standard_webhooks_secret",
    "verify",
]

# A message id travels in an HTTP header and inside the signed text: keep it to visible
# ASCII without spaces so it can neither split headers nor be read two ways.
_MESSAGE_ID = re.compile(r"[!-~]{1,256}")


def new_message_id() -> str:
    """A fresh delivery id; every retry of one delivery must reuse it."""
    return f"msg_{uuid.uuid4().hex}"


def sign(api_secret: str, msg_id: str, timestamp: float, body: bytes) -> dict[str, str]:
    """The three Standard Webhooks headers for ``body`` sent at ``timestamp`` (unix s)."""
    if not _MESSAGE_ID.fullmatch(msg_id):
        raise ValueError("msg_id must be 1-256 visible ASCII characters without spaces")
    if not math.isfinite(timestamp) or timestamp < 0:
        raise ValueError("timestamp must be a non-negative number of unix seconds")
    seconds = math.floor(timestamp)
    return {
        HEADER_ID: msg_id,
        HEADER_TIMESTAMP: str(seconds),
        HEADER_SIGNATURE: signature(api_secret, msg_id, seconds, body),
    }
