"""Reading request fields the way every client sends them: integers as JSON numbers or as
digit strings (Perl), and naming the field in every error."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from vodpush.protocol.envelope import ApiError, Code
from vodpush.protocol.payload import MAX_INT, MAX_INT_DIGITS, InvalidPayload, check_text

# A digit string as Perl sends an integer: ASCII digits, an optional minus, white space
# around; nothing int() would read differently ("--1", "1_000", full-width digits).
_DIGITS = re.compile(rf"\s*(-?[0-9]{{1,{MAX_INT_DIGITS}}})\s*", re.ASCII)


def require(payload: Mapping[str, Any], names: Iterable[str]) -> None:
    """0006 naming every required field that is absent (or null)."""
    missing = [name for name in names if payload.get(name) is None]
    if missing:
        raise ApiError(Code.MISSING_FIELDS, f"missing required field(s): {', '.join(missing)}")


def invalid(name: str, why: str) -> ApiError:
    return ApiError(Code.INVALID_FIELD, f"invalid {name}: {why}")


def as_int(value: Any, name: str, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """An integer from a JSON number or a digit string, within 64 bits."""
    if isinstance(value, bool):
        raise invalid(name, "must be an integer, not a boolean")
    if isinstance(value, int):
        number = value
    elif isinstance(value, float) and value.is_integer():
        number = int(value)
    elif isinstance(value, str) and (match := _DIGITS.fullmatch(value)) is not None:
        number = int(match.group(1))
    else:
        raise invalid(name, "must be an integer")
    if abs(number) > MAX_INT:
        raise invalid(name, "is out of range")
    if minimum is not None and number < minimum:
        raise invalid(name, f"must be at least {minimum}")
    if maximum is not None and number > maximum:
        raise invalid(name, f"must be at most {maximum}")
    return number


def as_str(value: Any, name: str, *, max_length: int = 4096, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise invalid(name, "must be a string")
    if not value and not allow_empty:
        raise invalid(name, "must not be empty")
    if len(value) > max_length:
        raise invalid(name, f"must be at most {max_length} characters")
    try:  # NUL, lone surrogates (the whole request was checked; a field reader checks too)
        check_text(value, name)
    except InvalidPayload as exc:
        raise invalid(name, exc.why) from exc
    return value
