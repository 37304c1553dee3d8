"""Reading request fields the way every client sends them: integers as JSON numbers or as
digit strings (Perl), and naming the field in every error."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from vodpush.protocol.envelope import ApiError, Code


def require(payload: Mapping[str, Any], names: Iterable[str]) -> None:
    """0006 naming every required field that is absent (or null)."""
    missing = [name for name in names if payload.get(name) is None]
    if missing:
        raise ApiError(Code.MISSING_FIELDS, f"missing required field(s): {', '.join(missing)}")


def invalid(name: str, why: str) -> ApiError:
    return ApiError(Code.INVALID_FIELD, f"invalid {name}: {why}")


def as_int(value: Any, name: str, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """An integer from a JSON number or a digit string."""
    if isinstance(value, bool):
        raise invalid(name, "must be an integer, not a boolean")
    if isinstance(value, int):
        number = value
    elif isinstance(value, float) and value.is_integer():
        number = int(value)
    elif isinstance(value, str) and value.strip().lstrip("-").isdigit() and value.isascii():
        number = int(value.strip())
    else:
        raise invalid(name, "must be an integer")
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
    return value
