"""The statements of aws.status's filtered listings and counts (persistence.requests runs
them): which index serves which filter, and how a page is found in it.

Every filter has an index that starts with account_id (migration 0005): the state, the
bucket and the created time each with the id after it, the path (text_pattern_ops on
PostgreSQL). tests/test_status_plans.py checks with EXPLAIN that each one is used, and
bench/status_filters.py measures what a page and a count cost.

A page's ids are found first, from the index alone (every index holds the id: SQLite's
implicitly; PostgreSQL then answers from the index, where a plan that reads rows would
weigh the account's rows against the state's as if they were unrelated), then those rows
are read. How the ids are found depends on the filters:

- an equality filter (one state, the bucket), or none: its index newest first, from the
  keyset bound down, stopping after the page;
- several states: the state index once per state, newest first, the ranges merged (an IN
  list would walk the account's whole listing for rare states);
- range filters alone (created time, path prefix): first the newest requests through the
  id index, at most ``probe_rows`` of them, which fills the page of a dense filter at
  once; then as many from the newest match down (``newest_statement``: a time range in the
  past is one stretch of ids); else every match read from the filter's index and the
  newest kept. The last two cost in proportion to the matches (as the ``total`` does),
  deep in the list as at its top.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Select, Subquery, func, select, union_all
from sqlalchemy.sql.elements import ColumnElement

from vodpush.core.filters import RequestFilter
from vodpush.persistence import dialect
from vodpush.persistence.models import UploadRequest

_T = UploadRequest.__table__

# The probe of range filters reads this many of the newest requests below the keyset
# bound: ten per request of the page (a filter that matches one request in ten fills the
# page there), within bounds. An index row and a table row each: about a millisecond.
PROBE_PER_ROW = 10
PROBE_MIN = 1_000
PROBE_MAX = 10_000


def probe_rows(filters: RequestFilter, *, limit: int, offset: int) -> int | None:
    """How many of the newest requests to try first for a page of ``filters``; None when
    the filters' own index finds the page at once (or there is no range filter)."""
    if not _ranged(filters) or _equal(filters):
        return None
    return min(max(PROBE_MIN, PROBE_PER_ROW * (limit + offset)), PROBE_MAX)


def _ranged(filters: RequestFilter) -> bool:
    """Whether a range filter (created time, path prefix) is set."""
    return (
        filters.created_from is not None
        or filters.created_before is not None
        or filters.path_prefix is not None
    )


def _equal(filters: RequestFilter) -> bool:
    """Whether an equality filter (state, bucket) is set."""
    return filters.states is not None or filters.bucket is not None


def _conditions(
    account_id: int,
    *,
    request_id: int | None,
    filters: RequestFilter,
    before_id: int | None,
    sql: dialect.Dialect,
    by_id: bool = False,
) -> list[ColumnElement[bool]]:
    """Every condition but the states (whose shape differs between listing and count).

    One index serves: the id index for a probe (``by_id``); else an equality filter's
    when there is one, as it keeps the listing's order and the keyset bound is a range of
    its id; else a range filter's, whose range is read whole. Terms the chosen index does
    not serve are kept off the indexes (Dialect.unindexed: SQLite would guess otherwise).
    """
    off_index = by_id or _equal(filters)

    def ranged(column: Any) -> Any:
        return sql.unindexed(column) if off_index else column

    where: list[ColumnElement[bool]] = [_T.c.account_id == account_id]
    if request_id is not None:
        where.append(_T.c.id == request_id)
    if before_id is not None:
        keyset = _T.c.id if by_id or _equal(filters) or not _ranged(filters) else None
        where.append((sql.unindexed(_T.c.id) if keyset is None else keyset) < before_id)
    if filters.created_from is not None:
        where.append(ranged(_T.c.created_at) >= filters.created_from)
    if filters.created_before is not None:
        where.append(ranged(_T.c.created_at) < filters.created_before)
    if filters.bucket is not None:
        where.append(_T.c.bucket == filters.bucket)
    if filters.path_prefix is not None:
        where.append(sql.starts_with(ranged(_T.c.path), filters.path_prefix))
    return where


def page_ids(
    account_id: int,
    *,
    limit: int,
    offset: int,
    request_id: int | None,
    filters: RequestFilter,
    before_id: int | None,
    sql: dialect.Dialect,
    probe: int | None = None,
) -> Subquery:
    """The ids of one filtered page, newest first (see the module's description); the
    caller joins the rows to them (not "id IN (...)": SQLite plans an IN list's subquery
    without its order). With ``probe`` (range filters alone), only among the ``probe``
    newest requests below ``before_id``: a page that comes back short says nothing about
    the rest."""
    if request_id is not None:
        limit, offset = 1, 0  # one request at most: the page does not apply
    where = _conditions(
        account_id,
        request_id=request_id,
        filters=filters,
        before_id=before_id,
        sql=sql,
        by_id=probe is not None,
    )
    states = filters.states
    if probe is not None:
        newest = select(_T.c.id).where(_T.c.account_id == account_id)
        if before_id is not None:
            newest = newest.where(_T.c.id < before_id)
        newest_ids = newest.order_by(_T.c.id.desc()).limit(probe).subquery()
        lowest = select(func.min(newest_ids.c.id)).scalar_subquery()
        ids: Any = select(_T.c.id).where(*where, _T.c.id >= lowest).subquery()
    elif states is not None and len(states) > 1:
        # Each state's newest limit + offset ids, then the newest of them all.
        per_state = [
            select(_T.c.id)
            .where(*where, _T.c.state == state)
            .order_by(_T.c.id.desc())
            .limit(limit + offset)
            .subquery()
            for state in states
        ]
        ids = union_all(*(select(branch.c.id) for branch in per_state)).subquery()
    elif _ranged(filters) and not _equal(filters):
        # Every match: OFFSET 0 keeps the planner from walking the id index instead (it
        # could estimate a path prefix only blindly, and would read the account's whole
        # listing for a rare one).
        ids = select(_T.c.id).where(*where).offset(0).subquery()
    else:
        if states is not None:
            where.append(_T.c.state == states[0])
        ids = select(_T.c.id).where(*where).subquery()
    return select(ids.c.id).order_by(ids.c.id.desc()).limit(limit).offset(offset).subquery()


def count_statement(
    account_id: int, *, request_id: int | None, filters: RequestFilter, sql: dialect.Dialect
) -> Select[Any]:
    """SELECT count(*) of what ``page_ids`` finds without paging: a count over the
    filter's index."""
    where = _conditions(account_id, request_id=request_id, filters=filters, before_id=None, sql=sql)
    if filters.states is not None:
        where.append(_T.c.state.in_(filters.states))
    return select(func.count()).select_from(_T).where(*where)


def newest_statement(
    account_id: int, *, filters: RequestFilter, before_id: int | None, sql: dialect.Dialect
) -> Select[Any]:
    """SELECT the id of the newest request that range filters alone match (below
    ``before_id``), from their index alone: where a probe should start when the newest
    requests did not match (a time range in the past is one stretch of ids). Behind
    OFFSET 0, as every match is read: a planner would otherwise walk the id index down
    from the top."""
    where = _conditions(account_id, request_id=None, filters=filters, before_id=before_id, sql=sql)
    matches = select(_T.c.id).where(*where).offset(0).subquery()
    return select(func.max(matches.c.id))
