"""Upload requests as the stores hand them out: states, a new request, a claimed one, a due
callback. Plain values; how they are stored is the persistence layer's business."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class State(enum.StrEnum):
    """Where a request is in its life."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class CallbackState(enum.StrEnum):
    """Where a request's callback is: none (no URL), pending, delivered, or failed (the
    schedule is used up, or the address can never be used)."""

    NONE = "none"
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


class LeaseLost(RuntimeError):
    """The request is no longer ours (lease expired and another worker took it)."""


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


@dataclass(frozen=True)
class Enqueued:
    id: int
    replayed: bool  # True when this exact signed request had been queued before


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


@dataclass(frozen=True)
class DueCallback:
    id: int
    account_id: int
    callback: str
    attempts: int
    msg_id: str  # the webhook-id, fixed when the callback became due; same for every attempt
