"""Reading request fields the way every client sends them (see core.fields), as the API
answers a refusal: an ApiError naming the field (0006 missing, 0007 invalid)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from vodpush.core import fields
from vodpush.protocol.envelope import ApiError, Code


def require(payload: Mapping[str, Any], names: Iterable[str]) -> None:
    """0006 naming every required field that is absent (or null)."""
    try:
        fields.require(payload, names)
    except fields.MissingFields as exc:
        raise ApiError(Code.MISSING_FIELDS, exc.message) from exc


def as_int(value: Any, name: str, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """An integer from a JSON number or a digit string, within 64 bits."""
    try:
        return fields.read_int(value, name, minimum=minimum, maximum=maximum)
    except fields.InvalidField as exc:
        raise ApiError(Code.INVALID_FIELD, exc.message) from exc
