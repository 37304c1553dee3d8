"""status: an account's upload requests, newest first (aws.status, `vodpush request list`):
the reference API's page (limit, offset, id), and beyond it filters (state, created_from,
created_to, bucket, path_prefix), keyset paging (after_id) and the count of what the
filters match (total)."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta
from typing import Any

from vodpush import sestore
from vodpush.config import Settings
from vodpush.core import records
from vodpush.core.fields import InvalidField, quoted, read_int, read_str
from vodpush.core.filters import RequestFilter
from vodpush.core.requests import State
from vodpush.operations.context import OperationContext
from vodpush.operations.upload import validate_bucket

DEFAULT_LIMIT = 25
MAX_OFFSET = 2**31
MAX_ID = 2**62
# The states a request can be in, in the order of its life; `state` names some of them.
STATES = tuple(state.value for state in State)
# A list of states longer than there are states is a mistake (or an attack), not a filter.
MAX_STATES = len(STATES)
# The time format of the records' `created` (and of created_from/created_to), UTC.
TIME_FORMAT = "%Y-%m-%d %H:%M:%S"
_TIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2} [0-9]{2}:[0-9]{2}:[0-9]{2}", re.ASCII)
# 9999-12-31 23:59:59 UTC: the last second a datetime holds.
MAX_UNIX_TIME = 253_402_300_799
_TIME_RULE = "must be a time as 'YYYY-MM-DD HH:MM:SS' (UTC) or unix seconds"
# The fields beyond the reference API's: a query that uses one is answered with `total`.
EXTENDED_FIELDS = ("state", "created_from", "created_to", "bucket", "path_prefix", "after_id")


def read_states(value: Any) -> tuple[str, ...]:
    """One state or a list of them, as a sorted tuple without repeats."""
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list | tuple) or not all(isinstance(n, str) for n in names):
        raise InvalidField("state", "must be a state or a list of states")
    if not names:
        raise InvalidField("state", "must name at least one state")
    if len(names) > MAX_STATES:
        raise InvalidField("state", f"must list at most {MAX_STATES} states")
    for name in names:
        if name not in STATES:
            hint = "; send a list for several" if "," in name else ""
            raise InvalidField("state", f"{quoted(name)} is not one of {', '.join(STATES)}{hint}")
    return tuple(sorted(set(names)))


def read_time(value: Any, name: str) -> datetime:
    """A time (naive UTC, whole seconds) from 'YYYY-MM-DD HH:MM:SS' or unix seconds (a
    JSON number or a digit string)."""
    if isinstance(value, str) and _TIME.fullmatch(value):
        try:
            return datetime.strptime(value, TIME_FORMAT)
        except ValueError:
            raise InvalidField(name, f"{quoted(value)} is not a valid date and time") from None
    try:
        seconds = read_int(value, name)
    except InvalidField:
        raise InvalidField(name, _TIME_RULE) from None
    if not 0 <= seconds <= MAX_UNIX_TIME:
        raise InvalidField(name, f"must be unix seconds from 0 to {MAX_UNIX_TIME}")
    return datetime.fromtimestamp(seconds, UTC).replace(tzinfo=None)


def read_path_prefix(value: Any) -> str:
    return read_str(value, "path_prefix", max_length=sestore.MAX_PATH_LENGTH)


@dataclass(frozen=True)
class StatusQuery:
    """Which of the account's requests: a page (``limit`` from ``offset``, newest first,
    or ``limit`` below ``after_id``) of those that meet every filter, or only the one with
    ``id`` (then the page is ignored). ``created_from`` and ``created_to`` are whole
    seconds, both inclusive: ``created_to`` takes in the requests of its whole second, as
    the records' ``created`` shows them."""

    limit: int = DEFAULT_LIMIT
    offset: int = 0
    id: int | None = None
    # Beyond the reference API.
    states: tuple[str, ...] | None = None
    created_from: datetime | None = None
    created_to: datetime | None = None
    bucket: str | None = None
    path_prefix: str | None = None
    after_id: int | None = None

    @classmethod
    def from_values(cls, values: Mapping[str, Any], settings: Settings) -> StatusQuery:
        """The query from a caller's values (JSON numbers or digit strings, or absent);
        InvalidField naming the first one refused."""
        limit = values.get("limit")
        offset = values.get("offset")
        request_id = values.get("id")
        state = values.get("state")
        created_from = values.get("created_from")
        created_to = values.get("created_to")
        bucket = values.get("bucket")
        path_prefix = values.get("path_prefix")
        after_id = values.get("after_id")
        query = cls(
            limit=DEFAULT_LIMIT
            if limit is None
            else read_int(limit, "limit", minimum=1, maximum=settings.status_max_limit),
            offset=0
            if offset is None
            else read_int(offset, "offset", minimum=0, maximum=MAX_OFFSET),
            id=None
            if request_id is None
            else read_int(request_id, "id", minimum=1, maximum=MAX_ID),
            states=None if state is None else read_states(state),
            created_from=None if created_from is None else read_time(created_from, "created_from"),
            created_to=None if created_to is None else read_time(created_to, "created_to"),
            bucket=None if bucket is None else validate_bucket(bucket),
            path_prefix=None if path_prefix is None else read_path_prefix(path_prefix),
            after_id=None
            if after_id is None
            else read_int(after_id, "after_id", minimum=1, maximum=MAX_ID),
        )
        query._check_together()
        return query

    def check(self, settings: Settings) -> None:
        """InvalidField for a query built directly with values out of range."""
        for name, value, low, high in (
            ("limit", self.limit, 1, settings.status_max_limit),
            ("offset", self.offset, 0, MAX_OFFSET),
            ("id", self.id, 1, MAX_ID),
            ("after_id", self.after_id, 1, MAX_ID),
        ):
            if value is not None:
                read_int(value, name, minimum=low, maximum=high)
        if self.states is not None:
            read_states(self.states)
        if self.bucket is not None:
            validate_bucket(self.bucket)
        if self.path_prefix is not None:
            read_path_prefix(self.path_prefix)
        for name in ("created_from", "created_to"):
            value = getattr(self, name)
            if value is not None and value.tzinfo is not None:
                raise InvalidField(name, "must be a naive UTC time")
        self._check_together()

    def _check_together(self) -> None:
        if self.after_id is not None and self.offset:
            raise InvalidField(
                "offset",
                "cannot be combined with after_id (after_id says where the page starts); "
                "leave it out or send 0",
            )
        if (
            self.created_from is not None
            and self.created_to is not None
            and self.created_to < self.created_from
        ):
            raise InvalidField("created_to", "is before created_from")

    @property
    def extended(self) -> bool:
        """Whether the query uses a field beyond the reference API's (its answer then
        carries ``total``)."""
        return any(
            getattr(self, f.name) is not None
            for f in fields(self)
            if f.name not in ("limit", "offset", "id")
        )

    def filters(self) -> RequestFilter:
        """The conditions for the stores (``created_to``'s second taken in whole)."""
        before = None
        if self.created_to is not None and self.created_to < datetime.max - timedelta(seconds=1):
            before = self.created_to + timedelta(seconds=1)
        return RequestFilter(
            states=self.states,
            created_from=self.created_from,
            created_before=before,
            bucket=self.bucket,
            path_prefix=self.path_prefix,
        )


@dataclass(frozen=True)
class StatusPage:
    """The requests found, as the store hands them out (see records.render), and how many
    requests the filters match in all (None for a reference API query: not counted)."""

    rows: Sequence[Any]
    total: int | None = None

    def records(self) -> list[dict[str, Any]]:
        """Each request as its aws.status record."""
        return [records.render(row) for row in self.rows]


def status(ctx: OperationContext, query: StatusQuery) -> StatusPage:
    """The account's requests the query names; never another account's."""
    query.check(ctx.settings)
    filters = query.filters()
    rows = ctx.requests.list_for_account(
        ctx.account.id,
        limit=query.limit,
        offset=query.offset,
        request_id=query.id,
        filters=None if filters.empty else filters,
        before_id=query.after_id,
    )
    total = None
    if query.extended:
        total = ctx.requests.count_for_account(
            ctx.account.id, request_id=query.id, filters=None if filters.empty else filters
        )
    return StatusPage(rows=rows, total=total)


__all__ = [
    "DEFAULT_LIMIT",
    "EXTENDED_FIELDS",
    "STATES",
    "InvalidField",
    "StatusPage",
    "StatusQuery",
    "status",
]
