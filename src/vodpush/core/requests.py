"""Upload requests as the stores hand them out: states, a new request, a claimed one, a due
callback. Plain values; how they are stored is the persistence layer's business."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


class State(enum.StrEnum):
    """Where a request is in its life."""

    QUEUED = "queued"
    RUNNING = "running"
    # Queued again after a transient failure, waiting for its next attempt (not_before).
    RETRYING = "retrying"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    # Stopped by the customer (aws.cancel) or the operator; aws.retry queues it again.
    CANCELED = "canceled"


class CallbackState(enum.StrEnum):
    """Where a request's callback is: none (no URL), pending, delivered, or failed (the
    schedule is used up, or the address can never be used)."""

    NONE = "none"
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


# The states a worker may claim from (when due): waiting for a first or a next attempt.
WAITING_STATES = (State.QUEUED.value, State.RETRYING.value)
# The states a request ends in; nothing changes it any more but aws.retry (failed,
# canceled).
FINAL_STATES = (State.SUCCEEDED.value, State.FAILED.value, State.CANCELED.value)
# The states aws.retry queues again.
RETRYABLE_STATES = (State.FAILED.value, State.CANCELED.value)
# The states aws.cancel stops: every state but the final ones.
CANCELABLE_STATES = (State.QUEUED.value, State.RUNNING.value, State.RETRYING.value)


class Event(enum.StrEnum):
    """A step in a request's history (the request_events rows). Claims are not recorded:
    the attempt count each outcome carries tells them, and the claim stays one statement."""

    QUEUED = "queued"  # accepted by aws.upload
    RETRYING = "retrying"  # an attempt failed transiently; the next one is due later
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"  # aws.cancel, or the operator
    RETRIED = "retried"  # queued again by aws.retry (or the operator), attempts from 0


# How long an idempotency key holds (aws.upload idempotency_key): within it the same key
# answers with the request it first queued; after it, the key may name a new request.
IDEMPOTENCY_WINDOW_SECONDS = 24 * 3600


class IdempotencyConflict(Exception):
    """The idempotency key names a request of the last IDEMPOTENCY_WINDOW_SECONDS whose
    fields (its idempotency hash) differ from the new one's: nothing was queued."""


class LeaseLost(RuntimeError):
    """The request is no longer ours (lease expired and another worker took it)."""


class StoreUnavailable(RuntimeError):
    """The store could not answer for a reason that passes (a dropped or refused database
    connection, a restart, a serialization failure, SQLite busy): try again later. Whether
    the write was applied is unknown, so only idempotent steps are simply repeated."""


@dataclass(frozen=True)
class NewRequest:
    account_id: int
    cdn_id: int
    path: str
    destination_path: str
    bucket: str
    acl: str
    metadata: dict[str, str]
    callback: str
    # The canonical base64 of the request's HMAC digest (44 characters), not the text the
    # client sent: every spelling of one signature is one request.
    signature: str
    # The object options beyond the reference API's (core.options.REQUEST_OPTIONS: content
    # type, storage class, tags, ...), as checked at submit; empty for a documented-only
    # request.
    options: dict[str, Any] = field(default_factory=dict)
    # The customer's idempotency key and the SHA-256 (hex) of the fields it covers; None
    # when none was sent. With a key, enqueue returns the request the key named within
    # IDEMPOTENCY_WINDOW_SECONDS when its hash is the same, and raises IdempotencyConflict
    # when it is not; an older request gives the key up to the new one.
    idempotency_key: str | None = None
    idempotency_hash: str | None = None


@dataclass(frozen=True)
class Enqueued:
    id: int
    # True when nothing new was queued: this exact signed request, or one with the same
    # idempotency key and fields, had been queued before (``id`` is that request's).
    replayed: bool


@dataclass(frozen=True)
class StateChange:
    """What a cancel or a retry of a request found, and whether it changed it. ``found`` is
    the state the request was in (None: there is no such request, or it is another
    account's: the two are not told apart). ``finishing``: not canceled because its upload
    is in its final S3 call (the object may be written at any moment)."""

    found: str | None
    changed: bool
    finishing: bool = False
    # The request as the change left it (a core.ports.StatusRow), read in the same
    # transaction: what the caller is answered, before any worker moves it on.
    row: Any = field(default=None, compare=False)


@dataclass(frozen=True)
class RequestEvent:
    """One step of a request's history, oldest first: the state it led to, the attempts
    made by then, and the request's message and error code at that moment."""

    id: int
    request_id: int
    at: datetime | str  # naive UTC (SQLite hands back ISO text)
    event: str
    state: str
    attempts: int
    message: str | None
    error_code: str | None


@dataclass(frozen=True)
class Claimed:
    """A request a worker holds the lease of."""

    id: int
    account_id: int
    path: str
    destination_path: str
    bucket: str
    acl: str
    metadata: dict[str, str]
    callback: str
    attempts: int
    has_checkpoint: bool = False  # a multipart upload of an earlier attempt may resume
    # How often a worker's lease on it ran out (the worker died or hung): counted at the
    # claim that took it over. A request that kills every worker ends at max_attempts.
    lease_expiries: int = 0
    # The object options of NewRequest.options.
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DueCallback:
    id: int
    account_id: int
    callback: str
    attempts: int
    msg_id: str  # the webhook-id, fixed when the callback became due; same for every attempt
