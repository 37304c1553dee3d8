"""One check of a whole parsed request, before any field of it is read.

Whatever a client sends must be something every later step can hold: the HMAC (UTF-8 bytes),
the database (PostgreSQL refuses NUL in text), the log (UTF-8 lines), Python's own numbers
(no infinities, no ints past the digit limit) and a recursive walk (no deep nesting). So
every key and string must be valid Unicode scalar values without NUL, every number finite and
within 64 bits, keys short and free of control characters, nesting shallow and the number of
values bounded. The failure names the field by its path (``metadata.title``, ``limit``).
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from vodpush.core.fields import MAX_INT, MAX_INT_DIGITS, InvalidField
from vodpush.core.fields import check_text as _check_text

MAX_DEPTH = 16  # the request object is depth 1, its metadata depth 2
MAX_VALUES = 10_000
MAX_KEY_CHARS = 256
# Integers of more than MAX_INT_DIGITS digits are parsed as a marker, refused with the
# field's name (Python's int() would raise past 4300 digits, and work quadratic before).

_PLAIN_KEY = re.compile(r"[A-Za-z0-9_.\-]{1,64}\Z")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class InvalidPayload(ValueError):
    """A value of the request that no command may be given; names the field."""

    def __init__(self, field: str, why: str) -> None:
        super().__init__(f"invalid {field}: {why}")
        self.field = field
        self.why = why


class OverlongNumber:
    """What the parser returns for an integer literal with too many digits."""

    def __init__(self, digits: int) -> None:
        self.digits = digits


def parse_int(text: str) -> int | OverlongNumber:
    """``json.loads(parse_int=...)``: integers, but never a huge one."""
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        return OverlongNumber(len(text))
    return int(text)


def field_name(path: str, key: str) -> str:
    """The path of ``key`` inside ``path``, readable and bounded whatever the key holds."""
    shown = key if _PLAIN_KEY.match(key) else _quoted(key)
    return f"{path}.{shown}" if path else shown


def _quoted(text: str, limit: int = 40) -> str:
    # ASCII-escaped JSON: NUL, surrogates and control characters stay visible and harmless.
    cut = text[:limit]
    return json.dumps(cut, ensure_ascii=True) + ("..." if len(text) > limit else "")


def check_text(text: str, field: str) -> None:
    """InvalidPayload unless ``text`` is valid Unicode scalar values without NUL."""
    try:
        _check_text(text, field)
    except InvalidField as exc:
        raise InvalidPayload(exc.field, exc.why) from exc


def check_payload(obj: dict[str, Any]) -> None:
    """Raise InvalidPayload for the first value (in document order) no command may get."""
    count = 1
    # (value, field path, depth); reversed pushes keep document order.
    stack: list[tuple[Any, str, int]] = [(obj, "", 1)]
    while stack:
        value, path, depth = stack.pop()
        field = path or "json"
        if value is None or isinstance(value, bool):
            continue
        if isinstance(value, str):
            check_text(value, field)
        elif isinstance(value, int):
            if abs(value) > MAX_INT:
                raise InvalidPayload(field, "is out of range (at most 64-bit integers)")
        elif isinstance(value, float):
            if not math.isfinite(value):
                raise InvalidPayload(field, "must be a finite number")
        elif isinstance(value, OverlongNumber):
            raise InvalidPayload(field, f"is a number of {value.digits} digits; too long")
        elif isinstance(value, dict | list):
            if depth > MAX_DEPTH:
                raise InvalidPayload(field, f"is nested deeper than {MAX_DEPTH} levels")
            count += len(value)  # counted before any of them is looked at
            if count > MAX_VALUES:
                raise InvalidPayload("json", f"holds more than {MAX_VALUES} values")
            if isinstance(value, list):
                items = [(item, f"{field}[{i}]") for i, item in enumerate(value)]
            else:
                items = []
                for key in value:
                    _check_key(key, path)
                    items.append((value[key], field_name(path, key)))
            stack.extend((item, name, depth + 1) for item, name in reversed(items))
        else:  # the parser produces nothing else; refuse rather than guess
            raise InvalidPayload(field, f"has an unsupported type {type(value).__name__}")


def _check_key(key: str, path: str) -> None:
    field = f"key {_quoted(key)} in {path or 'the request'}"
    if len(key) > MAX_KEY_CHARS:
        raise InvalidPayload(field, f"is longer than {MAX_KEY_CHARS} characters")
    check_text(key, field)
    if _CONTROL.search(key):
        raise InvalidPayload(field, "contains a control character")
