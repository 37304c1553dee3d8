"""The stores as the rest of the service sees them: what accounts, requests, the queue, the
part ledger and the orphaned multipart uploads can do, typed with core values only.
``persistence`` implements them on SQLAlchemy (SQLite, PostgreSQL), ``vodpush.memory`` in
memory; tests/test_store_contract.py holds every implementation to the same behaviour."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, Protocol

from vodpush.core.accounts import AccountRecord, S3Settings
from vodpush.core.callbacks import CallbackHistory, RedeliveryResult
from vodpush.core.checkpoint import PartLedger
from vodpush.core.filters import RequestFilter
from vodpush.core.orphans import Orphan
from vodpush.core.requests import (
    Claimed,
    DueCallback,
    Enqueued,
    NewRequest,
    RequestEvent,
    StateChange,
)

__all__ = [
    "AccountStorePort",
    "LedgerFactory",
    "Notifications",
    "OrphanStorePort",
    "PartLedger",
    "QueueStorePort",
    "RequestStorePort",
    "StatusRow",
]


class StatusRow(Protocol):
    """One request as aws.status reads it (rendered by ``core.records.render``): the
    columns by name, stored values as stored (JSON text, naive UTC times or ISO text)."""

    id: int
    cdn_id: int
    path: str
    destination_path: str
    bucket: str
    metadata_json: str | None
    acl: str
    callback: str
    message: str
    results_json: str | None
    created_at: datetime | str
    updated_at: datetime | str
    http_status: int | None
    state: str
    attempts: int
    bytes_done: int
    bytes_total: int | None
    sha256: str | None
    error_code: str | None
    callback_state: str
    callback_attempts: int
    callback_last_error: str | None
    not_before: datetime | str  # when a retrying request is next tried
    options_json: str | None  # the object options (NewRequest.options), JSON; None: none


class AccountStorePort(Protocol):
    """Who may call the API, with which secret, and where their uploads go. Lookups return
    None (``by_*``) or raise AccountError (``find`` and every change) when there is no such
    account; secrets are kept encrypted and only the ``create``/``rotate_*`` answers show
    them."""

    def by_api_key(self, api_key: str) -> AccountRecord | None: ...

    def by_id(self, account_id: int) -> AccountRecord | None: ...

    def find(self, ref: str) -> AccountRecord: ...

    def list(self) -> list[AccountRecord]: ...

    def api_secret(self, account: AccountRecord) -> str: ...

    def webhook_secret(self, account: AccountRecord) -> str: ...

    def create(
        self, *, cdn: int, username: str, s3: S3Settings | None = None
    ) -> dict[str, Any]: ...

    def set_enabled(self, ref: str, enabled: bool) -> AccountRecord: ...

    def rotate_secret(self, ref: str) -> dict[str, Any]: ...

    def set_s3(self, ref: str, s3: S3Settings) -> AccountRecord: ...

    def set_max_in_flight(self, ref: str, limit: int | None) -> AccountRecord:
        """Limit the account's uploads in flight at once, across all workers (None: no
        limit); AccountError for a limit below 1. Claims from now on keep it; uploads
        already running beyond a lowered limit go on."""
        ...

    def allow_buckets(self, ref: str, patterns: list[str]) -> AccountRecord: ...

    def disallow_buckets(self, ref: str, patterns: list[str]) -> AccountRecord: ...

    def rotate_webhook_secret(self, ref: str, *, clear: bool = False) -> dict[str, Any]: ...

    def rename(self, ref: str, new_username: str) -> AccountRecord: ...

    def ensure_unique_usernames(self) -> list[str]: ...


class RequestStorePort(Protocol):
    """Upload requests as the API sees them."""

    # Called after a request is queued (an embedded worker wakes up at once).
    on_enqueue: Callable[[], None] | None

    def enqueue(self, new: NewRequest) -> Enqueued:
        """Queue once per (account, signature): a replay returns the first id. Created and
        due now by the store's clock. With an idempotency key, also once per (account,
        key) within IDEMPOTENCY_WINDOW_SECONDS of the store's clock: the same hash returns
        the first id, another raises IdempotencyConflict; an older holder of the key gives
        it up in the same transaction. Race-free: concurrent submits with one key queue one
        request."""
        ...

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
        """An account's requests, newest first; never another account's. Only those that
        meet ``filters`` (and are request ``request_id``); with ``before_id``, only those
        whose id is below it (keyset paging: the page after the one that ended there).
        Served by an index whatever the filters, and as fast deep in the list as at its
        top when paged by ``before_id``."""
        ...

    def count_for_account(
        self,
        account_id: int,
        *,
        request_id: int | None = None,
        filters: RequestFilter | None = None,
    ) -> int:
        """How many of the account's requests ``list_for_account`` would list with no
        paging (no limit, offset or before_id)."""
        ...

    def replayed(self, account_id: int, signature: str) -> int | None:
        """The id of the account's request queued with ``signature`` (the replay key
        ``enqueue`` goes by), or None: an aws.upload answers a replay before any costly
        check."""
        ...

    def get(self, request_id: int) -> StatusRow | None: ...

    def callback_history(
        self, account_id: int, request_id: int, *, limit: int
    ) -> CallbackHistory | None:
        """The callback of an account's request and its ``limit`` newest attempts (newest
        first) with the total; None when the account has no such request (another
        account's is not told apart from one that does not exist)."""
        ...

    def redeliver_callback(
        self, account_id: int, request_id: int, *, msg_id: str, limit: int, window: float
    ) -> RedeliveryResult:
        """Make the callback of a finished request due again, now by the store's clock,
        as a new delivery: webhook-id ``msg_id``, its retry schedule from the start (the
        attempts made before stay in the history), recorded as a request event. Refused
        (core.callbacks.judge_redelivery) unless the request is the account's, finished,
        has a callback URL and no delivery pending; and when ``limit`` redeliveries were
        made in the last ``window`` seconds. A ``msg_id`` already current is a replay:
        nothing changes. A deliverer still sending an earlier delivery cannot move this
        one (its record names the earlier webhook-id)."""
        ...

    def cancel(self, request_id: int, *, account_id: int | None, message: str) -> StateChange:
        """Stop a queued, running or retrying request of ``account_id`` (None: any account,
        the operator): canceled with ``message``, its lease and its checkpoint dropped in
        the same write (a checkpoint still there becomes an orphan: the reaper, or the
        worker that held the lease, aborts its upload), its callback due. A worker holding
        it finds its lease gone at its next write. Refused (``finishing``) while a live
        lease's final S3 call is under way: the object may be written at any moment."""
        ...

    def retry(self, request_id: int, *, account_id: int | None) -> StateChange:
        """Queue a failed or canceled request of ``account_id`` (None: any account) again,
        due now (core.outcomes.requeued); its history stays."""
        ...

    def events(self, request_id: int) -> list[RequestEvent]:
        """The request's history, oldest first (empty for an unknown id)."""
        ...


class QueueStorePort(Protocol):
    """The queue as workers see it. Every write a worker makes names the lease it holds
    (``owner``) and raises LeaseLost when it no longer holds it."""

    def claim(self, owner: str, lease_seconds: float) -> Claimed | None:
        """The next request, fair between accounts, leased to ``owner``; its attempts count
        one more (not when ``owner`` takes back its own lease that ran out). None when no
        account has a request it may run now.

        A request is runnable when queued or retrying and due, or running under a lease
        that ran out (its worker died). An account's uploads in flight are its requests
        running under a live lease. Of the enabled accounts with a runnable request and
        fewer uploads in flight than their ``max_in_flight`` (None: no limit), the one with
        the fewest in flight has its turn; among equals, the first by id after the account
        this store's previous claim served (round-robin, wrapping around). Its oldest
        runnable request (by id) is claimed. One atomic write: concurrent claims never
        hand out one request twice, nor take an account past its limit."""
        ...

    def heartbeat(
        self,
        request_id: int,
        owner: str,
        lease_seconds: float,
        *,
        bytes_done: int | None = None,
        bytes_total: int | None = None,
    ) -> None: ...

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
        """The upload is stored: succeeded, its checkpoint dropped. A checkpoint of another
        upload than ``completed_upload`` (the multipart upload S3 completed into the
        object) is recorded as an orphan in the same write, as by ``fail``."""
        ...

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
        """Like ``succeed``, this drops the request's checkpoint: one still there names an
        upload nobody confirmed gone, so it becomes an orphan (OrphanStorePort) in the same
        write."""
        ...

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
        """Back to the queue as ``retrying``, due ``delay`` seconds from now by the store's
        own clock (never the caller's); its message says when, which attempt comes next (of
        ``max_attempts``) and the ``cause`` (core.records.retrying_message). Returns the
        time it is due. With ``refund_attempt`` the attempt does not count (it was cut
        short by the database, not by the upload)."""
        ...

    def release(self, request_id: int, owner: str) -> None:
        """Back to the queue, due now, not counted as an attempt."""
        ...

    def claim_callback(self, lease_seconds: float) -> DueCallback | None:
        """A callback due by the store's clock, leased by making it due again
        ``lease_seconds`` later (a deliverer that dies gives it back that way)."""
        ...

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
        """Record one attempt (made at ``at``), always (even a late one); returns the
        callback's new state. A failure with a ``next_delay`` stays pending, due that many
        seconds from now by the store's clock. LeaseLost, with the attempt kept, if it is no
        longer pending under ``msg_id``. The attempt counts towards the callback's attempts
        (its retry schedule) only while ``msg_id`` is the current delivery's: a late POST of
        a delivery since redelivered is in the history, not in the new schedule."""
        ...

    def callback_attempts(self, request_id: int) -> list[dict[str, Any]]: ...

    def depth(self, *, live_only: bool = False) -> dict[str, int]:
        """Requests by state (``live_only``: queued, retrying and running only), pending
        callbacks, and the queued requests and callbacks held by disabled accounts."""
        ...

    def oldest_due_seconds(self) -> float:
        """Seconds the longest-waiting due request has waited for a worker (0.0: none)."""
        ...

    def has_work(self) -> bool: ...


class OrphanStorePort(Protocol):
    """Multipart uploads that were given up but whose abort S3 did not confirm. They are
    recorded by the stores themselves, in the write that drops a request's checkpoint (an
    outcome, or ``PartLedger.give_up``); reapers claim them, abort them, and delete them
    once S3 confirms. Times are the store's clock."""

    def claim(self, lease_seconds: float, *, orphan_id: int | None = None) -> Orphan | None:
        """The orphan due first (or the one ``orphan_id`` names, due or not), its next time
        pushed ``lease_seconds`` ahead so that no other reaper takes it meanwhile, its
        attempts counted one more; None when there is none (or another claim holds it)."""
        ...

    def aborted(self, orphan_id: int) -> bool:
        """S3 confirmed the upload gone: forget it. False when it was gone already."""
        ...

    def retry_later(self, orphan_id: int, *, delay: float, error: str) -> bool:
        """The abort failed: due again ``delay`` seconds from now. False when it was gone
        already (another reaper's abort was confirmed)."""
        ...

    def list(self, *, request_id: int | None = None) -> list[Orphan]:
        """Every recorded orphan (or those of request ``request_id``), oldest first."""
        ...

    def count(self) -> int: ...


class LedgerFactory(Protocol):
    """The part ledger of one leased request (``empty``: the claim showed no checkpoint)."""

    def __call__(self, request_id: int, owner: str, *, empty: bool = False) -> PartLedger: ...


class Notifications(Protocol):
    """Wakes a worker when a request is queued in another process (PostgreSQL's
    LISTEN/NOTIFY); stores without such a channel do nothing and polling finds the work."""

    def listen(self, wake: Callable[[], None], stopping: threading.Event) -> None:
        """Block, calling ``wake`` on each notification, until ``stopping`` is set."""
        ...
