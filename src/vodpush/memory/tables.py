"""The rows of one in-memory database, and the lease guard every worker write goes through."""

from __future__ import annotations

import json
import threading
from collections import namedtuple
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from typing import Any

from vodpush.core.accounts import S3Settings
from vodpush.core.checkpoint import PartRecord
from vodpush.core.ports import StatusRow
from vodpush.core.records import QUEUED_MESSAGE
from vodpush.core.requests import CallbackState, LeaseLost, State

PENDING = CallbackState.PENDING.value
# aws.status rows: the fields of core.ports.StatusRow, in its order.
StatusTuple = namedtuple("StatusTuple", list(StatusRow.__annotations__))  # type: ignore[misc]


@dataclass
class AccountRow:
    id: int
    cdn: int
    username: str
    api_key: str
    api_secret_enc: str
    enabled: bool
    s3: S3Settings  # without its secret: that is kept encrypted below
    s3_secret_enc: str | None
    created_at: datetime
    allowed_buckets: tuple[str, ...] = ()
    webhook_secret_enc: str | None = None
    max_in_flight: int | None = None


@dataclass
class RequestRow:
    id: int
    account_id: int
    cdn_id: int
    path: str
    destination_path: str
    bucket: str
    acl: str
    metadata_json: str
    callback: str
    signature: str
    created_at: datetime
    updated_at: datetime
    not_before: datetime
    state: str = State.QUEUED.value
    message: str = QUEUED_MESSAGE
    results_json: str | None = None
    http_status: int = 0
    error_code: str | None = None
    attempts: int = 0
    lease_expiries: int = 0
    lease_owner: str | None = None
    lease_expires_at: datetime | None = None
    bytes_total: int | None = None
    bytes_done: int = 0
    sha256: str | None = None
    multipart_json: str | None = None
    callback_state: str = CallbackState.NONE.value
    callback_attempts: int = 0
    callback_next_at: datetime | None = None
    callback_msg_id: str | None = None
    callback_last_error: str | None = None
    options_json: str | None = None
    idempotency_key: str | None = None
    idempotency_hash: str | None = None
    parts: dict[int, PartRecord] = field(default_factory=dict)
    callback_log: list[dict[str, Any]] = field(default_factory=list)
    # The request_events rows: {"id", "at", "event", "state", "attempts", "message",
    # "error_code"} (Tables.add_event).
    events: list[dict[str, Any]] = field(default_factory=list)


REQUEST_FIELDS = {f.name for f in fields(RequestRow)}


@dataclass
class OrphanRow:
    id: int
    account_id: int
    request_id: int | None
    bucket: str
    key: str
    upload_id: str
    created_at: datetime
    next_at: datetime
    attempts: int = 0
    last_error: str | None = None


def _utc_now() -> datetime:
    # Not core.clock.utcnow: a patched caller clock must not move the store's.
    return datetime.now(UTC).replace(tzinfo=None)


class Tables:
    """The shared state of one in-memory database."""

    def __init__(self, clock: Callable[[], datetime] | None = None) -> None:
        # The store's own clock, as a database has its own: leases and due times are
        # measured on it, never on a caller's. Tests inject one they can move.
        self.now: Callable[[], datetime] = clock or _utc_now
        self.lock = threading.RLock()
        self.accounts: dict[int, AccountRow] = {}
        self.requests: dict[int, RequestRow] = {}
        self.orphans: dict[int, OrphanRow] = {}
        self.next_account = 1
        self.next_orphan = 1
        self.next_request = 1
        self.next_attempt = 1
        self.next_event = 1

    def account_enabled(self, account_id: int) -> bool:
        # As the database's "NOT IN (disabled accounts)": an unknown account holds nothing.
        account = self.accounts.get(account_id)
        return account is None or account.enabled

    def max_in_flight(self, account_id: int) -> float:
        """The account's limit of uploads in flight (infinite: none)."""
        account = self.accounts.get(account_id)
        limit = None if account is None else account.max_in_flight
        return float("inf") if limit is None else limit

    def leased(self, request_id: int, owner: str) -> RequestRow:
        """The request ``owner`` holds the lease of (expired or not, as long as nobody took
        it over), else LeaseLost."""
        row = self.requests.get(request_id)
        if row is None or row.state != State.RUNNING.value or row.lease_owner != owner:
            raise LeaseLost(f"request {request_id} is no longer leased by {owner}")
        return row

    def add_event(self, row: RequestRow, event: str) -> None:
        """The database's record_event: ``event`` of ``row`` as it stands now (after the
        change it records). Call with the lock held."""
        row.events.append(
            {
                "id": self.next_event,
                "at": self.now(),
                "event": event,
                "state": row.state,
                "attempts": row.attempts,
                "message": row.message,
                "error_code": row.error_code,
            }
        )
        self.next_event += 1

    def record_checkpoint(
        self, row: RequestRow, *, after_lease: bool = False, completed: str | None = None
    ) -> None:
        """The database's record_checkpoint: the upload of ``row``'s checkpoint, if any,
        becomes an orphan due now (``after_lease``: when the row's lease, if any, runs
        out), once per account, bucket and upload id. Call with the lock held, before the
        checkpoint is dropped."""
        if not row.multipart_json:
            return
        upload_id = str(json.loads(row.multipart_json)["upload_id"])
        if upload_id == completed:  # S3 completed it into the object: nothing to abort
            return
        for orphan in self.orphans.values():
            if (orphan.account_id, orphan.bucket, orphan.upload_id) == (
                row.account_id,
                row.bucket,
                upload_id,
            ):
                return
        now = self.now()
        self.orphans[self.next_orphan] = OrphanRow(
            id=self.next_orphan,
            account_id=row.account_id,
            request_id=row.id,
            bucket=row.bucket,
            key=row.destination_path,
            upload_id=upload_id,
            created_at=now,
            next_at=(row.lease_expires_at or now) if after_lease else now,
        )
        self.next_orphan += 1
