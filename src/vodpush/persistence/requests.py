"""Upload requests as the API sees them: queue one, read an account's requests back, cancel
one or queue it again (aws.cancel, aws.retry), read its history, read the history of its
callback and make it due again (aws.callbacks, aws.redeliver)."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

from sqlalchemy import (
    Connection,
    Engine,
    Row,
    Select,
    bindparam,
    case,
    delete,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError

from vodpush.core import outcomes
from vodpush.core.callbacks import (
    REDELIVERED_EVENT,
    AttemptRecord,
    CallbackHistory,
    Redelivery,
    RedeliveryResult,
    judge_redelivery,
)
from vodpush.core.filters import RequestFilter
from vodpush.core.records import FINISHING_MESSAGE, QUEUED_MESSAGE
from vodpush.core.requests import (
    CANCELABLE_STATES,
    FINAL_STATES,
    IDEMPOTENCY_WINDOW_SECONDS,
    RETRYABLE_STATES,
    CallbackState,
    Enqueued,
    Event,
    IdempotencyConflict,
    NewRequest,
    RequestEvent,
    State,
    StateChange,
    StoreUnavailable,
)
from vodpush.persistence import dialect
from vodpush.persistence.db import PreparedQuery, read, write_transaction
from vodpush.persistence.events import read_events, record_event
from vodpush.persistence.listing import count_statement, newest_statement, page_ids, probe_rows
from vodpush.persistence.models import CallbackAttempt, UploadPart, UploadRequest
from vodpush.persistence.models import RequestEvent as RequestEventRow
from vodpush.persistence.orphans import record_checkpoint
from vodpush.webhooks import new_message_id

_T = UploadRequest.__table__
_A = CallbackAttempt.__table__
_E = RequestEventRow.__table__
_P = UploadPart.__table__
_PENDING = CallbackState.PENDING.value
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
    _T.c.options_json,
)
# An insert that lost a race for an idempotency key (a concurrent submit with the key, or
# with its old holder's) is tried again this often: the next try sees the winner's row.
_KEY_RACE_TRIES = 3


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
        With an idempotency key, once per key within the window (core.ports.RequestStorePort:
        the same fields return the first id, others raise IdempotencyConflict). Its times
        are the database's (a fast or slow API host cannot hold it back or push it ahead of
        others).

        Race-free on both databases: the key's unique constraint (account_id,
        idempotency_key) lets one insert win; the loser's transaction is rolled back whole
        (with any key it cleared) and tried again, and then finds the winner's request. On
        SQLite writers take turns anyway (BEGIN IMMEDIATE)."""
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
            "idempotency_key": new.idempotency_key,
            "idempotency_hash": new.idempotency_hash if new.idempotency_key else None,
            "state": State.QUEUED.value,
            "message": QUEUED_MESSAGE,
            "http_status": 0,
            "attempts": 0,
            "bytes_done": 0,
            "created_at": now,
            "updated_at": now,
            "not_before": now,
        }
        for _ in range(_KEY_RACE_TRIES):
            try:
                with write_transaction(self._engine) as conn:
                    if new.idempotency_key is not None:
                        earlier = self._take_key(conn, new)
                        if earlier is not None:
                            return Enqueued(id=earlier, replayed=True)
                    request_id = conn.execute(
                        _T.insert().values(**values).returning(_T.c.id)
                    ).scalar_one()
                    record_event(conn, self._dialect, request_id, Event.QUEUED)
                    self._dialect.notify_queued(conn)
            except IntegrityError:
                existing = self.replayed(new.account_id, new.signature)
                if existing is not None:
                    return Enqueued(id=existing, replayed=True)
                if new.idempotency_key is None:
                    raise
                continue  # another submit took the key first: look at its request
            if self.on_enqueue is not None:
                self.on_enqueue()
            return Enqueued(id=request_id, replayed=False)
        raise StoreUnavailable("idempotency key contended: try again")

    def _take_key(self, conn: Connection, new: NewRequest) -> int | None:
        """In the enqueue transaction: the id of the request that holds ``new``'s key within
        the window with the same fields (IdempotencyConflict with others), or None when the
        key is free for ``new``; an older holder gives it up here."""
        fresh = _T.c.created_at > self._dialect.now(-IDEMPOTENCY_WINDOW_SECONDS)
        holder = conn.execute(
            self._dialect.for_update(
                select(_T.c.id, _T.c.idempotency_hash, fresh.label("fresh")).where(
                    _T.c.account_id == new.account_id,
                    _T.c.idempotency_key == new.idempotency_key,
                )
            )
        ).first()
        if holder is None:
            return None
        if holder.fresh:
            if holder.idempotency_hash != new.idempotency_hash:
                raise IdempotencyConflict(new.idempotency_key)
            return int(holder.id)
        conn.execute(
            _T.update()
            .where(_T.c.id == holder.id, _T.c.idempotency_key == new.idempotency_key)
            .values(idempotency_key=None, idempotency_hash=None)
        )
        return None

    def replayed(self, account_id: int, signature: str) -> int | None:
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

    # -- the callback's history and redelivery ---------------------------------------------

    def callback_history(
        self, account_id: int, request_id: int, *, limit: int
    ) -> CallbackHistory | None:
        """The callback of an account's request: its state with the counts (one indexed
        read of the row), then its ``limit`` newest attempts (ix_callback_attempts_request_id)."""
        # Correlated with the request row: its redelivery events.
        redelivered = (_E.c.request_id == _T.c.id) & (_E.c.event == REDELIVERED_EVENT)
        found = select(
            _T.c.id,
            _T.c.state,
            _T.c.callback,
            _T.c.callback_state,
            _T.c.callback_attempts,
            _T.c.callback_next_at,
            _T.c.callback_msg_id,
            _T.c.callback_last_error,
            select(func.count()).where(_A.c.request_id == _T.c.id).scalar_subquery().label("total"),
            select(func.count()).where(redelivered).scalar_subquery().label("redeliveries"),
            select(func.max(_E.c.at)).where(redelivered).scalar_subquery().label("last"),
        ).where(_T.c.id == request_id, _T.c.account_id == account_id)
        with read(self._engine) as conn:
            row = conn.execute(found).first()
            if row is None:
                return None
            attempts = (
                conn.execute(
                    select(_A.c.at, _A.c.ok, _A.c.http_status, _A.c.error, _A.c.duration)
                    .where(_A.c.request_id == request_id)
                    .order_by(_A.c.id.desc())
                    .limit(limit)
                ).all()
                if row.total
                else []
            )
        return CallbackHistory(
            id=row.id,
            state=row.state,
            callback=row.callback,
            callback_state=row.callback_state,
            callback_attempts=row.callback_attempts,
            next_at=row.callback_next_at,
            msg_id=row.callback_msg_id,
            last_error=row.callback_last_error,
            total=row.total,
            redeliveries=row.redeliveries,
            last_redelivered=row.last,
            attempts=tuple(
                AttemptRecord(
                    at=a.at, ok=a.ok, http_status=a.http_status, error=a.error, duration=a.duration
                )
                for a in attempts
            ),
        )

    def redeliver_callback(
        self, account_id: int, request_id: int, *, msg_id: str, limit: int, window: float
    ) -> RedeliveryResult:
        """See core.ports.RequestStorePort.redeliver_callback. A refusal is answered from a
        plain read (no write lock for it); the rule is then applied again on the row locked
        for the change, so that of two redeliveries at once one is made."""
        with read(self._engine) as conn:
            row = self._redelivery_row(conn, account_id, request_id, lock=False)
        if (refused := _judge(row, msg_id)) is not None:
            return refused
        with write_transaction(self._engine) as conn:
            row = self._redelivery_row(conn, account_id, request_id, lock=True)
            if (refused := _judge(row, msg_id)) is not None:
                return refused
            assert row is not None  # judged
            now = conn.execute(select(self._dialect.now())).scalar_one()
            count, oldest = conn.execute(
                select(func.count(), func.min(_E.c.at)).where(
                    _E.c.request_id == request_id,
                    _E.c.event == REDELIVERED_EVENT,
                    _E.c.at > self._dialect.now(-window),
                )
            ).one()
            if count >= limit:
                allowed = oldest + timedelta(seconds=window)
                return RedeliveryResult(
                    Redelivery.TOO_MANY,
                    state=row.state,
                    callback_state=row.callback_state,
                    msg_id=row.callback_msg_id,
                    at=allowed,
                    redeliveries=count,
                    retry_after=max((allowed - now).total_seconds(), 0.0),
                )
            # Guarded by what was judged: finished, and no delivery pending.
            moved = conn.execute(
                update(_T)
                .where(
                    _T.c.id == request_id,
                    _T.c.state.in_(FINAL_STATES),
                    _T.c.callback_state != _PENDING,
                )
                .values(
                    callback_state=_PENDING,
                    callback_next_at=now,
                    callback_attempts=0,
                    callback_msg_id=msg_id,
                    callback_last_error=None,
                )
            ).rowcount
            if moved != 1:  # cannot happen under the lock; never pass it silently
                raise RuntimeError(f"request {request_id} changed under its lock")
            conn.execute(
                insert(_E).values(
                    request_id=request_id,
                    at=now,
                    event=REDELIVERED_EVENT,
                    state=row.state,
                    attempts=row.attempts,
                    message=f"callback redelivered as {msg_id}",
                )
            )
        return RedeliveryResult(
            Redelivery.QUEUED, state=row.state, callback_state=_PENDING, msg_id=msg_id, at=now
        )

    def _redelivery_row(
        self, conn: Any, account_id: int, request_id: int, *, lock: bool
    ) -> Row[Any] | None:
        statement = select(
            _T.c.state,
            _T.c.attempts,
            _T.c.callback,
            _T.c.callback_state,
            _T.c.callback_msg_id,
            _T.c.callback_next_at,
        ).where(_T.c.id == request_id, _T.c.account_id == account_id)
        if lock:
            statement = self._dialect.for_update(statement)
        return conn.execute(statement).first()


def _judge(row: Row[Any] | None, msg_id: str) -> RedeliveryResult | None:
    """core.callbacks.judge_redelivery on a row of ``_redelivery_row`` (None: not found)."""
    if row is None:
        return RedeliveryResult(Redelivery.NOT_FOUND)
    return judge_redelivery(
        state=row.state,
        callback=row.callback,
        callback_state=row.callback_state,
        msg_id=row.callback_msg_id,
        next_at=row.callback_next_at,
        new_msg_id=msg_id,
    )


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
