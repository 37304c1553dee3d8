"""upload: check a push request and queue it (aws.upload). Each field's rule is here, once;
the order of the checks is the order the API has always answered in."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from vodpush import metadata as s3_metadata
from vodpush import sestore
from vodpush.callbacks.policy import CallbackURLError, check_destination
from vodpush.config import Settings
from vodpush.core.accounts import role_session_name
from vodpush.core.fields import InvalidField, read_str, require
from vodpush.core.options import API_ACLS, MAX_KEY_BYTES
from vodpush.core.preflight import Check, PreflightReport, Verdict
from vodpush.core.requests import NewRequest
from vodpush.operations.context import OperationContext
from vodpush.operations.errors import PreflightFailed, Unauthorized

REQUIRED = ("path", "destination_path", "bucket", "acl")
# Bucket names as S3 accepts them, including legacy us-east-1 names (capitals, underscores).
# Used with fullmatch: `$` would also accept a trailing newline.
_BUCKET = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{1,253}[A-Za-z0-9]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# A lookup at submit waits this long at most (an aws.upload answers in time; the delivery
# checks the address again anyway).
SUBMIT_DNS_TIMEOUT = 2.0


def validate_path(value: Any) -> str:
    """The sestore path as sent; whether the file is there is checked by ``upload``."""
    return read_str(value, "path", max_length=sestore.MAX_PATH_LENGTH)


def validate_destination(value: Any) -> str:
    key = read_str(value, "destination_path", max_length=MAX_KEY_BYTES)
    if len(key.encode("utf-8")) > MAX_KEY_BYTES:
        raise InvalidField("destination_path", f"must be at most {MAX_KEY_BYTES} bytes in UTF-8")
    if _CONTROL.search(key):
        raise InvalidField("destination_path", "must not contain control characters")
    if key.startswith("/"):
        raise InvalidField("destination_path", "must not start with '/' (it is an S3 object key)")
    if key.endswith("/"):
        raise InvalidField("destination_path", "must end with a file name, not '/'")
    return key


def validate_bucket(value: Any) -> str:
    bucket = read_str(value, "bucket", max_length=255)
    if not _BUCKET.fullmatch(bucket) or ".." in bucket:
        raise InvalidField(
            "bucket",
            "must be 3-255 characters of letters, digits, '.', '_' or '-', "
            "starting and ending with a letter or digit",
        )
    return bucket


def validate_acl(value: Any) -> str:
    if value not in API_ACLS:
        raise InvalidField("acl", f"must be one of {', '.join(API_ACLS)}")
    return str(value)


def validate_metadata(value: Any) -> dict[str, str]:
    try:
        return s3_metadata.normalize(value)
    except s3_metadata.MetadataRefused as exc:
        raise InvalidField("metadata", str(exc)) from exc


def validate_callback(value: Any, settings: Settings) -> str:
    """The callback as sent ("" for none); refused unless it is a usable http(s) URL that
    could be delivered to (see check_destination: no literal private address, no name that
    does not resolve). A URL without scheme means http://. The API runs this in a worker
    thread: the DNS lookup (bounded in time) does not hold the event loop. Resolved and
    checked again at each delivery."""
    if value is None or value == "":
        return ""
    url = read_str(value, "callback", max_length=2048)
    try:
        check_destination(
            url,
            allow_private=settings.callback_allow_private,
            timeout=min(settings.callback_timeout, SUBMIT_DNS_TIMEOUT),
        )
    except CallbackURLError as exc:
        raise InvalidField("callback", str(exc)) from exc
    return url


# A flag as JSON booleans, and as Perl and form-minded clients send one.
_FLAG_TEXTS = {"true": True, "1": True, "false": False, "0": False}


def validate_preflight(value: Any) -> bool:
    """Whether to check the bucket against S3 before queueing (absent or null: no)."""
    if value is None:
        return False
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.lower() in _FLAG_TEXTS:
        return _FLAG_TEXTS[value.lower()]
    raise InvalidField("preflight", "must be true or false")


def authorize_bucket(ctx: OperationContext, bucket: str) -> None:
    refused = ctx.account.may_use_bucket(bucket)
    if refused is not None:
        raise Unauthorized(refused)


@dataclass(frozen=True)
class UploadArgs:
    """A push request: the file ``path`` under the account's sestore directory, to the
    object ``destination_path`` of ``bucket`` with ``acl``, ``metadata`` (normalized) and an
    optional ``callback`` URL ("" for none)."""

    path: str
    destination_path: str
    bucket: str
    acl: str
    metadata: dict[str, str] = field(default_factory=dict)
    callback: str = ""
    # Check the bucket against S3 (credentials, existence, ACL, a test write) first, and
    # queue nothing when it would not take the upload.
    preflight: bool = False

    @classmethod
    def from_values(cls, values: Mapping[str, Any], ctx: OperationContext) -> UploadArgs:
        """The arguments from a caller's values, each field checked (MissingFields,
        InvalidField naming it; Unauthorized for a bucket the account may not use, checked
        as soon as the bucket is read, before the later fields)."""
        require(values, REQUIRED)
        path = validate_path(values["path"])
        destination = validate_destination(values["destination_path"])
        bucket = validate_bucket(values["bucket"])
        authorize_bucket(ctx, bucket)
        acl = validate_acl(values["acl"])
        metadata = validate_metadata(values.get("metadata"))
        callback = validate_callback(values.get("callback"), ctx.settings)
        preflight = validate_preflight(values.get("preflight"))
        return cls(
            path=path,
            destination_path=destination,
            bucket=bucket,
            acl=acl,
            metadata=metadata,
            callback=callback,
            preflight=preflight,
        )


@dataclass(frozen=True)
class Queued:
    id: int
    replayed: bool  # the same request (same replay key) had been queued before; nothing new


def upload(ctx: OperationContext, args: UploadArgs, *, replay_key: str) -> Queued:
    """Queue ``args`` for the account, once per ``replay_key`` (the request's idempotency
    token: a second call with it returns the first request and queues nothing). Checks that
    the account may read its files and that the file is there, readable, as the worker will
    open it."""
    authorize_bucket(ctx, args.bucket)  # again, for arguments not built by from_values
    refused = ctx.account.files_refused()
    if refused is not None:
        raise Unauthorized(refused)
    try:
        # Opened as the worker will open it (then closed), so that both agree.
        sestore.check(
            ctx.settings.sestore_root,
            args.path,
            ctx.account.username,
            follow_symlinks=ctx.settings.sestore_follow_symlinks,
        )
    except sestore.PathRefused as exc:
        raise InvalidField("path", str(exc)) from exc
    if args.preflight:
        # A replay answers as the first request did, whatever S3 says now: its upload is
        # queued already (and a transient failure here would lead the client to send it
        # again as a new request).
        first = ctx.requests.replayed(ctx.account.id, replay_key)
        if first is not None:
            return Queued(id=first, replayed=True)
        preflight(ctx, args)
    queued = ctx.requests.enqueue(
        NewRequest(
            account_id=ctx.account.id,
            cdn_id=ctx.account.cdn,
            path=args.path,
            destination_path=args.destination_path,
            bucket=args.bucket,
            acl=args.acl,
            metadata=dict(args.metadata),
            callback=args.callback,
            signature=replay_key,
        )
    )
    return Queued(id=queued.id, replayed=queued.replayed)


def preflight(ctx: OperationContext, args: UploadArgs) -> PreflightReport:
    """The preflight of ``args`` with the account's S3 settings; PreflightFailed (nothing
    queued) when the bucket would not take the upload, or it could not be checked."""
    if ctx.preflight is None:
        report = PreflightReport(
            bucket=args.bucket,
            key=args.destination_path,
            acl=args.acl,
            checks=(Check("preflight", Verdict.FAILED, "not available on this server"),),
        )
    else:
        report = ctx.preflight(
            ctx.account.s3,
            bucket=args.bucket,
            key=args.destination_path,
            acl=args.acl,
            session_name=role_session_name(ctx.account.id),
        )
    if not report.passed:
        raise PreflightFailed(report)
    return report
