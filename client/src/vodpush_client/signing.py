"""Request signing: the one implementation, used by the client to sign and by the server
(``vodpush.protocol.signing``) to verify.

A request is the JSON object of its fields with ``signature`` added as its last member:
base64(HMAC-SHA256(api_secret, the JSON text without the signature)). The text is encoded as
PHP's ``json_encode`` does (the reference client is PHP), so a server that only re-encodes
in PHP's way accepts it too.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any

__all__ = [
    "SIGNATURE_FIELD",
    "compute_signature",
    "hmac_sha256",
    "php_json_encode",
    "sign_request",
]

SIGNATURE_FIELD = "signature"


def hmac_sha256(secret: str, message: str | bytes) -> bytes:
    """HMAC-SHA256 of ``message`` (UTF-8 when text) keyed by the UTF-8 bytes of ``secret``:
    the digest a signature names."""
    if isinstance(message, str):
        message = message.encode("utf-8")
    return hmac.new(secret.encode("utf-8"), message, hashlib.sha256).digest()


def compute_signature(secret: str, message: str | bytes) -> str:
    """base64(HMAC-SHA256(secret, message)), the value of the ``signature`` member."""
    return base64.b64encode(hmac_sha256(secret, message)).decode("ascii")


def php_json_encode(obj: Any) -> str:
    """What PHP's ``json_encode`` produces: compact, ASCII only, ``/`` escaped as ``\\/``."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=True).replace("/", "\\/")


def sign_request(payload: dict[str, Any], secret: str) -> str:
    """Encode and sign a request the way the PHP reference client does; returns the text of
    the ``json`` form field (signature last)."""
    unsigned = {k: v for k, v in payload.items() if k != SIGNATURE_FIELD}
    text = php_json_encode(unsigned)
    signature = compute_signature(secret, text)
    return php_json_encode({**unsigned, SIGNATURE_FIELD: signature})
