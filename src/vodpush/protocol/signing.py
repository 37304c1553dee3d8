"""Verifying signed requests (the server's side; signing itself, the HMAC and PHP's JSON
encoding live once, in the client distribution: :mod:`vodpush_client.signing`).

A request is signed by computing base64(HMAC-SHA256(secret, json_text_without_signature)),
then adding ``signature`` as the last member of the object and encoding again. Every client
language encodes JSON differently, so the verifier works on the exact text the client sent:
it strips the trailing signature member from the raw text, which gives back the bytes that
were signed, and only falls back to re-encoding the parsed object when that fails. The
fallback costs a few encodings of the whole object before any secret is proven, so it is
bounded by size (``signature_fallback_max_chars``) and never runs on the event loop.

A signature has one meaning, its 32-byte digest, and one canonical spelling (standard base64,
44 characters): replay detection keys on that, whatever variant of it the client sent.
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
from functools import cached_property
from typing import Any

from vodpush.protocol.payload import MAX_INT_DIGITS, check_payload, field_name, parse_int
from vodpush_client.signing import (
    SIGNATURE_FIELD,
    compute_signature,
    hmac_sha256,
    php_json_encode,
    sign_request,
)

__all__ = [
    "DEFAULT_FALLBACK_MAX_CHARS",
    "DIGEST_SIZE",
    "MAX_SIGNATURE_CHARS",
    "SIGNATURE_FIELD",
    "DuplicateKeyError",
    "FallbackDeferred",
    "MalformedRequest",
    "MissingSignature",
    "SignedRequest",
    "compute_signature",
    "decode_signature",
    "loads_strict",
    "php_json_encode",
    "sign_request",
    "split_signed_request",
    "verify",
]

DIGEST_SIZE = hashlib.sha256().digest_size
# A signature is 44 characters; a little white space is tolerated, anything this long is not
# a signature and is refused before any work (nor can it reach a database column).
MAX_SIGNATURE_CHARS = 128
# Re-encoding fallbacks are tried only for request texts up to this size (the setting
# ``signature_fallback_max_chars`` overrides it).
DEFAULT_FALLBACK_MAX_CHARS = 65_536

# The signature member as the last member of the top-level object, as appended by PHP, Perl,
# Ruby and Python clients: `,"signature":"..."}` with optional white space.
_TRAILING_SIGNATURE = re.compile(
    r',\s*"signature"\s*:\s*"(?P<value>(?:[^"\\]|\\.)*)"\s*\}\s*\Z', re.DOTALL
)
# A run of digits longer than any 64-bit integer: somewhere in the text, maybe a number.
_LONG_DIGITS = re.compile(f"[0-9]{{{MAX_INT_DIGITS + 1},}}")


class DuplicateKeyError(ValueError):
    """A JSON object repeats a key: ambiguous input that a signature cannot pin down."""


def _refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise DuplicateKeyError(f"duplicate key {field_name('', key)} in JSON object")
        obj[key] = value
    return obj


def loads_strict(text: str) -> Any:
    """Parse JSON, refusing duplicate keys at any depth. An integer literal with more digits
    than a 64-bit integer has comes back as a marker that check_payload refuses by name."""
    if _LONG_DIGITS.search(text) is None:  # the usual case: no per-number callback
        return json.loads(text, object_pairs_hook=_refuse_duplicates)
    return json.loads(text, object_pairs_hook=_refuse_duplicates, parse_int=parse_int)


def decode_signature(value: str) -> bytes | None:
    """The digest a signature names, or None when it is not one.

    Accepts what real encoders write: standard base64, padded or not (Perl's Digest::SHA
    leaves the padding off and clients pad by hand, or not), with surrounding white space
    or line breaks (Ruby's Base64.encode64 ends with one). Refuses anything longer than
    MAX_SIGNATURE_CHARS before any work, and non-canonical spellings of the last character
    (no encoder writes them; accepting them would give one digest several spellings).
    """
    if len(value) > MAX_SIGNATURE_CHARS:
        return None
    cleaned = value.strip().replace("\n", "")
    padded = cleaned + "=" * (-len(cleaned) % 4)
    try:
        raw = base64.b64decode(padded, validate=True)
    except (binascii.Error, ValueError):
        return None
    if len(raw) != DIGEST_SIZE:
        return None
    canonical = base64.b64encode(raw).decode("ascii")
    return raw if cleaned in (canonical, canonical.rstrip("=")) else None


def _reencodings(obj: dict[str, Any]) -> Iterator[str]:
    """Encodings of the unsigned object that known clients produce, for the fallback path."""
    yield php_json_encode(obj)
    yield json.dumps(obj, separators=(",", ":"), ensure_ascii=False)  # Ruby, Perl, JS
    yield json.dumps(obj, separators=(",", ":"), ensure_ascii=True)
    yield json.dumps(obj)  # Python json.dumps defaults
    yield json.dumps(obj, ensure_ascii=False)


class FallbackDeferred(Exception):
    """verify() would need the re-encoding fallback where it must not run (the event loop);
    the caller runs the request again in a thread."""


@dataclass(frozen=True)
class SignedRequest:
    """A request whose raw text has been split into the signed part and the signature."""

    payload: dict[str, Any]  # the parsed signed text (without the signature)
    signature: str  # as sent by the client
    signed_text: str | None  # the raw text minus its trailing signature member, if found
    size: int  # characters of the raw text: bounds the fallback

    @cached_property
    def digest(self) -> bytes | None:
        """The 32-byte digest the signature names, or None if it names none."""
        return decode_signature(self.signature)

    @property
    def canonical_signature(self) -> str | None:
        """The one spelling of the digest (44 characters): what replay detection keys on."""
        digest = self.digest
        return None if digest is None else base64.b64encode(digest).decode("ascii")

    def fallback_allowed(self, max_chars: int) -> bool:
        return self.size <= max_chars


class MalformedRequest(ValueError):
    """The ``json`` field is not a JSON object we can read."""


class MissingSignature(MalformedRequest):
    """The JSON object has no ``signature`` string member."""


def split_signed_request(raw: str) -> SignedRequest:
    """Separate the signature from the text it signs.

    Raises MalformedRequest for text that is not a JSON object (or repeats a key),
    payload.InvalidPayload (naming the field) for a value no command may get, and
    MissingSignature when no signature member is there.
    """
    try:
        full = loads_strict(raw)
    except DuplicateKeyError as exc:
        raise MalformedRequest(str(exc)) from exc
    except RecursionError as exc:
        raise MalformedRequest("the json field is nested too deeply") from exc
    except ValueError as exc:
        raise MalformedRequest("the json field is not valid JSON") from exc
    if not isinstance(full, dict):
        raise MalformedRequest("the json field must hold a JSON object")
    # Before anything else reads it (the HMAC, the database, the log).
    check_payload(full)
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
            return SignedRequest(
                payload=payload, signature=signature, signed_text=signed_text, size=len(raw)
            )
    return SignedRequest(payload=full, signature=signature, signed_text=None, size=len(raw))


def verify(
    signed: SignedRequest,
    secret: str,
    *,
    fallback_max_chars: int = DEFAULT_FALLBACK_MAX_CHARS,
    inline: bool = False,
) -> bool:
    """True when the signature is the HMAC of one of the candidate texts, in constant time
    for each candidate. With ``inline`` (on the event loop) the re-encoding fallback is not
    run: FallbackDeferred is raised instead when it would be."""
    expected = signed.digest
    if expected is None:
        return False

    def signs(text: str) -> bool:
        digest = hmac_sha256(secret, text)
        # Each comparison is constant-time; stopping at a match only tells which encoding
        # the client used, nothing about the secret.
        return hmac.compare_digest(digest, expected)

    if signed.signed_text is not None and signs(signed.signed_text):
        return True
    if not signed.fallback_allowed(fallback_max_chars):
        return False
    if inline:
        raise FallbackDeferred
    seen = {signed.signed_text}
    for text in _reencodings(signed.payload):
        if text not in seen:
            seen.add(text)
            if signs(text):
                return True
    return False
