"""Upload requests as the API sees them: queue one, read an account's requests back."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import Engine, Row, Select, bindparam, select
from sqlalchemy.exc import IntegrityError

from vodpush.core.filters import RequestFilter
from vodpush.core.records import QUEUED_MESSAGE
from vodpush.core.requests import Enqueued, NewRequest, State
from vodpush.persistence import dialect
from vodpush.persistence.db import PreparedQuery, read, write_transaction
from vodpush.persistence.listing import count_statement, newest_statement, page_ids, probe_rows
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
        page = functools.partial(
            page_statement,
            account_id,
            limit=limit,
            offset=offset,
            request_id=request_id,
            filters=filters or RequestFilter(),
            before_id=before_id,
            sql=self._dialect,
        )
        filters = filters or RequestFilter()
        with read(self._engine) as conn:
            probe = probe_rows(filters, limit=limit, offset=offset)
            if probe is not None and request_id is None:
                # Range filters alone: the newest requests first, then those from the
                # newest match down, then every match (see persistence.listing).
                rows = conn.execute(page(probe=probe)).all()
                if len(rows) == limit:
                    return rows
                newest = conn.execute(
                    newest_statement(
                        account_id, filters=filters, before_id=before_id, sql=self._dialect
                    )
                ).scalar()
                if newest is None:
                    return []  # nothing below the bound matches
                rows = conn.execute(page(probe=probe, before_id=newest + 1)).all()
                if len(rows) == limit:
                    return rows
            return conn.execute(page()).all()

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


def page_statement(account_id: int, **page: Any) -> Select[Any]:
    """One filtered page of the account's requests: the ids listing.page_ids finds (with
    its keyword arguments), then their rows, newest first."""
    ids = page_ids(account_id, **page)
    return (
        select(*STATUS_COLUMNS)
        .join_from(ids, _T, _T.c.id == ids.c.id)
        .where(_T.c.account_id == account_id)
        .order_by(_T.c.id.desc())
    )
