"""Reading a caller's values, naming the field in every refusal: integers as JSON numbers or
as digit strings (Perl), strings of valid Unicode without NUL. The refusals are plain typed
errors; an adapter turns them into its own answer (the API's codes 0006 and 0007)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

MAX_INT = 2**63 - 1
# More digits than any 64-bit integer has.
MAX_INT_DIGITS = 20

# A digit string as Perl sends an integer: ASCII digits, an optional minus, white space
# around; nothing int() would read differently ("--1", "1_000", full-width digits).
_DIGITS = re.compile(rf"\s*(-?[0-9]{{1,{MAX_INT_DIGITS}}})\s*", re.ASCII)


class Refused(Exception):
    """An operation refused its arguments or its caller; ``message`` is what the caller is
    told."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class MissingFields(Refused):
    """Required fields that are absent (or null), all of them, in the order asked."""

    def __init__(self, names: Iterable[str]) -> None:
        self.names = tuple(names)
        super().__init__(f"missing required field(s): {', '.join(self.names)}")


class InvalidField(Refused):
    """A field's value that is refused, and why."""

    def __init__(self, field: str, why: str) -> None:
        self.field = field
        self.why = why
        super().__init__(f"invalid {field}: {why}")


def quoted(text: str, limit: int = 64) -> str:
    """A caller's text to name back in a message: at most ``limit`` characters of it (then
    "..."), quoted and escaped as a Python literal, so that control characters, quotes,
    bidirectional overrides and lone surrogates show as escapes and never act."""
    shown = text if len(text) <= limit else text[:limit] + "..."
    return repr(shown)


def require(values: Mapping[str, Any], names: Iterable[str]) -> None:
    """MissingFields naming every required field that is absent (or null)."""
    missing = [name for name in names if values.get(name) is None]
    if missing:
        raise MissingFields(missing)


def check_text(text: str, field: str) -> None:
    """InvalidField unless ``text`` is valid Unicode scalar values without NUL."""
    if "\x00" in text:
        raise InvalidField(field, "contains a NUL character")
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidField(
                field, "is not valid Unicode (a lone surrogate such as \\ud800)"
            ) from exc


def read_int(
    value: Any, name: str, *, minimum: int | None = None, maximum: int | None = None
) -> int:
    """An integer from a JSON number or a digit string, within 64 bits."""
    if isinstance(value, bool):
        raise InvalidField(name, "must be an integer, not a boolean")
    if isinstance(value, int):
        number = value
    elif isinstance(value, float) and value.is_integer():
        number = int(value)
    elif isinstance(value, str) and (match := _DIGITS.fullmatch(value)) is not None:
        number = int(match.group(1))
    else:
        raise InvalidField(name, "must be an integer")
    if abs(number) > MAX_INT:
        raise InvalidField(name, "is out of range")
    if minimum is not None and number < minimum:
        raise InvalidField(name, f"must be at least {minimum}")
    if maximum is not None and number > maximum:
        raise InvalidField(name, f"must be at most {maximum}")
    return number


def read_str(value: Any, name: str, *, max_length: int = 4096, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise InvalidField(name, "must be a string")
    if not value and not allow_empty:
        raise InvalidField(name, "must not be empty")
    if len(value) > max_length:
        raise InvalidField(name, f"must be at most {max_length} characters")
    check_text(value, name)  # NUL, lone surrogates (the whole request was checked too)
    return value
