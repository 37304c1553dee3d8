"""Request signing, shared by the server (verification) and the client (signing).

A request is signed by computing base64(HMAC-SHA256(secret, json_text_without_signature)),
then adding ``signature`` as the last member of the object and encoding again. Every client
language encodes JSON differently, so the verifier works on the exact text the client sent:
it strips the trailing signature member from the raw text, which gives back the bytes that
were signed, and only falls back to re-encoding the parsed object when that fails.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

SIGNATURE_FIELD = "signature"

# The signature member as the last member of the top-level object, as appended by PHP, Perl,
# Ruby and Python clients: `,"signature":"..."}` with optional white space.
_TRAILING_SIGNATURE = re.compile(
    r',\s*"signature"\s*:\s*"(?P<value>(?:[^"\\]|\\.)*)"\s*\}\s*\Z', re.DOTALL
)


class DuplicateKeyError(ValueError):
    """A JSON object repeats a key: ambiguous input that a signature cannot pin down."""


def _refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise DuplicateKeyError(f"duplicate key {key!r} in JSON object")
        obj[key] = value
    return obj


def loads_strict(text: str) -> Any:
    """Parse JSON, refusing duplicate keys at any depth."""
    return json.loads(text, object_pairs_hook=_refuse_duplicates)


def compute_signature(secret: str, message: str | bytes) -> str:
    """base64(HMAC-SHA256(secret, message)), the value of the ``signature`` member."""
    if isinstance(message, str):
        message = message.encode("utf-8")
    digest = hmac.new(secret.encode("utf-8"), message, hashlib.sha256).digest()
    return base64.b64encode(digest).decode("ascii")


def _decode_signature(value: str) -> bytes | None:
    """Decode a base64 signature, tolerating missing padding (Perl pads by hand, or not)."""
    cleaned = value.strip().replace("\n", "")
    cleaned += "=" * (-len(cleaned) % 4)
    try:
        raw = base64.b64decode(cleaned, validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw if len(raw) == hashlib.sha256().digest_size else None


def php_json_encode(obj: Any) -> str:
    """What PHP's ``json_encode`` produces: compact, ASCII only, ``/`` escaped as ``\\/``."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=True).replace("/", "\\/")


def _reencodings(obj: dict[str, Any]) -> Iterator[str]:
    """Encodings of the unsigned object that known clients produce, for the fallback path."""
    yield php_json_encode(obj)
    yield json.dumps(obj, separators=(",", ":"), ensure_ascii=False)  # Ruby, Perl, JS
    yield json.dumps(obj, separators=(",", ":"), ensure_ascii=True)
    yield json.dumps(obj)  # Python json.dumps defaults
    yield json.dumps(obj, ensure_ascii=False)


@dataclass(frozen=True)
class SignedRequest:
    """A request whose raw text has been split into the signed part and the signature."""

    payload: dict[str, Any]  # the parsed signed text (without the signature)
    signature: str  # as sent by the client
    signed_text: str | None  # the raw text minus its trailing signature member, if found

    def candidates(self) -> Iterator[str]:
        """Texts that may be the bytes that were signed, best first; the re-encodings are
        only computed when the raw text did not verify."""
        if self.signed_text is not None:
            yield self.signed_text
        yield from _reencodings(self.payload)


class MalformedRequest(ValueError):
    """The ``json`` field is not a JSON object we can read."""


class MissingSignature(MalformedRequest):
    """The JSON object has no ``signature`` string member."""


def split_signed_request(raw: str) -> SignedRequest:
    """Separate the signature from the text it signs.

    Raises MalformedRequest for text that is not a JSON object (or repeats a key) and
    MissingSignature when no signature member is there.
    """
    try:
        full = loads_strict(raw)
    except DuplicateKeyError as exc:
        raise MalformedRequest(str(exc)) from exc
    except (ValueError, RecursionError) as exc:
        raise MalformedRequest("the json field is not valid JSON") from exc
    if not isinstance(full, dict):
        raise MalformedRequest("the json field must hold a JSON object")
    signature = full.pop(SIGNATURE_FIELD, None)
    if not isinstance(signature, str) or not signature:
        raise MissingSignature("signature is missing")

    match = _TRAILING_SIGNATURE.search(raw)
    if match is not None:
        # Put back the closing brace the pattern consumed.
        signed_text = raw[: match.start()] + "}"
        try:
            payload = loads_strict(signed_text)
        except ValueError:
            payload = None
        # The stripped text must be the same object as the full one minus its signature;
        # otherwise the regex matched something else and we must not act on that text.
        if isinstance(payload, dict) and payload == full:
            return SignedRequest(payload=payload, signature=signature, signed_text=signed_text)
    return SignedRequest(payload=full, signature=signature, signed_text=None)


def verify(signed: SignedRequest, secret: str) -> bool:
    """True when the signature is the HMAC of one of the candidate texts, in constant time
    for each candidate."""
    expected = _decode_signature(signed.signature)
    # Compare against a dummy when the signature does not even decode, so that the time
    # taken does not tell a malformed signature from a wrong one.
    probe = expected if expected is not None else b"\0" * hashlib.sha256().digest_size
    key = secret.encode("utf-8")
    seen: set[str] = set()
    for text in signed.candidates():
        if text in seen:
            continue
        seen.add(text)
        digest = hmac.new(key, text.encode("utf-8"), hashlib.sha256).digest()
        # Each comparison is constant-time; stopping at a match only tells which encoding
        # the client used, nothing about the secret.
        if hmac.compare_digest(digest, probe) and expected is not None:
            return True
    return False


def sign_request(payload: dict[str, Any], secret: str) -> str:
    """Encode and sign a request the way the PHP reference client does; returns the text of
    the ``json`` form field (signature last)."""
    unsigned = {k: v for k, v in payload.items() if k != SIGNATURE_FIELD}
    text = php_json_encode(unsigned)
    signature = compute_signature(secret, text)
    return php_json_encode({**unsigned, SIGNATURE_FIELD: signature})
