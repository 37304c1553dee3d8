"""Orphaned multipart uploads: given up, but their abort not confirmed by S3. The stores
keep them (core.ports.OrphanStorePort) until a reaper's abort is."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True)
class Orphan:
    """One recorded upload id, and how the reaper has fared with it so far."""

    id: int
    account_id: int  # the abort uses this account's S3 settings
    request_id: int | None  # for the operator: the request that gave the upload up
    bucket: str
    key: str
    upload_id: str
    created_at: datetime  # naive UTC
    next_at: datetime  # naive UTC: due from then (a claim pushes it past its lease)
    attempts: int  # aborts tried (counted when claimed)
    last_error: str | None
