"""aws.upload: validate a push request and queue it."""

from __future__ import annotations

import re
from typing import Any

from vodpush import metadata as s3_metadata
from vodpush import sestore
from vodpush.callbacks.policy import CallbackURLError, check_destination
from vodpush.commands.context import CommandContext
from vodpush.config import Settings
from vodpush.core.options import API_ACLS, MAX_KEY_BYTES
from vodpush.core.requests import NewRequest
from vodpush.protocol.envelope import ApiError, Code
from vodpush.protocol.fields import as_str, invalid, require

REQUIRED = ("path", "destination_path", "bucket", "acl")
# Bucket names as S3 accepts them, including legacy us-east-1 names (capitals, underscores).
# Used with fullmatch: `$` would also accept a trailing newline.
_BUCKET = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{1,253}[A-Za-z0-9]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# A lookup at submit waits this long at most (an aws.upload answers in time; the delivery
# checks the address again anyway).
SUBMIT_DNS_TIMEOUT = 2.0


def validate_destination(value: Any) -> str:
    key = as_str(value, "destination_path", max_length=MAX_KEY_BYTES)
    if len(key.encode("utf-8")) > MAX_KEY_BYTES:
        raise invalid("destination_path", f"must be at most {MAX_KEY_BYTES} bytes in UTF-8")
    if _CONTROL.search(key):
        raise invalid("destination_path", "must not contain control characters")
    if key.startswith("/"):
        raise invalid("destination_path", "must not start with '/' (it is an S3 object key)")
    if key.endswith("/"):
        raise invalid("destination_path", "must end with a file name, not '/'")
    return key


def validate_bucket(value: Any) -> str:
    bucket = as_str(value, "bucket", max_length=255)
    if not _BUCKET.fullmatch(bucket) or ".." in bucket:
        raise invalid(
            "bucket",
            "must be 3-255 characters of letters, digits, '.', '_' or '-', "
            "starting and ending with a letter or digit",
        )
    return bucket


def validate_callback(value: Any, settings: Settings) -> str:
    """The callback as sent ("" for none); refused unless it is a usable http(s) URL that
    could be delivered to (see check_destination: no literal private address, no name that
    does not resolve). A URL without scheme means http://. Runs in a worker thread: the DNS
    lookup (bounded in time) does not hold the event loop. Resolved and checked again at
    each delivery."""
    if value is None or value == "":
        return ""
    url = as_str(value, "callback", max_length=2048)
    try:
        check_destination(
            url,
            allow_private=settings.callback_allow_private,
            timeout=min(settings.callback_timeout, SUBMIT_DNS_TIMEOUT),
        )
    except CallbackURLError as exc:
        raise invalid("callback", str(exc)) from exc
    return url


def aws_upload(ctx: CommandContext, payload: dict[str, Any]) -> tuple[str, Any]:
    require(payload, REQUIRED)
    path = as_str(payload["path"], "path", max_length=sestore.MAX_PATH_LENGTH)
    destination = validate_destination(payload["destination_path"])
    bucket = validate_bucket(payload["bucket"])
    refused = ctx.account.may_use_bucket(bucket)
    if refused is not None:
        raise ApiError(Code.UNAUTHORIZED, f"unauthorized access: {refused}")
    acl = payload["acl"]
    if acl not in API_ACLS:
        raise invalid("acl", f"must be one of {', '.join(API_ACLS)}")
    try:
        metadata = s3_metadata.normalize(payload.get("metadata"))
    except s3_metadata.MetadataRefused as exc:
        raise invalid("metadata", str(exc)) from exc
    callback = validate_callback(payload.get("callback"), ctx.settings)
    refused = ctx.account.files_refused()
    if refused is not None:
        raise ApiError(Code.UNAUTHORIZED, f"unauthorized access: {refused}")
    try:
        # Opened as the worker will open it (then closed), so that both agree.
        sestore.check(
            ctx.settings.sestore_root,
            path,
            ctx.account.username,
            follow_symlinks=ctx.settings.sestore_follow_symlinks,
        )
    except sestore.PathRefused as exc:
        raise invalid("path", str(exc)) from exc

    queued = ctx.requests.enqueue(
        NewRequest(
            account_id=ctx.account.id,
            cdn_id=ctx.account.cdn,
            path=path,
            destination_path=destination,
            bucket=bucket,
            acl=acl,
            metadata=metadata,
            callback=callback,
            signature=ctx.signature,
        )
    )
    # A replayed request answers exactly as the first one did, and queues nothing.
    return "Upload queued", {"id": queued.id}
