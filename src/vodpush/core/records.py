"""The public record of an upload request: one entry of aws.status, and the body of its
callback. Documented fields keep their names and types; extras are added after them."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import orjson

# The status messages the service itself writes (failures and retries say their own).
QUEUED_MESSAGE = "Queued"
UPLOADING_MESSAGE = "Uploading"
# Running, its final S3 call under way (PutObject, CompleteMultipartUpload, or the abort of
# a failing upload): the object may be written at any moment, so it can no longer be
# canceled (core.requests.StateChange.finishing).
FINISHING_MESSAGE = "Finishing"
CANCELED_BY_CUSTOMER = "Canceled by the customer"
CANCELED_BY_OPERATOR = "Canceled by the operator"
# The reference API's words for a finished upload: clients look for exactly this text.
SUCCESS_MESSAGE = "Successfully Uploaded to AWS"

# The keys of an entry's "results" (S3's answer), always all present ("" when S3 said none).
RESULT_KEYS = (
    "Bucket",
    "ETag",
    "Expiration",
    "Key",
    "Location",
    "ObjectURL",
    "RequestCharged",
    "SSEKMSKeyId",
    "ServerSideEncryption",
    "VersionId",
)
_EMPTY_RESULTS = dict.fromkeys(RESULT_KEYS, "")


def format_time(value: datetime | str | None) -> str:
    """``YYYY-MM-DD HH:MM:SS``; SQLite hands datetimes back as ISO text."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value[:19].replace("T", " ")
    return value.isoformat(sep=" ", timespec="seconds")


def retrying_message(*, at: datetime, attempt: int, max_attempts: int, cause: str) -> str:
    """The message of a request waiting for its next attempt: when (UTC, the store's
    clock), which attempt that will be, and what went wrong last."""
    return f"Retrying at {format_time(at)} UTC (attempt {attempt} of {max_attempts}): {cause}"


def render(row: Any) -> dict[str, Any]:
    """A request row (the columns of persistence.requests.STATUS_COLUMNS) as an aws.status
    entry."""
    results = dict(_EMPTY_RESULTS)
    if row.results_json:
        results.update(orjson.loads(row.results_json))
    metadata = row.metadata_json
    entry: dict[str, Any] = {
        "id": row.id,
        "cdn_id": row.cdn_id,
        "path": row.path,
        "destination_path": row.destination_path,
        "metadata": orjson.loads(metadata) if metadata and metadata != "{}" else {},
        "acl": row.acl,
        "callback": row.callback,
        "message": row.message,
        "results": results,
        "created": format_time(row.created_at),
        "last_updated": format_time(row.updated_at),
        "status": row.http_status or 0,
        # Extras beyond the reference page.
        "bucket": row.bucket,
        "state": row.state,
        # When a retrying request is tried next ("" in every other state).
        "next_attempt_at": format_time(row.not_before) if row.state == "retrying" else "",
        "attempts": row.attempts,
        "bytes_done": row.bytes_done,
        "bytes_total": row.bytes_total,
        "sha256": row.sha256,
        "error_code": row.error_code,
        "callback_state": row.callback_state,
        "callback_attempts": row.callback_attempts,
        "callback_error": row.callback_last_error,
    }
    # The object options beyond the reference API's (content_type, storage_class, tags,
    # ...), only when the request set some: a reference-API request's record is unchanged.
    if row.options_json:
        entry["options"] = orjson.loads(row.options_json)
    return entry


def render_event(event: Any) -> dict[str, Any]:
    """A step of a request's history (core.requests.RequestEvent) as JSON-ready values."""
    return {
        "at": format_time(event.at),
        "event": event.event,
        "state": event.state,
        "attempts": event.attempts,
        "message": event.message,
        "error_code": event.error_code,
    }
