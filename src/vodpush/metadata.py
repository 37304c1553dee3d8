"""User metadata for S3 objects (``x-amz-meta-*``): what is accepted, and how values travel.

S3 counts user metadata as the UTF-8 bytes of every key and value, at most 2 KB, and keys
travel as HTTP header names. Values that are not plain printable ASCII are sent as RFC 2047
encoded words (S3's own convention; botocore refuses raw non-ASCII header values).
"""

from __future__ import annotations

import base64
import re
from typing import Any

MAX_METADATA_BYTES = 2048
# RFC 9110 token characters: what an HTTP header name may hold. Used with fullmatch: `$`
# would also accept a trailing newline, which no header may hold.
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_PLAIN_VALUE = re.compile(r"[\x21-\x7e]([\x20-\x7e]*[\x21-\x7e])?")


class MetadataRefused(ValueError):
    pass


def normalize(value: Any) -> dict[str, str]:
    """The metadata object of a request as a dict of strings, or MetadataRefused.

    ``None`` and an empty list (PHP encodes an empty array as ``[]``) mean no metadata.
    """
    if value is None or value == []:
        return {}
    if not isinstance(value, dict):
        raise MetadataRefused("must be an object of key/value pairs")
    result: dict[str, str] = {}
    seen: set[str] = set()
    size = 0
    for key, raw in value.items():
        if not _HEADER_NAME.fullmatch(key):
            raise MetadataRefused(
                f"key {key!r} cannot be an HTTP header name (letters, digits and "
                "!#$%&'*+-.^_`|~ only)"
            )
        if key.lower() in seen:
            raise MetadataRefused(f"key {key!r} is repeated (S3 keys are case-insensitive)")
        seen.add(key.lower())
        if isinstance(raw, bool):
            text = "true" if raw else "false"
        elif isinstance(raw, str | int | float):
            text = str(raw)
        else:
            raise MetadataRefused(f"value of {key!r} must be a string or a number")
        size += len(key.encode()) + len(text.encode())
        result[key] = text
    if size > MAX_METADATA_BYTES:
        raise MetadataRefused(
            f"is {size} bytes; S3 allows at most {MAX_METADATA_BYTES} bytes of keys and values"
        )
    return result


def encode_value(value: str) -> str:
    """A header-safe form of ``value``: as is when plain ASCII, else an RFC 2047 word."""
    if value == "" or _PLAIN_VALUE.fullmatch(value):
        return value
    return "=?UTF-8?B?" + base64.b64encode(value.encode("utf-8")).decode("ascii") + "?="


_ENCODED_WORD = re.compile(r"=\?UTF-8\?B\?([A-Za-z0-9+/=]*)\?=", re.IGNORECASE)


def decode_value(value: str) -> str:
    """The inverse of encode_value, for reading metadata back."""
    match = _ENCODED_WORD.fullmatch(value)
    if match is None:
        return value
    return base64.b64decode(match.group(1)).decode("utf-8")


def for_s3(metadata: dict[str, str]) -> dict[str, str]:
    return {key: encode_value(value) for key, value in metadata.items()}
