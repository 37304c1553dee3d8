"""core.ports.RequestStorePort, QueueStorePort and the part ledger of a request, in memory."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

from vodpush.core import outcomes
from vodpush.core.callbacks import (
    REDELIVERED_EVENT,
    AttemptRecord,
    CallbackHistory,
    Redelivery,
    RedeliveryResult,
    judge_redelivery,
)
from vodpush.core.checkpoint import MultipartCheckpoint, PartRecord
from vodpush.core.filters import RequestFilter
from vodpush.core.ports import StatusRow
from vodpush.core.records import (
    FINISHING_MESSAGE,
    QUEUED_MESSAGE,
    UPLOADING_MESSAGE,
    retrying_message,
)
from vodpush.core.requests import (
    CANCELABLE_STATES,
    IDEMPOTENCY_WINDOW_SECONDS,
    RETRYABLE_STATES,
    WAITING_STATES,
    CallbackState,
    Claimed,
    DueCallback,
    Enqueued,
    Event,
    IdempotencyConflict,
    LeaseLost,
    NewRequest,
    RequestEvent,
    State,
    StateChange,
)
from vodpush.memory.tables import PENDING, REQUEST_FIELDS, RequestRow, StatusTuple, Tables
from vodpush.webhooks import new_message_id


class MemoryRequestStore:
    """core.ports.RequestStorePort in memory."""

    def __init__(self, tables: Tables) -> None:
        self._t = tables
        self.on_enqueue: Callable[[], None] | None = None

    def enqueue(self, new: NewRequest) -> Enqueued:
        now = self._t.now()
        with self._t.lock:
            for row in self._t.requests.values():
                if row.account_id == new.account_id and row.signature == new.signature:
                    return Enqueued(id=row.id, replayed=True)
            if new.account_id not in self._t.accounts:
                raise LookupError(f"no account {new.account_id}")  # the database's foreign key
            if new.idempotency_key is not None:
                earlier = self._take_key(new, now)
                if earlier is not None:
                    return Enqueued(id=earlier, replayed=True)
            request_id = self._t.next_request
            self._t.next_request += 1
            self._t.requests[request_id] = RequestRow(
                id=request_id,
                account_id=new.account_id,
                cdn_id=new.cdn_id,
                path=new.path,
                destination_path=new.destination_path,
                bucket=new.bucket,
                acl=new.acl,
                metadata_json=json.dumps(new.metadata, ensure_ascii=False),
                callback=new.callback,
                signature=new.signature,
                options_json=json.dumps(new.options, ensure_ascii=False) if new.options else None,
                idempotency_key=new.idempotency_key,
                idempotency_hash=new.idempotency_hash if new.idempotency_key else None,
                created_at=now,
                updated_at=now,
                not_before=now,
            )
            self._t.add_event(self._t.requests[request_id], Event.QUEUED)
        if self.on_enqueue is not None:
            self.on_enqueue()
        return Enqueued(id=request_id, replayed=False)

    def _take_key(self, new: NewRequest, now: datetime) -> int | None:
        """Under the lock: the request holding ``new``'s key within the window with the same
        fields (IdempotencyConflict with others), or None when the key is free; an older
        holder gives it up (persistence.requests.RequestStore._take_key)."""
        window = timedelta(seconds=IDEMPOTENCY_WINDOW_SECONDS)
        for row in self._t.requests.values():
            if row.account_id != new.account_id or row.idempotency_key != new.idempotency_key:
                continue
            if row.created_at > now - window:
                if row.idempotency_hash != new.idempotency_hash:
                    raise IdempotencyConflict(new.idempotency_key)
                return row.id
            row.idempotency_key = row.idempotency_hash = None
            return None
        return None

    def replayed(self, account_id: int, signature: str) -> int | None:
        with self._t.lock:
            for row in self._t.requests.values():
                if row.account_id == account_id and row.signature == signature:
                    return row.id
        return None

    @staticmethod
    def _status(row: RequestRow) -> StatusRow:
        return StatusTuple._make(getattr(row, name) for name in StatusTuple._fields)  # type: ignore[no-any-return]

    def _matching(
        self,
        account_id: int,
        request_id: int | None,
        filters: RequestFilter | None,
        before_id: int | None,
    ) -> list[RequestRow]:
        """The account's requests that meet every condition, newest first (lock held)."""
        if request_id is not None:
            row = self._t.requests.get(request_id)
            candidates = [row] if row is not None else []
        else:
            candidates = list(self._t.requests.values())
        mine = [
            r
            for r in candidates
            if r.account_id == account_id
            and (before_id is None or r.id < before_id)
            and (filters is None or filters.matches(r))
        ]
        mine.sort(key=lambda r: r.id, reverse=True)
        return mine

    def list_for_account(
        self,
        account_id: int,
        *,
        limit: int,
        offset: int,
        request_id: int | None = None,
        filters: RequestFilter | None = None,
        before_id: int | None = None,
    ) -> Sequence[StatusRow]:
        with self._t.lock:
            mine = self._matching(account_id, request_id, filters, before_id)
            if request_id is not None:
                return [self._status(r) for r in mine]  # the page does not apply
            return [self._status(r) for r in mine[offset : offset + limit]]

    def count_for_account(
        self,
        account_id: int,
        *,
        request_id: int | None = None,
        filters: RequestFilter | None = None,
    ) -> int:
        with self._t.lock:
            return len(self._matching(account_id, request_id, filters, None))

    def get(self, request_id: int) -> StatusRow | None:
        with self._t.lock:
            row = self._t.requests.get(request_id)
            return None if row is None else self._status(row)

    def _mine(self, request_id: int, account_id: int | None) -> RequestRow | None:
        row = self._t.requests.get(request_id)
        if row is None or (account_id is not None and row.account_id != account_id):
            return None
        return row

    def _drop_checkpoint(self, row: RequestRow) -> None:
        # Before the values drop it; due when a worker's lease runs out, as the database's.
        self._t.record_checkpoint(row, after_lease=True)
        row.parts.clear()

    def cancel(self, request_id: int, *, account_id: int | None, message: str) -> StateChange:
        now = self._t.now()
        with self._t.lock:
            row = self._mine(request_id, account_id)
            if row is None:
                return StateChange(found=None, changed=False)
            found = row.state
            if found not in CANCELABLE_STATES:
                return StateChange(found=found, changed=False)
            finishing = (
                row.message == FINISHING_MESSAGE
                and row.lease_expires_at is not None
                and row.lease_expires_at > now
            )
            if found == State.RUNNING.value and finishing:
                return StateChange(found=found, changed=False, finishing=True)
            self._drop_checkpoint(row)
            values = outcomes.canceled(
                message=message,
                has_callback=bool(row.callback),
                now=now,
                new_msg_id=new_message_id,
            )
            _assign(row, values)
            self._t.add_event(row, Event.CANCELED)
            after = self._status(row)
        return StateChange(found=found, changed=True, row=after)

    def retry(self, request_id: int, *, account_id: int | None) -> StateChange:
        now = self._t.now()
        with self._t.lock:
            row = self._mine(request_id, account_id)
            if row is None:
                return StateChange(found=None, changed=False)
            found = row.state
            if found not in RETRYABLE_STATES:
                return StateChange(found=found, changed=False)
            self._drop_checkpoint(row)
            _assign(row, outcomes.requeued(now))
            self._t.add_event(row, Event.RETRIED)
            after = self._status(row)
        if self.on_enqueue is not None:
            self.on_enqueue()
        return StateChange(found=found, changed=True, row=after)

    def events(self, request_id: int) -> list[RequestEvent]:
        with self._t.lock:
            row = self._t.requests.get(request_id)
            logged = [] if row is None else [dict(e) for e in row.events]
        return [RequestEvent(request_id=request_id, **e) for e in logged]

    def callback_history(
        self, account_id: int, request_id: int, *, limit: int
    ) -> CallbackHistory | None:
        with self._t.lock:
            row = self._mine(request_id, account_id)
            if row is None:
                return None
            redelivered = [e["at"] for e in row.events if e["event"] == REDELIVERED_EVENT]
            return CallbackHistory(
                id=row.id,
                state=row.state,
                callback=row.callback,
                callback_state=row.callback_state,
                callback_attempts=row.callback_attempts,
                next_at=row.callback_next_at,
                msg_id=row.callback_msg_id,
                last_error=row.callback_last_error,
                total=len(row.callback_log),
                redeliveries=len(redelivered),
                last_redelivered=max(redelivered, default=None),
                attempts=tuple(
                    AttemptRecord(
                        at=a["at"],
                        ok=a["ok"],
                        http_status=a["http_status"],
                        error=a["error"],
                        duration=a["duration"],
                    )
                    for a in reversed(row.callback_log[-limit:])
                ),
            )

    def redeliver_callback(
        self, account_id: int, request_id: int, *, msg_id: str, limit: int, window: float
    ) -> RedeliveryResult:
        now = self._t.now()
        with self._t.lock:
            row = self._mine(request_id, account_id)
            if row is None:
                return RedeliveryResult(Redelivery.NOT_FOUND)
            refused = judge_redelivery(
                state=row.state,
                callback=row.callback,
                callback_state=row.callback_state,
                msg_id=row.callback_msg_id,
                next_at=row.callback_next_at,
                new_msg_id=msg_id,
            )
            if refused is not None:
                return refused
            since = now - timedelta(seconds=window)
            recent = [
                e["at"] for e in row.events if e["event"] == REDELIVERED_EVENT and e["at"] > since
            ]
            if len(recent) >= limit:
                allowed = min(recent) + timedelta(seconds=window)
                return RedeliveryResult(
                    Redelivery.TOO_MANY,
                    state=row.state,
                    callback_state=row.callback_state,
                    msg_id=row.callback_msg_id,
                    at=allowed,
                    redeliveries=len(recent),
                    retry_after=max((allowed - now).total_seconds(), 0.0),
                )
            row.callback_state = PENDING
            row.callback_next_at = now
            row.callback_attempts = 0
            row.callback_msg_id = msg_id
            row.callback_last_error = None
            row.events.append(
                {
                    "at": now,
                    "event": REDELIVERED_EVENT,
                    "state": row.state,
                    "attempts": row.attempts,
                    "message": f"callback redelivered as {msg_id}",
                    "error_code": None,
                }
            )
            return RedeliveryResult(
                Redelivery.QUEUED, state=row.state, callback_state=PENDING, msg_id=msg_id, at=now
            )


def _assign(row: RequestRow, values: dict[str, Any]) -> None:
    for name, value in values.items():
        assert name in REQUEST_FIELDS, name
        setattr(row, name, value)


class MemoryQueueStore:
    """core.ports.QueueStorePort in memory."""

    def __init__(self, tables: Tables) -> None:
        self._t = tables
        # The account of this store's previous claim: the round-robin goes on after it.
        self._last_account = 0

    def _pick(self, now: datetime) -> RequestRow | None:
        """The oldest runnable request of the account whose turn it is (the rule of
        core.ports.QueueStorePort.claim), as the database's two statements find it."""
        oldest: dict[int, RequestRow] = {}
        in_flight: dict[int, int] = {}
        for row in self._t.requests.values():
            account, lease = row.account_id, row.lease_expires_at
            running = row.state == State.RUNNING.value and lease is not None
            if running and lease >= now:  # type: ignore[operator]
                in_flight[account] = in_flight.get(account, 0) + 1
            due = (row.state in WAITING_STATES and row.not_before <= now) or (
                running and lease < now  # type: ignore[operator]
            )
            if due and (account not in oldest or row.id < oldest[account].id):
                oldest[account] = row
        candidates = [
            account
            for account in oldest
            if self._t.account_enabled(account)
            and in_flight.get(account, 0) < self._t.max_in_flight(account)
        ]
        if not candidates:
            return None
        turn = min(
            candidates,
            key=lambda a: (in_flight.get(a, 0), a <= self._last_account, a),
        )
        self._last_account = turn
        return oldest[turn]

    def claim(self, owner: str, lease_seconds: float) -> Claimed | None:
        now = self._t.now()
        with self._t.lock:
            row = self._pick(now)
            if row is None:
                return None
            # Taking back our own lease (the database was away, not the worker): the
            # attempt goes on. Another worker's: it died or hung.
            own = row.state == State.RUNNING.value and row.lease_owner == owner
            if row.state == State.RUNNING.value and not own:
                row.lease_expiries += 1
            row.state = State.RUNNING.value
            row.lease_owner = owner
            row.lease_expires_at = now + timedelta(seconds=lease_seconds)
            row.attempts += 0 if own else 1
            row.message = UPLOADING_MESSAGE
            row.updated_at = now
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

    def _change(
        self,
        request_id: int,
        owner: str,
        *,
        drop_parts: bool = False,
        completed_upload: str | None = None,
        event: Event | None = None,
        **values: Any,
    ) -> RequestRow:
        with self._t.lock:
            row = self._t.leased(request_id, owner)
            if drop_parts:  # before the values drop it
                self._t.record_checkpoint(row, completed=completed_upload)
            _assign(row, values)
            if drop_parts:
                row.parts.clear()
            if event is not None:
                self._t.add_event(row, event)
            return row

    def heartbeat(
        self,
        request_id: int,
        owner: str,
        lease_seconds: float,
        *,
        bytes_done: int | None = None,
        bytes_total: int | None = None,
    ) -> None:
        now = self._t.now()
        values: dict[str, Any] = {"lease_expires_at": now + timedelta(seconds=lease_seconds)}
        if bytes_done is not None:
            values.update(bytes_done=bytes_done, bytes_total=bytes_total, updated_at=now)
        self._change(request_id, owner, **values)

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
                now=self._t.now(),
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
                now=self._t.now(),
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
        now = self._t.now()
        at = now + timedelta(seconds=delay)
        with self._t.lock:
            attempts = self._t.leased(request_id, owner).attempts
            row = self._change(
                request_id,
                owner,
                state=State.RETRYING.value,
                not_before=at,
                message=retrying_message(
                    at=at,
                    attempt=attempts + (0 if refund_attempt else 1),
                    max_attempts=max_attempts,
                    cause=cause,
                ),
                http_status=http_status or 0,
                error_code=code,
                lease_owner=None,
                lease_expires_at=None,
                updated_at=now,
            )
            row.attempts -= refund_attempt
            self._t.add_event(row, Event.RETRYING)
        return at

    def release(self, request_id: int, owner: str) -> None:
        now = self._t.now()
        with self._t.lock:
            row = self._change(
                request_id,
                owner,
                state=State.QUEUED.value,
                not_before=now,
                message=QUEUED_MESSAGE,
                lease_owner=None,
                lease_expires_at=None,
                updated_at=now,
            )
            row.attempts -= 1

    def _due_callback(self, now: datetime) -> RequestRow | None:
        due = [
            r
            for r in self._t.requests.values()
            if r.callback_state == PENDING
            and r.callback_next_at is not None
            and r.callback_next_at <= now
            and self._t.account_enabled(r.account_id)
        ]
        return min(due, key=lambda r: (r.callback_next_at, r.id), default=None)

    def claim_callback(self, lease_seconds: float) -> DueCallback | None:
        now = self._t.now()
        with self._t.lock:
            row = self._due_callback(now)
            if row is None:
                return None
            row.callback_next_at = now + timedelta(seconds=lease_seconds)
            if row.callback_msg_id is None:  # made due without one: the first claim fixes it
                row.callback_msg_id = new_message_id()
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
        state = (
            CallbackState.DELIVERED
            if ok
            else (
                CallbackState.PENDING
                if next_delay is not None and not permanent
                else CallbackState.FAILED
            )
        ).value
        now = self._t.now()
        # The attempt is recorded whatever happens (the POST was made, even by a worker that
        # lost the callback lease); only the state transition is guarded.
        with self._t.lock:
            row = self._t.requests.get(request_id)
            if row is None:
                raise LeaseLost(f"request {request_id} is gone")
            row.callback_log.append(
                {
                    "id": self._t.next_attempt,
                    "request_id": request_id,
                    "at": at,
                    "ok": ok,
                    "http_status": http_status,
                    "error": error,
                    "duration": duration,
                }
            )
            self._t.next_attempt += 1
            if row.callback_msg_id == msg_id:  # a delivery since redelivered: history only
                row.callback_attempts += 1
            if row.callback_state != PENDING or row.callback_msg_id != msg_id:
                raise LeaseLost(f"callback of request {request_id} is no longer pending")
            row.callback_state = state
            row.callback_next_at = (
                now + timedelta(seconds=next_delay)
                if state == PENDING and next_delay is not None
                else None
            )
            row.callback_last_error = None if ok else error
        return state

    def callback_attempts(self, request_id: int) -> list[dict[str, Any]]:
        with self._t.lock:
            row = self._t.requests.get(request_id)
            return [] if row is None else [dict(a) for a in row.callback_log]

    def depth(self, *, live_only: bool = False) -> dict[str, int]:
        with self._t.lock:
            rows = list(self._t.requests.values())
            held = [r for r in rows if not self._t.account_enabled(r.account_id)]
        states = [*WAITING_STATES, State.RUNNING.value] if live_only else [s.value for s in State]
        result = {state: sum(r.state == state for r in rows) for state in states}
        result["callbacks_pending"] = sum(r.callback_state == PENDING for r in rows)
        result["held_account_disabled"] = sum(r.state in WAITING_STATES for r in held)
        result["callbacks_held_account_disabled"] = sum(r.callback_state == PENDING for r in held)
        return result

    def oldest_due_seconds(self) -> float:
        now = self._t.now()
        with self._t.lock:
            due = [
                r.not_before
                for r in self._t.requests.values()
                if r.state in WAITING_STATES and r.not_before <= now
            ]
        return max(0.0, (now - min(due)).total_seconds()) if due else 0.0

    def has_work(self) -> bool:
        now = self._t.now()
        busy = (*WAITING_STATES, State.RUNNING.value)
        with self._t.lock:
            return any(
                (
                    r.state in busy
                    or (
                        r.callback_state == PENDING
                        and r.callback_next_at is not None
                        and r.callback_next_at <= now
                    )
                )
                and self._t.account_enabled(r.account_id)
                for r in self._t.requests.values()
            )


class MemoryRequestLedger:
    """core.checkpoint.PartLedger of one leased request, kept on its in-memory row."""

    def __init__(self, tables: Tables, request_id: int, owner: str, *, empty: bool = False) -> None:
        self._t = tables
        self._request_id = request_id
        self._owner = owner
        self._empty = empty

    def load(self) -> MultipartCheckpoint | None:
        if self._empty:
            return None
        with self._t.lock:
            row = self._t.requests.get(self._request_id)
            if row is None or not row.multipart_json:
                return None
            header = json.loads(row.multipart_json)
            parts = dict(row.parts)
        return replace(MultipartCheckpoint.from_dict(header), parts=parts)

    def begin(self, checkpoint: MultipartCheckpoint) -> None:
        header = checkpoint.to_dict()
        header.pop("parts")
        with self._t.lock:
            row = self._t.leased(self._request_id, self._owner)
            row.multipart_json = json.dumps(header)
            row.parts = dict(checkpoint.parts)
        self._empty = False

    def part_done(self, part_number: int, record: PartRecord) -> None:
        with self._t.lock:
            self._t.leased(self._request_id, self._owner).parts[part_number] = record

    def clear(self) -> None:
        with self._t.lock:
            row = self._t.leased(self._request_id, self._owner)
            row.multipart_json = None
            row.parts.clear()
        self._empty = True

    def give_up(self) -> None:
        with self._t.lock:
            row = self._t.leased(self._request_id, self._owner)
            self._t.record_checkpoint(row)
            row.multipart_json = None
            row.parts.clear()
        self._empty = True

    def confirm(self) -> None:
        now = self._t.now()
        with self._t.lock:
            row = self._t.leased(self._request_id, self._owner)
            if row.lease_expires_at is None or row.lease_expires_at <= now:
                raise LeaseLost(f"the lease of request {self._request_id} has run out")
            # As the database's: marks the request as finishing (a cancel is refused).
            row.message = FINISHING_MESSAGE
            row.updated_at = now
