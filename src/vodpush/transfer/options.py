"""How an object is stored: its options as one checked value, carried to the S3 call.

``OPTIONS`` is the one table of what may be set (after s3transfer's ``ALLOWED_UPLOAD_ARGS``):
each option names its argument of PutObject and CreateMultipartUpload, how a value is
checked and how it is sent. ``ObjectOptions`` checks every value when it is built and
``s3_arguments`` passes them straight through, the same for a single PUT and for a
multipart upload. A new option is one field below plus one entry in the table.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any

from vodpush.core.options import (
    BUCKET_DEFAULT_ACL,
    CANNED_ACLS,
    SSE_CHOICES,
    SSE_KMS,
    refuse_content_disposition,
    refuse_content_type,
    refuse_header_value,
    refuse_storage_class,
    refuse_tags,
    tagging_header,
)
from vodpush.metadata import for_s3
from vodpush.transfer.content_types import guess_content_type

__all__ = ["OPTIONS", "ObjectOptions", "Option"]


@dataclass(frozen=True)
class Option:
    """One allowed object option."""

    s3_name: str  # its argument of PutObject and CreateMultipartUpload
    # Why a value is refused (completing "<option> ..."), or None when it is allowed.
    refuse: Callable[[Any], str | None]
    # The argument's value; None leaves the argument out (S3's default applies).
    to_s3: Callable[[Any], Any] = lambda value: value


def _one_of(choices: tuple[str, ...], *, optional: bool = False) -> Callable[[Any], str | None]:
    allowed = ", ".join(choices)

    def refuse(value: Any) -> str | None:
        if value in choices or (optional and value is None):
            return None
        if optional:
            return f"must be None or one of {allowed}"
        return f"must be one of {allowed}, not {value!r}"

    return refuse


def _optional(refuse: Callable[[Any], str | None]) -> Callable[[Any], str | None]:
    """``refuse`` (a rule of core.options), with None allowed: the option is not set."""

    def refuse_or_none(value: Any) -> str | None:
        return None if value is None else refuse(value)

    return refuse_or_none


def _acl_header(acl: str) -> str | None:
    # No ACL header for "private" nor for the bucket's default. "private" is what S3 gives
    # an object written without one (owner-only; S3 has no per-bucket default object ACL),
    # and an explicit "x-amz-acl: private" is refused (AccessControlListNotSupported) by
    # buckets with ACLs disabled: Object Ownership "bucket owner enforced", the AWS default
    # since April 2023, accepts only no ACL or bucket-owner-full-control. Sending it would
    # break every reference-API upload to such a bucket. So the two send the same request;
    # "bucket-default" says that the bucket's own rules decide, "private" that the object is
    # to be owner-only, which it is wherever ACLs apply.
    return None if acl in ("private", BUCKET_DEFAULT_ACL) else acl


def _optional_text(value: Any) -> str | None:
    return None if value is None or isinstance(value, str) else "must be None or a string"


def _string_pairs(value: Any) -> str | None:
    if isinstance(value, Mapping) and all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        return None
    return "keys and values must be strings"


def _boolean(value: Any) -> str | None:
    return None if isinstance(value, bool) else "must be True or False"


# The one table of allowed options (field of ObjectOptions -> how it reaches S3).
OPTIONS: Mapping[str, Option] = MappingProxyType(
    {
        "acl": Option("ACL", _one_of((*CANNED_ACLS, BUCKET_DEFAULT_ACL)), _acl_header),
        # None is replaced by the type guessed from the key or file name (s3_arguments).
        "content_type": Option("ContentType", _optional(refuse_content_type)),
        "metadata": Option("Metadata", _string_pairs, lambda pairs: for_s3(dict(pairs))),
        "sse": Option("ServerSideEncryption", _one_of(SSE_CHOICES, optional=True)),
        "sse_kms_key_id": Option("SSEKMSKeyId", _optional_text, lambda key_id: key_id or None),
        # Ask S3 to check (and store) a SHA-256 of every part and of the whole object.
        "checksums": Option("ChecksumAlgorithm", _boolean, lambda on: "SHA256" if on else None),
        # None: the bucket's default class (STANDARD on AWS).
        "storage_class": Option("StorageClass", _optional(refuse_storage_class)),
        # Sent as x-amz-tagging, a URL query string; none when empty.
        "tags": Option("Tagging", refuse_tags, lambda tags: tagging_header(tags) or None),
        "cache_control": Option("CacheControl", _optional(refuse_header_value)),
        "content_disposition": Option("ContentDisposition", _optional(refuse_content_disposition)),
    }
)


@dataclass(frozen=True)
class ObjectOptions:
    """The options of one object, checked when built (ValueError names the option and what
    is allowed). The customer chooses the ACL, metadata and the options of
    core.options.REQUEST_OPTIONS; the account the encryption and the checksum mode."""

    acl: str = "private"  # a canned ACL, or "bucket-default" (no ACL sent)
    content_type: str | None = None  # None: guessed from the key, then the file name
    metadata: Mapping[str, str] = field(default_factory=dict)
    sse: str | None = None
    sse_kms_key_id: str | None = None
    checksums: bool = True
    storage_class: str | None = None
    tags: Mapping[str, str] = field(default_factory=dict)
    cache_control: str | None = None
    content_disposition: str | None = None

    def __post_init__(self) -> None:
        for name, option in OPTIONS.items():
            why = option.refuse(getattr(self, name))
            if why is not None:
                raise ValueError(f"{name} {why}")
        if self.sse_kms_key_id and self.sse != SSE_KMS:
            raise ValueError("sse_kms_key_id needs sse='aws:kms'")
        # Copies nobody can change: the options are fixed once checked.
        object.__setattr__(self, "metadata", MappingProxyType(dict(self.metadata)))
        object.__setattr__(self, "tags", MappingProxyType(dict(self.tags)))

    def s3_arguments(self, *, key: str, file_name: str) -> dict[str, Any]:
        """The arguments of PutObject and CreateMultipartUpload for these options (without
        Bucket, Key and the body). ``key`` and ``file_name`` give the Content-Type when none
        was chosen."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        if values["content_type"] is None:
            values["content_type"] = guess_content_type(key, file_name)
        arguments: dict[str, Any] = {}
        for name, option in OPTIONS.items():
            value = option.to_s3(values[name])
            if value is not None:
                arguments[option.s3_name] = value
        return arguments


# Every field has its entry, and no entry lacks its field: checked once, at import.
if {f.name for f in fields(ObjectOptions)} != set(OPTIONS):  # pragma: no cover
    raise RuntimeError("ObjectOptions and OPTIONS must name the same options")
