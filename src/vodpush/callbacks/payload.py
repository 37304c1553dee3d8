"""The signed POST of a callback, built by a pure function: the same record, secret,
message id and time give the same bytes."""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from vodpush.webhooks import HEADER_TIMESTAMP, sign


@dataclass(frozen=True)
class Delivery:
    """One signed callback request, ready to send."""

    msg_id: str
    timestamp: int
    body: bytes
    headers: Mapping[str, str]


@functools.cache
def _version() -> str:
    try:
        return metadata.version("vodpush")
    except metadata.PackageNotFoundError:
        return "0"


def build_delivery(record: dict[str, Any], api_secret: str, msg_id: str, now: float) -> Delivery:
    """The signed POST of ``record``. Call it again for each retry with the same ``msg_id``
    and the current time: receivers reject timestamps more than minutes old."""
    body = json.dumps(record, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode(
        "utf-8"
    )
    webhook_headers = sign(api_secret, msg_id, now, body)
    headers = {
        "Content-Type": "application/json",
        "User-Agent": f"vodpush/{_version()}",
        **webhook_headers,
    }
    return Delivery(
        msg_id=msg_id,
        timestamp=int(webhook_headers[HEADER_TIMESTAMP]),
        body=body,
        headers=headers,
    )
