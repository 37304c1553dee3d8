"""upload: check a push request and queue it (aws.upload). Each field's rule is here, once;
the order of the checks is the order the API has always answered in."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from vodpush import metadata as s3_metadata
from vodpush import sestore
from vodpush.callbacks.policy import CallbackURLError, check_destination
from vodpush.config import Settings
from vodpush.core.accounts import role_session_name
from vodpush.core.fields import InvalidField, check_text, read_str, require
from vodpush.core.options import (
    API_ACLS,
    MAX_KEY_BYTES,
    MAX_TAGS,
    REQUEST_OPTIONS,
    printable_ascii,
    refuse_content_disposition,
    refuse_content_type,
    refuse_header_value,
    refuse_storage_class,
    refuse_tags,
)
from vodpush.core.preflight import Check, PreflightReport, Verdict
from vodpush.core.requests import IDEMPOTENCY_WINDOW_SECONDS, IdempotencyConflict, NewRequest
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
MAX_IDEMPOTENCY_KEY_CHARS = 255  # the column's size


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


def _header_option(name: str, refuse: Callable[[Any], str | None]) -> Callable[[Any], str]:
    def validate(value: Any) -> str:
        if isinstance(value, str):
            check_text(value, name)  # NUL and lone surrogates, named as everywhere
        why = refuse(value)
        if why is not None:
            raise InvalidField(name, why)
        return str(value)

    return validate


validate_content_type = _header_option("content_type", refuse_content_type)
validate_cache_control = _header_option("cache_control", refuse_header_value)
validate_content_disposition = _header_option("content_disposition", refuse_content_disposition)


def validate_storage_class(value: Any) -> str:
    why = refuse_storage_class(value)
    if why is not None:
        raise InvalidField("storage_class", why)
    return str(value)


def validate_tags(value: Any) -> dict[str, str]:
    """The object's tags as a dict of strings ({} for none). None, {} and [] (PHP's empty
    array) mean none; numbers and booleans become text, as in metadata."""
    if value is None or value == []:
        return {}
    if not isinstance(value, dict):
        raise InvalidField("tags", "must be an object of key/value pairs")
    if len(value) > MAX_TAGS:  # before any work on a huge object
        raise InvalidField("tags", f"has {len(value)} tags; S3 allows at most {MAX_TAGS}")
    tags: dict[str, str] = {}
    for key, raw in value.items():
        if isinstance(raw, bool):
            tags[key] = "true" if raw else "false"
        elif isinstance(raw, str | int | float):
            tags[key] = str(raw)
        else:
            raise InvalidField("tags", f"value of {key[:40]!r} must be a string or a number")
    why = refuse_tags(tags)
    if why is not None:
        raise InvalidField("tags", why)
    return tags


# Each object option's check, in the order they are checked (core.options.REQUEST_OPTIONS).
OPTION_VALIDATORS: dict[str, Callable[[Any], Any]] = {
    "content_type": validate_content_type,
    "storage_class": validate_storage_class,
    "tags": validate_tags,
    "cache_control": validate_cache_control,
    "content_disposition": validate_content_disposition,
}
if tuple(OPTION_VALIDATORS) != REQUEST_OPTIONS:  # pragma: no cover - one list of options
    raise RuntimeError("OPTION_VALIDATORS and REQUEST_OPTIONS must name the same options")


def validate_options(values: Mapping[str, Any]) -> dict[str, Any]:
    """The object options that ``values`` set, checked; an option that is absent or null is
    not set (and empty tags are none)."""
    options: dict[str, Any] = {}
    for name, validate in OPTION_VALIDATORS.items():
        if values.get(name) is not None:
            checked = validate(values[name])
            if checked:  # strings are never empty here; empty tags are none
                options[name] = checked
    return options


def validate_idempotency_key(value: Any) -> str | None:
    """The key as sent (None for none): 1-255 printable ASCII characters."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidField("idempotency_key", "must be a string")
    if not 1 <= len(value) <= MAX_IDEMPOTENCY_KEY_CHARS or not printable_ascii(value):
        raise InvalidField(
            "idempotency_key",
            f"must be 1-{MAX_IDEMPOTENCY_KEY_CHARS} printable ASCII characters "
            "(letters, digits, punctuation, spaces)",
        )
    return value


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
    object ``destination_path`` of ``bucket`` with ``acl``, ``metadata`` (normalized), an
    optional ``callback`` URL ("" for none), the object ``options`` it sets (of
    core.options.REQUEST_OPTIONS) and an optional ``idempotency_key``."""

    path: str
    destination_path: str
    bucket: str
    acl: str
    metadata: dict[str, str] = field(default_factory=dict)
    callback: str = ""
    # Check the bucket against S3 (credentials, existence, ACL, a test write) first, and
    # queue nothing when it would not take the upload.
    preflight: bool = False
    options: dict[str, Any] = field(default_factory=dict)
    idempotency_key: str | None = None

    def fields_hash(self) -> str:
        """SHA-256 (hex) of every field that defines the upload, canonical (JSON, sorted
        keys, ASCII): two requests with the same hash push the same file to the same
        object the same way. Not the idempotency key itself, nor the envelope (timestamp,
        signature)."""
        canonical = {
            "path": self.path,
            "destination_path": self.destination_path,
            "bucket": self.bucket,
            "acl": self.acl,
            "metadata": self.metadata,
            "callback": self.callback,
            "options": self.options,
        }
        text = json.dumps(canonical, sort_keys=True, ensure_ascii=True, separators=(",", ":"))
        return hashlib.sha256(text.encode("ascii")).hexdigest()

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
        # Before the callback, whose check may wait for DNS.
        options = validate_options(values)
        idempotency_key = validate_idempotency_key(values.get("idempotency_key"))
        callback = validate_callback(values.get("callback"), ctx.settings)
        preflight = validate_preflight(values.get("preflight"))
        return cls(
            path=path,
            destination_path=destination,
            bucket=bucket,
            acl=acl,
            metadata=metadata,
            callback=callback,
            options=options,
            idempotency_key=idempotency_key,
            preflight=preflight,
        )


@dataclass(frozen=True)
class Queued:
    id: int
    # The same request (same replay key, or same idempotency key and fields) had been queued
    # before; nothing new.
    replayed: bool


def upload(ctx: OperationContext, args: UploadArgs, *, replay_key: str) -> Queued:
    """Queue ``args`` for the account, once per ``replay_key`` (the request's signature: a
    second call with it returns the first request and queues nothing), and once per
    ``args.idempotency_key`` within the window (the same fields return the first request;
    other fields are refused, InvalidField naming idempotency_key). Checks that
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
    new = NewRequest(
        account_id=ctx.account.id,
        cdn_id=ctx.account.cdn,
        path=args.path,
        destination_path=args.destination_path,
        bucket=args.bucket,
        acl=args.acl,
        metadata=dict(args.metadata),
        callback=args.callback,
        signature=replay_key,
        options=dict(args.options),
        idempotency_key=args.idempotency_key,
        idempotency_hash=args.fields_hash() if args.idempotency_key is not None else None,
    )
    try:
        queued = ctx.requests.enqueue(new)
    except IdempotencyConflict as exc:
        # Nothing about the other request (its id, its fields) is told: only that the key
        # is taken.
        hours = IDEMPOTENCY_WINDOW_SECONDS // 3600
        raise InvalidField(
            "idempotency_key",
            f"was used in the last {hours} hours for an upload with other fields; send "
            "exactly the same fields to get that upload's id, or use a new key",
        ) from exc
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
