"""The queue as workers see it: claim with a lease, renew, finish, retry, release; the
multipart ledger; due callbacks. Every state change names the state and the lease it
expects to find, and "no row updated" raises LeaseLost instead of passing silently.

A checkpoint is dropped in one of three ways: ``DbLedger.clear`` (its upload was completed
or its abort confirmed), ``DbLedger.give_up``, or an outcome (succeed, fail; and a cancel,
``persistence.requests``). The last two record a checkpoint still there as an orphan upload
in the same transaction (``persistence.orphans``): an upload id is never forgotten before
S3 confirms it gone.

Outcomes and retries add a step to the request's history (``persistence.events``) in the
transaction that makes them; claims do not (the attempt count of each step tells them)."""

from __future__ import annotations

import functools
import json
import threading
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    Engine,
    Float,
    and_,
    bindparam,
    case,
    delete,
    func,
    insert,
    literal,
    not_,
    or_,
    select,
    true,
    update,
)
from sqlalchemy.sql.elements import ClauseElement

from vodpush.core import outcomes
from vodpush.core.checkpoint import MultipartCheckpoint, PartRecord
from vodpush.core.records import (
    FINISHING_MESSAGE,
    QUEUED_MESSAGE,
    UPLOADING_MESSAGE,
    retrying_message,
)
from vodpush.core.requests import (
    WAITING_STATES,
    CallbackState,
    Claimed,
    DueCallback,
    Event,
    LeaseLost,
    State,
)
from vodpush.persistence import dialect
from vodpush.persistence.db import read, write_transaction
from vodpush.persistence.events import record_event
from vodpush.persistence.models import Account, CallbackAttempt, UploadPart, UploadRequest
from vodpush.persistence.orphans import record_checkpoint
from vodpush.webhooks import new_message_id

_T = UploadRequest.__table__
_P = UploadPart.__table__
_A = CallbackAttempt.__table__
_ACCOUNTS = Account.__table__
# A disabled account's requests and callbacks are held: not claimed, not lost; they go on
# when it is enabled again. The claim starts from the enabled accounts (QueueStore.claim);
# callbacks and the counts test "account_id NOT IN (disabled accounts)", an uncorrelated
# list both databases read once per statement (via ix_accounts_enabled), and only when some
# account is disabled at all: a correlated EXISTS or a bare NOT IN made the old claim (which
# gathered every due row of ix_upload_requests_state_not_before before sorting them) over a
# backlog of 20,000 queued requests 1.7-2.6 times slower; the CASE keeps it at the old cost.
_DISABLED = select(_ACCOUNTS.c.id).where(_ACCOUNTS.c.enabled.is_(False))
_ACCOUNT_ENABLED = case(
    (_DISABLED.exists(), _T.c.account_id.not_in(_DISABLED.scalar_subquery())), else_=true()
)
_PENDING = CallbackState.PENDING.value
# Picks of an account per claim on PostgreSQL (see QueueStore.claim).
_CLAIM_TRIES = 4


def _fixed(state: str) -> Any:
    """A state as a literal of the SQL text, not a parameter: PostgreSQL plans a prepared
    claim once for all parameters (after five runs), and that plan cannot tell that
    "state >= $1 AND state <= $2" is one value, nor which indexes suit it."""
    return literal(str(state), literal_execute=True)


def _oldest(r: Any, account: Any, state: State, *where: Any) -> Any:
    """The id of ``account``'s oldest request in ``state`` meeting ``where``: an ordered
    walk of ix_upload_requests_account_id_state_id from (account, state). The state is a
    range of one value, not an equality: PostgreSQL drops a column fixed by an equality from
    the order, and ordered by id alone it may walk the primary key instead (when one account
    has most rows), through every request that account ever finished. ``r``: an alias of
    the requests table."""
    return (
        select(r.c.id)
        .where(r.c.account_id == account, r.c.state >= _fixed(state), r.c.state <= _fixed(state))
        .where(*where)
        .order_by(r.c.state, r.c.id)
        .limit(1)
        .scalar_subquery()
    )


def _oldest_runnable(r: Any, account: Any, now: Any) -> Any:
    """The id of ``account``'s oldest runnable request (NULL: none): queued or retrying and
    due, or running under a lease that ran out."""
    return (
        _oldest(r, account, State.QUEUED, r.c.not_before <= now),
        _oldest(r, account, State.RETRYING, r.c.not_before <= now),
        _oldest(r, account, State.RUNNING, r.c.lease_expires_at < now),
    )


def _in_flight(r: Any, account: Any, now: Any) -> Any:
    """The count of ``account``'s uploads in flight: running under a live lease (one that
    ran out is runnable again, and taking it over counts like any claim). ``r``: an alias
    of the requests table."""
    return (
        select(func.count())
        .select_from(r)
        .where(
            r.c.account_id == account,
            r.c.state == _fixed(State.RUNNING),
            r.c.lease_expires_at >= now,
        )
        .scalar_subquery()
    )


# The guard of every change a worker makes to a request: it still holds the lease.
# Parameters: rid, owner.
_LEASED = and_(
    _T.c.id == bindparam("rid"),
    _T.c.state == State.RUNNING.value,
    _T.c.lease_owner == bindparam("owner"),
)


@dataclass(frozen=True)
class _DbNow:
    """A column value: the database's time, ``seconds`` later. Written by the database on
    its clock (never a worker's), and the seconds are a parameter, so that the statement is
    still built once."""

    seconds: float = 0.0


_DB_NOW = _DbNow()


class QueueStore:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._dialect = dialect.for_engine(engine)
        # Built once: constructing these costs more than running them, and the worker runs
        # them after every upload.
        # One claim statement per lease length (a worker uses one): the lease is computed
        # by the database, on its clock.
        self._claims: dict[float, Any] = {}
        self._updates: dict[tuple[tuple[str, ...], tuple[str, ...]], Any] = {}
        self._callback_claims: dict[float, Any] = {}
        self._pick = self._pick_statement()
        self._lock_account = self._dialect.lock_for_claim(
            select(_ACCOUNTS.c.id).where(_ACCOUNTS.c.id == bindparam("account"))
        )
        # The account of this store's previous claim: the round-robin goes on after it.
        self._last_account = 0
        # Due by the database's clock, as the lease claim_callback sets.
        self._due_callback = (
            select(_T.c.id)
            .where(
                _T.c.callback_state == _PENDING,
                _T.c.callback_next_at <= self._dialect.now(),
                _ACCOUNT_ENABLED,
            )
            .order_by(_T.c.callback_next_at)
            .limit(1)
        )
        # retry_later's first step: the due time on the database's clock, and the attempt
        # count of the request we lease (locked until the update that follows).
        self._retry_time = self._dialect.for_update(
            select(
                self._dialect.now(bindparam("delay", type_=Float)).label("at"),
                _T.c.attempts,
            ).where(_LEASED)
        )

    # -- claiming --------------------------------------------------------------------------
    #
    # A claim is fair between accounts (core.ports.QueueStorePort.claim): first the account
    # (``_pick``), then its oldest runnable request (``_claim_statement``), in one write
    # transaction; never a scan of the backlog (the old claim read every due row of a
    # 20,000-request backlog to sort it by id). What the pick asks of an account is either
    # one probe of ix_upload_requests_account_id_state_id (its oldest queued request) or a
    # lookup in a set the statement builds once from the few requests running, or retrying
    # and due, of all accounts: nothing per account that a stale estimate of those few could
    # turn into a walk over all of them. SQLite runs the transaction alone (its write lock);
    # on PostgreSQL each statement reads a snapshot of its own, and a claim for an account
    # with a limit locks the account's row between the two, so that the count of its
    # uploads in flight that the claim checks includes every claim committed before.

    def _pick_statement(self) -> Any:
        """The account whose turn it is. Parameters: after (the account of this store's
        previous claim), tried (accounts whose claim found nothing in this call).

        First the shortcut, which the worker's claims nearly always take: the next account
        in round-robin order (after ``after``, then from the first) with a request to run
        and no upload in flight, found by walking the accounts in id order and stopping
        there. It is the account the full rule picks whenever there is one (none has fewer
        in flight). Else, when every account with work has uploads in flight, the full
        rule over all of them: a branch of the same statement, read (its CTE computed) only
        when the shortcut found nothing."""
        now = self._dialect.now()
        r = _T.alias("r")
        a = _ACCOUNTS.c
        # The accounts with an upload in flight, and with a runnable request other than a
        # queued one (retrying and due, or running under a lease that ran out).
        running_live = and_(r.c.state == _fixed(State.RUNNING), r.c.lease_expires_at >= now)
        flying = select(r.c.account_id).where(running_live)
        other_runnable = select(r.c.account_id).where(
            or_(
                and_(r.c.state == _fixed(State.RETRYING), r.c.not_before <= now),
                and_(r.c.state == _fixed(State.RUNNING), r.c.lease_expires_at < now),
            )
        )
        may_run = and_(
            a.enabled.is_(True),
            a.id.not_in(bindparam("tried", expanding=True)),
            or_(
                _oldest(r, a.id, State.QUEUED, r.c.not_before <= now).is_not(None),
                a.id.in_(other_runnable),
            ),
        )

        def free_from(start: Any) -> Any:
            return (
                select(a.id, a.max_in_flight)
                .where(
                    start,
                    may_run,
                    a.id.not_in(flying),
                    or_(a.max_in_flight.is_(None), a.max_in_flight > 0),
                )
                .order_by(a.id)
                .limit(1)
                .subquery()
            )

        counts = (
            select(r.c.account_id, func.count().label("n"))
            .where(running_live)
            .group_by(r.c.account_id)
            .cte("in_flight")
        )
        in_flight = func.coalesce(counts.c.n, 0)
        # Fewest uploads in flight first; among equals, round-robin: the accounts after
        # the one served last, then from the first again.
        fewest = (
            select(a.id, a.max_in_flight)
            .select_from(_ACCOUNTS.outerjoin(counts, counts.c.account_id == a.id))
            .where(may_run, or_(a.max_in_flight.is_(None), in_flight < a.max_in_flight))
            .order_by(in_flight, a.id <= bindparam("after"), a.id)
            .limit(1)
            .subquery()
        )
        after = free_from(a.id > bindparam("after"))
        before = free_from(a.id <= bindparam("after"))
        return select(after).union_all(select(before), select(fewest)).limit(1)

    def _claim_statement(self, lease_seconds: float) -> Any:
        """The claim of one account's oldest runnable request, if the account is still
        enabled and under its limit. Parameters: owner, account."""
        now = self._dialect.now()
        r, probe = _T.alias("r"), _T.alias("p")
        first = self._dialect.least(*_oldest_runnable(probe, bindparam("account"), now))
        runnable = or_(
            and_(r.c.state.in_([_fixed(s) for s in WAITING_STATES]), r.c.not_before <= now),
            and_(r.c.state == _fixed(State.RUNNING), r.c.lease_expires_at < now),
        )
        # From the oldest runnable request on, in id order (ix_..._account_id_id): on
        # PostgreSQL a concurrent claim may hold it, and the next one is taken instead.
        pick = (
            select(r.c.id)
            .where(r.c.account_id == bindparam("account"), r.c.id >= first, runnable)
            .order_by(r.c.account_id, r.c.id)
            .limit(1)
        )
        pick = self._dialect.skip_locked(pick)
        allowed = (
            select(_ACCOUNTS.c.id)
            .where(
                _ACCOUNTS.c.id == bindparam("account"),
                _ACCOUNTS.c.enabled.is_(True),
                or_(
                    _ACCOUNTS.c.max_in_flight.is_(None),
                    _in_flight(r, bindparam("account"), now) < _ACCOUNTS.c.max_in_flight,
                ),
            )
            .exists()
        )
        # A claim of a running request takes over a lease that ran out: its worker died.
        # Unless the lease was the claimer's own: it is alive, its heartbeats could not
        # reach the database for a while, and its upload goes on (no attempt, no death).
        running = _T.c.state == State.RUNNING.value
        own = and_(running, _T.c.lease_owner == bindparam("owner"))
        expired = case((and_(running, _T.c.lease_owner != bindparam("owner")), 1), else_=0)
        return (
            update(_T)
            .where(_T.c.id == pick.scalar_subquery(), allowed)
            .values(
                state=State.RUNNING.value,
                lease_owner=bindparam("owner"),
                lease_expires_at=self._dialect.now(lease_seconds),
                attempts=_T.c.attempts + case((own, 0), else_=1),
                lease_expiries=_T.c.lease_expiries + expired,
                message=UPLOADING_MESSAGE,
                updated_at=now,
            )
            .returning(
                _T.c.id,
                _T.c.account_id,
                _T.c.path,
                _T.c.destination_path,
                _T.c.bucket,
                _T.c.acl,
                _T.c.metadata_json,
                _T.c.callback,
                _T.c.attempts,
                _T.c.lease_expiries,
                # The column, not "multipart_json IS NOT NULL": SQLite 3.40 evaluates that
                # wrongly in RETURNING (1 for a NULL column added by ALTER TABLE).
                _T.c.multipart_json,
                _T.c.options_json,
            )
        )

    def claim(self, owner: str, lease_seconds: float) -> Claimed | None:
        """Lease the next request by the fairness rule of core.ports.QueueStorePort.claim
        (due, expired and in flight judged by the database's clock, which also sets the
        lease: a worker's own clock, fast or slow, cannot steal a live lease); None when no
        account has a request it may run now."""
        statement = self._claims.get(lease_seconds)
        if statement is None:
            statement = self._claims[lease_seconds] = self._claim_statement(lease_seconds)
        tried: list[int] = []
        row = None
        # Another try only on PostgreSQL, where a concurrent claim can fill the account's
        # last slot or hold its runnable requests between the pick and the claim. Each try
        # is a transaction of its own, holding one account's lock at most: no deadlock.
        while row is None and len(tried) < _CLAIM_TRIES:
            with write_transaction(self._engine) as conn:
                pick = conn.execute(
                    self._pick, {"after": self._last_account, "tried": tried}
                ).first()
                if pick is None:
                    return None
                if pick.max_in_flight is not None and self._lock_account is not None:
                    conn.execute(self._lock_account, {"account": pick.id})
                row = conn.execute(statement, {"owner": owner, "account": pick.id}).first()
            tried.append(pick.id)
        if row is None:
            return None
        self._last_account = row.account_id
        return Claimed(
            id=row.id,
            account_id=row.account_id,
            path=row.path,
            destination_path=row.destination_path,
            bucket=row.bucket,
            acl=row.acl,
            metadata=json.loads(row.metadata_json or "{}"),
            callback=row.callback,
            attempts=row.attempts,
            has_checkpoint=row.multipart_json is not None,
            lease_expiries=row.lease_expiries,
            options=json.loads(row.options_json) if row.options_json else {},
        )

    def _update_of(self, columns: tuple[str, ...], timed: tuple[str, ...]) -> Any:
        """The UPDATE of ``columns`` of a request we lease, built once per set of columns
        (building one costs more than running it); the ``timed`` ones are set to the
        database's time plus their parameter. Parameters: rid, owner, new_<column>."""
        statement = self._updates.get((columns, timed))
        if statement is None:
            values = {
                name: self._dialect.now(bindparam(f"new_{name}", type_=Float))
                if name in timed
                else bindparam(f"new_{name}")
                for name in columns
            }
            statement = update(_T).where(_LEASED).values(values)
            self._updates[(columns, timed)] = statement
        return statement

    def _change(
        self,
        request_id: int,
        owner: str,
        *,
        drop_parts: bool = False,
        completed_upload: str | None = None,
        event: Event | None = None,
        **values: Any,
    ) -> None:
        """Update our leased request; with ``drop_parts`` also forget its multipart ledger,
        in the same transaction, recording a checkpoint still there as an orphan unless
        its upload is ``completed_upload`` (the caller sets multipart_json to NULL); with
        ``event`` add that step to its history.
        Values are plain values, ``_DbNow`` (the database's time), or SQL expressions (then
        the statement is not cached)."""
        with write_transaction(self._engine) as conn:
            if drop_parts:
                lease = {"rid": request_id, "owner": owner, "completed": completed_upload}
                statement = record_checkpoint(
                    self._dialect, _LEASED, except_completed=completed_upload is not None
                )
                conn.execute(statement, lease)
            self._write(conn, request_id, owner, values)
            if drop_parts:
                conn.execute(delete(_P).where(_P.c.request_id == request_id))
            if event is not None:
                record_event(conn, self._dialect, request_id, event)

    def _write(self, conn: Any, request_id: int, owner: str, values: dict[str, Any]) -> None:
        """``_change``'s UPDATE on an open transaction; LeaseLost when no row changed."""
        params: dict[str, Any] = {"rid": request_id, "owner": owner}
        if any(isinstance(v, ClauseElement) for v in values.values()):
            statement = update(_T).where(_LEASED).values(**values)
        else:
            timed = tuple(sorted(k for k, v in values.items() if isinstance(v, _DbNow)))
            statement = self._update_of(tuple(sorted(values)), timed)
            params |= {
                f"new_{k}": v.seconds if isinstance(v, _DbNow) else v for k, v in values.items()
            }
        if conn.execute(statement, params).rowcount != 1:
            raise LeaseLost(f"request {request_id} is no longer leased by {owner}")

    def heartbeat(
        self,
        request_id: int,
        owner: str,
        lease_seconds: float,
        *,
        bytes_done: int | None = None,
        bytes_total: int | None = None,
    ) -> None:
        """Extend the lease (on the database's clock), and record progress when given."""
        values: dict[str, Any] = {"lease_expires_at": _DbNow(lease_seconds)}
        if bytes_done is not None:
            values.update(bytes_done=bytes_done, bytes_total=bytes_total, updated_at=_DB_NOW)
        self._change(request_id, owner, **values)

    # -- outcomes --------------------------------------------------------------------------

    def succeed(
        self,
        request_id: int,
        owner: str,
        *,
        results: dict[str, str],
        http_status: int,
        sha256: str,
        size: int,
        has_callback: bool,
        completed_upload: str | None = None,
    ) -> None:
        self._change(
            request_id,
            owner,
            drop_parts=True,
            completed_upload=completed_upload,
            event=Event.SUCCEEDED,
            **outcomes.succeeded(
                results=results,
                http_status=http_status,
                sha256=sha256,
                size=size,
                has_callback=has_callback,
                now=_DB_NOW,
                new_msg_id=new_message_id,
            ),
        )

    def fail(
        self,
        request_id: int,
        owner: str,
        *,
        message: str,
        http_status: int | None,
        code: str | None,
        has_callback: bool,
    ) -> None:
        self._change(
            request_id,
            owner,
            drop_parts=True,
            event=Event.FAILED,
            **outcomes.failed(
                message=message,
                http_status=http_status,
                code=code,
                has_callback=has_callback,
                now=_DB_NOW,
                new_msg_id=new_message_id,
            ),
        )

    def retry_later(
        self,
        request_id: int,
        owner: str,
        *,
        delay: float,
        cause: str,
        max_attempts: int,
        http_status: int | None,
        code: str | None,
        refund_attempt: bool = False,
    ) -> datetime:
        """Due ``delay`` seconds from now by the database's clock; the message names that
        time, so it is read from the database first, in the same transaction. With
        ``refund_attempt`` the attempt does not count (the database cut it short)."""
        with write_transaction(self._engine) as conn:
            found = conn.execute(
                self._retry_time, {"rid": request_id, "owner": owner, "delay": delay}
            ).first()
            if found is None:
                raise LeaseLost(f"request {request_id} is no longer leased by {owner}")
            at: datetime = found.at
            message = retrying_message(
                at=at,
                attempt=found.attempts + (0 if refund_attempt else 1),
                max_attempts=max_attempts,
                cause=cause,
            )
            self._write(
                conn,
                request_id,
                owner,
                {
                    "state": State.RETRYING.value,
                    "not_before": at,
                    "message": message,
                    "http_status": http_status or 0,
                    "error_code": code,
                    "lease_owner": None,
                    "lease_expires_at": None,
                    "updated_at": _DB_NOW,
                    **({"attempts": found.attempts - 1} if refund_attempt else {}),
                },
            )
            record_event(conn, self._dialect, request_id, Event.RETRYING)
        return at

    def release(self, request_id: int, owner: str) -> None:
        """Give a request back untouched (shutdown): it does not count as an attempt."""
        now = self._dialect.now()  # due at once by the clock claims are judged by
        self._change(
            request_id,
            owner,
            state=State.QUEUED.value,
            not_before=now,
            attempts=_T.c.attempts - 1,
            message=QUEUED_MESSAGE,
            lease_owner=None,
            lease_expires_at=None,
            updated_at=now,
        )

    # -- callbacks -------------------------------------------------------------------------

    def _callback_claim(self, lease_seconds: float) -> Any:
        """The claim of a due callback, built once per lease length. Parameter: msg_id."""
        statement = self._callback_claims.get(lease_seconds)
        if statement is None:
            pick = self._dialect.skip_locked(self._due_callback)
            statement = (
                update(_T)
                .where(_T.c.id == pick.scalar_subquery())
                .values(
                    callback_next_at=self._dialect.now(lease_seconds),
                    # A row made due without an id (before ids were fixed at due time) gets
                    # one here, in the claim itself: the first claimer's id sticks.
                    callback_msg_id=func.coalesce(_T.c.callback_msg_id, bindparam("msg_id")),
                )
                .returning(
                    _T.c.id,
                    _T.c.account_id,
                    _T.c.callback,
                    _T.c.callback_attempts,
                    _T.c.callback_msg_id,
                )
            )
            self._callback_claims[lease_seconds] = statement
        return statement

    def claim_callback(self, lease_seconds: float) -> DueCallback | None:
        """Take a due callback by pushing its next time past the lease: a crashed deliverer's
        callback becomes due again when the lease runs out. Due and lease are both judged
        by the database's clock."""
        # A read first spares a write lock (SQLite) or a row lock (PostgreSQL) when, as
        # usual, nothing is due.
        with read(self._engine) as conn:
            if conn.execute(self._due_callback).first() is None:
                return None
        with write_transaction(self._engine) as conn:
            row = conn.execute(
                self._callback_claim(lease_seconds), {"msg_id": new_message_id()}
            ).first()
        if row is None:
            return None
        return DueCallback(
            id=row.id,
            account_id=row.account_id,
            callback=row.callback,
            attempts=row.callback_attempts,
            msg_id=row.callback_msg_id,
        )

    def record_callback(
        self,
        request_id: int,
        *,
        msg_id: str,
        at: datetime,
        ok: bool,
        http_status: int | None,
        error: str | None,
        duration: float,
        next_delay: float | None,
        permanent: bool = False,
    ) -> str:
        """Record one attempt and move the callback on (a next try due ``next_delay``
        seconds from now by the database's clock); returns its new state.

        The attempt (its row and the count) is recorded whatever happens: the POST was made,
        and aws.status must say so even when this worker lost the callback lease and another
        one re-sent it. Only the state transition is guarded: it needs the callback still
        pending under this delivery id, else LeaseLost (after the attempt is committed). The
        count is that of the current delivery's schedule: the late POST of a delivery since
        redelivered under another id (aws.redeliver) is kept in the history only."""
        state = (
            CallbackState.DELIVERED
            if ok
            else (
                CallbackState.PENDING
                if next_delay is not None and not permanent
                else CallbackState.FAILED
            )
        ).value
        next_at = self._dialect.now(next_delay) if next_delay is not None else None
        with write_transaction(self._engine) as conn:
            counted = conn.execute(
                update(_T)
                .where(_T.c.id == request_id)
                .values(
                    callback_attempts=_T.c.callback_attempts
                    + case((_T.c.callback_msg_id == msg_id, 1), else_=0)
                )
            )
            if counted.rowcount != 1:
                raise LeaseLost(f"request {request_id} is gone")
            conn.execute(
                insert(_A).values(
                    request_id=request_id,
                    at=at,
                    ok=ok,
                    http_status=http_status,
                    error=error,
                    duration=duration,
                )
            )
            moved = conn.execute(
                update(_T)
                .where(
                    _T.c.id == request_id,
                    _T.c.callback_state == _PENDING,
                    _T.c.callback_msg_id == msg_id,
                )
                .values(
                    callback_state=state,
                    callback_next_at=next_at if state == _PENDING else None,
                    callback_last_error=None if ok else error,
                )
            ).rowcount
        if moved != 1:
            raise LeaseLost(f"callback of request {request_id} is no longer pending")
        return state

    def callback_attempts(self, request_id: int) -> list[dict[str, Any]]:
        with read(self._engine) as conn:
            rows = conn.execute(
                select(_A).where(_A.c.request_id == request_id).order_by(_A.c.id)
            ).mappings()
            return [dict(row) for row in rows]

    # -- operator views --------------------------------------------------------------------

    def depth(self, *, live_only: bool = False) -> dict[str, int]:
        """Requests by state, pending callbacks, and how many of the queued requests and
        pending callbacks are held because their account is disabled. ``live_only``: the
        states a request is on its way in (queued, retrying, running) only, read through
        the claim's index instead of counting every request ever made."""
        held = not_(_ACCOUNT_ENABLED)
        states = [s.value for s in State]
        if live_only:
            states = [*WAITING_STATES, State.RUNNING.value]
        counting = select(_T.c.state, func.count()).group_by(_T.c.state)
        if live_only:
            counting = counting.where(_T.c.state.in_(states))
        with read(self._engine) as conn:
            counts = {state: count for state, count in conn.execute(counting)}
            pending = conn.execute(
                select(func.count()).where(_T.c.callback_state == _PENDING)
            ).scalar_one()
            held_requests = conn.execute(
                select(func.count()).where(_T.c.state.in_(WAITING_STATES), held)
            ).scalar_one()
            held_callbacks = conn.execute(
                select(func.count()).where(_T.c.callback_state == _PENDING, held)
            ).scalar_one()
        result = {state: counts.get(state, 0) for state in states}
        result["callbacks_pending"] = pending
        result["held_account_disabled"] = held_requests
        result["callbacks_held_account_disabled"] = held_callbacks
        return result

    def oldest_due_seconds(self) -> float:
        """How long (seconds, the database's clock) the request that has been due longest
        without a worker has waited: queued or retrying, past its due time. 0.0 when none
        waits. Read from the claim's index (state, not_before)."""
        now = self._dialect.now()
        query = select(func.min(_T.c.not_before).label("since"), now.label("now")).where(
            _T.c.state.in_(WAITING_STATES), _T.c.not_before <= now
        )
        with read(self._engine) as conn:
            row = conn.execute(query).one()
        if row.since is None:
            return 0.0
        since, current = row.since, row.now
        if isinstance(since, str):  # SQLite's min() loses the column's type
            since = datetime.fromisoformat(since)
        return max(0.0, (current - since).total_seconds())

    def has_work(self) -> bool:
        """Anything a burst worker should still wait for: queued requests (retries
        included), leased ones, or callbacks due now; not what a disabled account holds."""
        now = self._dialect.now()
        with read(self._engine) as conn:
            busy = conn.execute(
                select(_T.c.id)
                .where(
                    or_(
                        _T.c.state.in_((*WAITING_STATES, State.RUNNING.value)),
                        and_(_T.c.callback_state == _PENDING, _T.c.callback_next_at <= now),
                    ),
                    _ACCOUNT_ENABLED,
                )
                .limit(1)
            ).first()
        return busy is not None


# Built once: a single-PUT upload looks for a checkpoint too.
_LEDGER_HEADER = select(_T.c.multipart_json).where(_T.c.id == bindparam("rid"))
_LEDGER_PARTS = select(_P).where(_P.c.request_id == bindparam("rid"))
_LEDGER_CLEAR = update(_T).where(_LEASED).values(multipart_json=None)


@functools.cache
def _ledger_confirm(db: dialect.Dialect) -> Any:
    """DbLedger.confirm's UPDATE, built once per dialect. Parameters: rid, owner."""
    now = db.now()
    return (
        update(_T)
        .where(_LEASED, _T.c.lease_expires_at > now)
        .values(message=FINISHING_MESSAGE, updated_at=now)
    )


class DbLedger:
    """The uploader's PartLedger on the database: the checkpoint header on the request row,
    one upload_parts row per stored part. Thread-safe (each call is its own transaction)."""

    def __init__(self, engine: Engine, request_id: int, owner: str, *, empty: bool = False) -> None:
        """``empty``: the claim showed no checkpoint, so until ``begin`` none is looked up
        (every single-PUT upload asks)."""
        self._engine = engine
        self._request_id = request_id
        self._owner = owner
        self._dialect = dialect.for_engine(engine)
        self._lock = threading.Lock()  # SQLite: one writer at a time anyway
        self._empty = empty

    def load(self) -> MultipartCheckpoint | None:
        if self._empty:
            return None
        with read(self._engine) as conn:
            header = conn.execute(_LEDGER_HEADER, {"rid": self._request_id}).scalar()
            if not header:
                return None
            parts = conn.execute(_LEDGER_PARTS, {"rid": self._request_id}).all()
        data = json.loads(header)
        data["parts"] = {
            str(p.part_number): {
                "etag": p.etag,
                "checksum_sha256": p.checksum_sha256,
                "size": p.size,
            }
            for p in parts
        }
        return MultipartCheckpoint.from_dict(data)

    def begin(self, checkpoint: MultipartCheckpoint) -> None:
        header = checkpoint.to_dict()
        parts = header.pop("parts")
        with write_transaction(self._engine) as conn:
            result = conn.execute(
                update(_T).where(_LEASED).values(multipart_json=json.dumps(header)),
                {"rid": self._request_id, "owner": self._owner},
            )
            if result.rowcount != 1:
                raise LeaseLost(f"request {self._request_id} is no longer leased")
            conn.execute(delete(_P).where(_P.c.request_id == self._request_id))
            for number, part in parts.items():
                conn.execute(
                    insert(_P).values(request_id=self._request_id, part_number=int(number), **part)
                )
        self._empty = False

    def part_done(self, part_number: int, record: PartRecord) -> None:
        values = {
            "request_id": self._request_id,
            "part_number": part_number,
            "etag": record.etag,
            "checksum_sha256": record.checksum_sha256,
            "size": record.size,
        }
        statement = self._dialect.upsert(
            _P,
            values,
            keys=[_P.c.request_id, _P.c.part_number],
            update=["etag", "checksum_sha256", "size"],
        )
        with self._lock, write_transaction(self._engine) as conn:
            # The lease row is locked first (PostgreSQL: a takeover waits for this commit),
            # so a worker that lost its lease cannot write into the new holder's ledger.
            self._hold(conn)
            conn.execute(statement)

    def clear(self) -> None:
        with write_transaction(self._engine) as conn:
            result = conn.execute(_LEDGER_CLEAR, self._params)
            if result.rowcount != 1:
                raise self._lost()
            conn.execute(delete(_P).where(_P.c.request_id == self._request_id))
        self._empty = True

    def give_up(self) -> None:
        with write_transaction(self._engine) as conn:
            conn.execute(record_checkpoint(self._dialect, _LEASED), self._params)
            result = conn.execute(_LEDGER_CLEAR, self._params)
            if result.rowcount != 1:
                raise self._lost()
            conn.execute(delete(_P).where(_P.c.request_id == self._request_id))
        self._empty = True

    def confirm(self) -> None:
        """Before the final S3 call: the lease is still ours and has not run out by the
        database's clock, else LeaseLost. A write, not a read: it marks the request as
        finishing (its message), so that a cancel is serialized with it by the row's lock
        and refused from here on: the object may be written at any moment."""
        with write_transaction(self._engine) as conn:
            if conn.execute(_ledger_confirm(self._dialect), self._params).rowcount != 1:
                raise self._lost()

    @property
    def _params(self) -> dict[str, Any]:
        return {"rid": self._request_id, "owner": self._owner}

    def _lost(self) -> LeaseLost:
        return LeaseLost(f"request {self._request_id} is no longer leased by {self._owner}")

    def _hold(self, conn: Any) -> None:
        held = conn.execute(self._dialect.for_update(select(_T.c.id).where(_LEASED)), self._params)
        if held.first() is None:
            raise self._lost()
