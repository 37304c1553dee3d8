"""Upload requests as the API sees them: queue one, read an account's requests back."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import Engine, Row, Select, bindparam, func, select, union_all
from sqlalchemy.exc import IntegrityError
from sqlalchemy.sql.elements import ColumnElement

from vodpush.core.filters import RequestFilter
from vodpush.core.records import QUEUED_MESSAGE
from vodpush.core.requests import Enqueued, NewRequest, State
from vodpush.persistence import dialect
from vodpush.persistence.db import PreparedQuery, read, write_transaction
from vodpush.persistence.models import UploadRequest

_T = UploadRequest.__table__

# The columns aws.status shows; selected explicitly so listing stays a narrow index scan.
STATUS_COLUMNS = (
    _T.c.id,
    _T.c.cdn_id,
    _T.c.path,
    _T.c.destination_path,
    _T.c.bucket,
    _T.c.metadata_json,
    _T.c.acl,
    _T.c.callback,
    _T.c.message,
    _T.c.results_json,
    _T.c.created_at,
    _T.c.updated_at,
    _T.c.http_status,
    _T.c.state,
    _T.c.attempts,
    _T.c.bytes_done,
    _T.c.bytes_total,
    _T.c.sha256,
    _T.c.error_code,
    _T.c.callback_state,
    _T.c.callback_attempts,
    _T.c.callback_last_error,
    _T.c.not_before,
)


class RequestStore:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._dialect = dialect.for_engine(engine)
        # Called after a request is queued (an embedded worker wakes up at once).
        self.on_enqueue: Callable[[], None] | None = None
        # The aws.status reads, compiled once (see PreparedQuery).
        mine = select(*STATUS_COLUMNS).where(_T.c.account_id == bindparam("account_id"))
        self._page = PreparedQuery(
            engine,
            mine.order_by(_T.c.id.desc()).limit(bindparam("limit")).offset(bindparam("offset")),
        )
        self._one = PreparedQuery(engine, mine.where(_T.c.id == bindparam("id")))

    def enqueue(self, new: NewRequest) -> Enqueued:
        """Queue a request once per signature digest: a replay returns the first request's id.
        Its times are the database's (a fast or slow API host cannot hold it back or push it
        ahead of others)."""
        now = self._dialect.now()
        values = {
            "account_id": new.account_id,
            "cdn_id": new.cdn_id,
            "path": new.path,
            "destination_path": new.destination_path,
            "bucket": new.bucket,
            "acl": new.acl,
            "metadata_json": json.dumps(new.metadata, ensure_ascii=False),
            "callback": new.callback,
            "signature": new.signature,
            "options_json": json.dumps(new.options, ensure_ascii=False) if new.options else None,
            "state": State.QUEUED.value,
            "message": QUEUED_MESSAGE,
            "http_status": 0,
            "attempts": 0,
            "bytes_done": 0,
            "created_at": now,
            "updated_at": now,
            "not_before": now,
        }
        try:
            with write_transaction(self._engine) as conn:
                request_id = conn.execute(
                    _T.insert().values(**values).returning(_T.c.id)
                ).scalar_one()
                self._dialect.notify_queued(conn)
        except IntegrityError:
            existing = self._by_signature(new.account_id, new.signature)
            if existing is None:
                raise
            return Enqueued(id=existing, replayed=True)
        if self.on_enqueue is not None:
            self.on_enqueue()
        return Enqueued(id=request_id, replayed=False)

    def _by_signature(self, account_id: int, signature: str) -> int | None:
        with read(self._engine) as conn:
            return conn.execute(
                select(_T.c.id).where(_T.c.account_id == account_id, _T.c.signature == signature)
            ).scalar()

    def list_for_account(
        self,
        account_id: int,
        *,
        limit: int,
        offset: int,
        request_id: int | None = None,
        filters: RequestFilter | None = None,
        before_id: int | None = None,
    ) -> Sequence[Any]:
        """An account's requests, newest first; never another account's (see
        core.ports.RequestStorePort)."""
        if (filters is None or filters.empty) and before_id is None:
            # The reference API's listing: compiled once (the hot path).
            if request_id is None:
                return self._page.all(account_id=account_id, limit=limit, offset=offset)
            return self._one.all(account_id=account_id, id=request_id)
        statement = page_statement(
            account_id,
            limit=limit,
            offset=offset,
            request_id=request_id,
            filters=filters or RequestFilter(),
            before_id=before_id,
            sql=self._dialect,
        )
        with read(self._engine) as conn:
            return conn.execute(statement).all()

    def count_for_account(
        self,
        account_id: int,
        *,
        request_id: int | None = None,
        filters: RequestFilter | None = None,
    ) -> int:
        statement = count_statement(
            account_id,
            request_id=request_id,
            filters=filters or RequestFilter(),
            sql=self._dialect,
        )
        with read(self._engine) as conn:
            return int(conn.execute(statement).scalar_one())

    def get(self, request_id: int) -> Row[Any] | None:
        with read(self._engine) as conn:
            return conn.execute(select(*STATUS_COLUMNS).where(_T.c.id == request_id)).first()


# -- filtered listings (aws.status filters) ------------------------------------------------
#
# Every condition has an index that starts with account_id (migration 0005): the state, the
# bucket and the created time each with id after it, the path (text_pattern_ops on
# PostgreSQL). tests/test_status_plans.py checks with EXPLAIN that each one is used.


def _conditions(
    account_id: int,
    *,
    request_id: int | None,
    filters: RequestFilter,
    before_id: int | None,
    sql: dialect.Dialect,
) -> list[ColumnElement[bool]]:
    """Every condition but the states (whose shape differs between listing and count)."""
    where: list[ColumnElement[bool]] = [_T.c.account_id == account_id]
    if request_id is not None:
        where.append(_T.c.id == request_id)
    if before_id is not None:
        # An equality filter's index (state, bucket) has the id after it: the bound is a
        # range of it. A range filter's index (created time, path) has not; its range must
        # not lose to the id index (see Dialect.keyset_id).
        equal = filters.states is not None or filters.bucket is not None
        id_column = sql.keyset_id(_T.c.id) if _ranged(filters) and not equal else _T.c.id
        where.append(id_column < before_id)
    if filters.created_from is not None:
        where.append(_T.c.created_at >= filters.created_from)
    if filters.created_before is not None:
        where.append(_T.c.created_at < filters.created_before)
    if filters.bucket is not None:
        where.append(_T.c.bucket == filters.bucket)
    if filters.path_prefix is not None:
        where.append(sql.starts_with(_T.c.path, filters.path_prefix))
    return where


def page_statement(
    account_id: int,
    *,
    limit: int,
    offset: int,
    request_id: int | None,
    filters: RequestFilter,
    before_id: int | None,
    sql: dialect.Dialect,
) -> Select[Any]:
    """The SELECT of one filtered page, in two steps: the ids of the page, read from the
    filter's index (SQLite's indexes all hold the id), then those rows.

    The ids come in one of three ways. An equality filter (one state, the bucket) reads
    its index newest first, from the keyset bound down, and stops after the page. Several
    states read the state index so once per state and merge the ranges (an IN list would
    walk the account's whole listing for rare states). Range filters alone (created time,
    path prefix) read every match from their index and keep the newest: a cost in
    proportion to the matches, as their ``total`` already is, deep in the list as at its
    top; the planner is kept from walking the id index instead (behind OFFSET 0: it
    could estimate a path prefix only blindly, and would read the account's whole
    listing for a rare one)."""
    if request_id is not None:
        limit, offset = 1, 0  # one request at most: the page does not apply
    where = _conditions(
        account_id, request_id=request_id, filters=filters, before_id=before_id, sql=sql
    )
    states = filters.states
    ranged = _ranged(filters)
    if states is not None and len(states) > 1:
        # Each state's newest limit + offset ids, then the newest of them all.
        per_state = [
            select(_T.c.id)
            .where(*where, _T.c.state == state)
            .order_by(_T.c.id.desc())
            .limit(limit + offset)
            .subquery()
            for state in states
        ]
        merged = union_all(*(select(branch.c.id) for branch in per_state)).subquery()
        ids = select(merged.c.id).order_by(merged.c.id.desc())
    elif ranged and states is None and filters.bucket is None:
        matches = select(_T.c.id).where(*where).offset(0).subquery()
        ids = select(matches.c.id).order_by(matches.c.id.desc())
    else:
        if states is not None:
            where.append(_T.c.state == states[0])
        ids = select(_T.c.id).where(*where).order_by(_T.c.id.desc())
    ids = ids.limit(limit).offset(offset)
    return (
        select(*STATUS_COLUMNS)
        .where(_T.c.account_id == account_id, _T.c.id.in_(ids.scalar_subquery()))
        .order_by(_T.c.id.desc())
    )


def _ranged(filters: RequestFilter) -> bool:
    """Whether a range filter (created time, path prefix) is set."""
    return (
        filters.created_from is not None
        or filters.created_before is not None
        or filters.path_prefix is not None
    )


def count_statement(
    account_id: int, *, request_id: int | None, filters: RequestFilter, sql: dialect.Dialect
) -> Select[Any]:
    """SELECT count(*) of what ``page_statement`` lists without paging: an index-only
    count over the filter's index."""
    where = _conditions(account_id, request_id=request_id, filters=filters, before_id=None, sql=sql)
    if filters.states is not None:
        where.append(_T.c.state.in_(filters.states))
    return select(func.count()).select_from(_T).where(*where)
