"""aws.upload: validate a push request and queue it."""

from __future__ import annotations

import errno
import os
import re
from typing import Any

from vodpush import metadata as s3_metadata
from vodpush import sestore
from vodpush.commands.context import CommandContext
from vodpush.persistence.requests import NewRequest
from vodpush.protocol.fields import as_str, invalid, require
from vodpush.worker.callbacks import CallbackURLError, normalize_callback_url

REQUIRED = ("path", "destination_path", "bucket", "acl")
ACLS = ("private", "public-read")
MAX_KEY_BYTES = 1024  # S3's limit on an object key
# Bucket names as S3 accepts them, including legacy us-east-1 names (capitals, underscores).
_BUCKET = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{1,253}[A-Za-z0-9]$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# What the file system answers for a path the customer shaped (a component too long, a loop,
# a directory made unreadable): the customer's to fix, so 0007, not 0004.
_CLIENT_ERRNOS = frozenset(
    {errno.ENAMETOOLONG, errno.ELOOP, errno.ENOTDIR, errno.EINVAL, errno.EACCES, errno.EPERM}
)


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
    if not _BUCKET.match(bucket) or ".." in bucket:
        raise invalid(
            "bucket",
            "must be 3-255 characters of letters, digits, '.', '_' or '-', "
            "starting and ending with a letter or digit",
        )
    return bucket


def validate_callback(value: Any) -> str:
    """The callback as sent ("" for none); refused unless it is a usable http(s) URL. A URL
    without scheme means http:// (resolved and checked again at delivery)."""
    if value is None or value == "":
        return ""
    url = as_str(value, "callback", max_length=2048)
    try:
        normalize_callback_url(url)
    except CallbackURLError as exc:
        raise invalid("callback", str(exc)) from exc
    return url


def aws_upload(ctx: CommandContext, payload: dict[str, Any]) -> tuple[str, Any]:
    require(payload, REQUIRED)
    path = as_str(payload["path"], "path", max_length=sestore.MAX_PATH_LENGTH)
    destination = validate_destination(payload["destination_path"])
    bucket = validate_bucket(payload["bucket"])
    acl = payload["acl"]
    if acl not in ACLS:
        raise invalid("acl", f"must be one of {', '.join(ACLS)}")
    try:
        metadata = s3_metadata.normalize(payload.get("metadata"))
    except s3_metadata.MetadataRefused as exc:
        raise invalid("metadata", str(exc)) from exc
    callback = validate_callback(payload.get("callback"))
    try:
        sestore.resolve(ctx.settings.sestore_root, path, ctx.account.username)
    except sestore.PathRefused as exc:
        raise invalid("path", str(exc)) from exc
    except OSError as exc:
        if exc.errno not in _CLIENT_ERRNOS:
            raise
        raise invalid("path", f"cannot be checked: {os.strerror(exc.errno)}") from exc

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
