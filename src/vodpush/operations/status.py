"""status: an account's upload requests, newest first (aws.status, `vodpush request list`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from vodpush.config import Settings
from vodpush.core import records
from vodpush.core.fields import InvalidField, read_int
from vodpush.operations.context import OperationContext

DEFAULT_LIMIT = 25
MAX_OFFSET = 2**31
MAX_ID = 2**62


@dataclass(frozen=True)
class StatusQuery:
    """Which of the account's requests: a page (``limit`` from ``offset``, newest first), or
    the one with ``id`` (then the page is ignored)."""

    limit: int = DEFAULT_LIMIT
    offset: int = 0
    id: int | None = None

    @classmethod
    def from_values(cls, values: Mapping[str, Any], settings: Settings) -> StatusQuery:
        """The query from a caller's values (JSON numbers or digit strings, or absent);
        InvalidField naming the first one refused."""
        limit = values.get("limit")
        offset = values.get("offset")
        request_id = values.get("id")
        return cls(
            limit=DEFAULT_LIMIT
            if limit is None
            else read_int(limit, "limit", minimum=1, maximum=settings.status_max_limit),
            offset=0
            if offset is None
            else read_int(offset, "offset", minimum=0, maximum=MAX_OFFSET),
            id=None
            if request_id is None
            else read_int(request_id, "id", minimum=1, maximum=MAX_ID),
        )

    def check(self, settings: Settings) -> None:
        """InvalidField for a query built directly with values out of range."""
        for name, value, low, high in (
            ("limit", self.limit, 1, settings.status_max_limit),
            ("offset", self.offset, 0, MAX_OFFSET),
            ("id", self.id, 1, MAX_ID),
        ):
            if value is not None:
                read_int(value, name, minimum=low, maximum=high)


@dataclass(frozen=True)
class StatusPage:
    """The requests found, as the store hands them out (see records.render)."""

    rows: Sequence[Any]

    def records(self) -> list[dict[str, Any]]:
        """Each request as its aws.status record."""
        return [records.render(row) for row in self.rows]


def status(ctx: OperationContext, query: StatusQuery) -> StatusPage:
    """The account's requests the query names; never another account's."""
    query.check(ctx.settings)
    rows = ctx.requests.list_for_account(
        ctx.account.id, limit=query.limit, offset=query.offset, request_id=query.id
    )
    return StatusPage(rows=rows)


__all__ = ["DEFAULT_LIMIT", "InvalidField", "StatusPage", "StatusQuery", "status"]
