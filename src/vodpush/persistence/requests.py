"""Upload requests as the API sees them: queue one, read an account's requests back, cancel
one or queue it again (aws.cancel, aws.retry), read its history."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import Connection, Engine, Row, bindparam, case, delete, select, update
from sqlalchemy.exc import IntegrityError

from vodpush.core import outcomes
from vodpush.core.records import FINISHING_MESSAGE, QUEUED_MESSAGE
from vodpush.core.requests import (
    CANCELABLE_STATES,
    RETRYABLE_STATES,
    Enqueued,
    Event,
    NewRequest,
    RequestEvent,
    State,
    StateChange,
)
from vodpush.persistence import dialect
from vodpush.persistence.db import PreparedQuery, read, write_transaction
from vodpush.persistence.events import read_events, record_event
from vodpush.persistence.models import UploadPart, UploadRequest
from vodpush.persistence.orphans import record_checkpoint
from vodpush.webhooks import new_message_id

_T = UploadRequest.__table__
_P = UploadPart.__table__
# The request a cancel or a retry changes (parameter rid), for record_checkpoint: the row
# is locked first, and its state checked, by the same transaction.
_BY_ID = _T.c.id == bindparam("rid")

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
                record_event(conn, self._dialect, request_id, Event.QUEUED)
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
        self, account_id: int, *, limit: int, offset: int, request_id: int | None = None
    ) -> Sequence[Any]:
        """An account's requests, newest first; never another account's."""
        if request_id is None:
            return self._page.all(account_id=account_id, limit=limit, offset=offset)
        return self._one.all(account_id=account_id, id=request_id)

    def get(self, request_id: int) -> Row[Any] | None:
        with read(self._engine) as conn:
            return conn.execute(select(*STATUS_COLUMNS).where(_T.c.id == request_id)).first()

    # -- aws.cancel, aws.retry -------------------------------------------------------------

    def _lock(self, conn: Connection, request_id: int, account_id: int | None) -> Row[Any] | None:
        """The request's row, locked until the transaction ends (SQLite: the write lock is
        held already), with ``finishing``: running, in its final S3 call under a live lease
        (ledger.confirm() wrote the message). None when it is not there or not the
        account's."""
        finishing = case(
            (
                (_T.c.message == FINISHING_MESSAGE) & (_T.c.lease_expires_at > self._dialect.now()),
                1,
            ),
            else_=0,
        )
        query = select(_T.c.state, _T.c.callback, finishing.label("finishing")).where(
            _T.c.id == request_id
        )
        if account_id is not None:
            query = query.where(_T.c.account_id == account_id)
        return conn.execute(self._dialect.for_update(query)).first()

    def _drop_checkpoint(self, conn: Connection, request_id: int) -> None:
        """Forget the row's part ledger in this transaction, a checkpoint still there first
        recorded as an orphan (its upload id is never forgotten unaborted), due when the
        lease of a worker still sending its parts runs out; the UPDATE that follows sets
        multipart_json to NULL."""
        statement = record_checkpoint(self._dialect, _BY_ID, after_lease=True)
        conn.execute(statement, {"rid": request_id})
        conn.execute(delete(_P).where(_P.c.request_id == request_id))

    def cancel(self, request_id: int, *, account_id: int | None, message: str) -> StateChange:
        """Cancel in one transaction that locks the row first: a worker finishing at the same
        moment either wrote its outcome before (then this finds a final state) or finds
        its lease gone after (its write raises LeaseLost); exactly one of them wins."""
        with write_transaction(self._engine) as conn:
            row = self._lock(conn, request_id, account_id)
            if row is None:
                return StateChange(found=None, changed=False)
            if row.state not in CANCELABLE_STATES:
                return StateChange(found=row.state, changed=False)
            if row.state == State.RUNNING.value and row.finishing:
                return StateChange(found=row.state, changed=False, finishing=True)
            self._drop_checkpoint(conn, request_id)
            values = outcomes.canceled(
                message=message,
                has_callback=bool(row.callback),
                now=self._dialect.now(),
                new_msg_id=new_message_id,
            )
            conn.execute(update(_T).where(_T.c.id == request_id).values(**values))
            record_event(conn, self._dialect, request_id, Event.CANCELED)
            after = self._status(conn, request_id)
        return StateChange(found=row.state, changed=True, row=after)

    def retry(self, request_id: int, *, account_id: int | None) -> StateChange:
        with write_transaction(self._engine) as conn:
            row = self._lock(conn, request_id, account_id)
            if row is None:
                return StateChange(found=None, changed=False)
            if row.state not in RETRYABLE_STATES:
                return StateChange(found=row.state, changed=False)
            # A final request has no checkpoint (its outcome dropped it); this only makes
            # sure that none could be lost.
            self._drop_checkpoint(conn, request_id)
            values = outcomes.requeued(self._dialect.now())
            conn.execute(update(_T).where(_T.c.id == request_id).values(**values))
            record_event(conn, self._dialect, request_id, Event.RETRIED)
            self._dialect.notify_queued(conn)
            after = self._status(conn, request_id)
        if self.on_enqueue is not None:
            self.on_enqueue()
        return StateChange(found=row.state, changed=True, row=after)

    @staticmethod
    def _status(conn: Connection, request_id: int) -> Row[Any] | None:
        return conn.execute(select(*STATUS_COLUMNS).where(_T.c.id == request_id)).first()

    def events(self, request_id: int) -> list[RequestEvent]:
        return read_events(self._engine, request_id)
