"""Recognising an object an earlier attempt wrote.

A worker killed after S3 stored the object (PutObject or CompleteMultipartUpload answered)
but before the request's success was recorded leaves that object in place. The next attempt
looks before writing it again: an object that provably holds the same bytes (``holds_same``:
same size, and an equal SHA-256 or MD5 ETag) and is stored as this request asks (metadata,
Content-Type, Cache-Control, Content-Disposition, storage class, encryption: what
HeadObject tells) is claimed as the upload's result; anything else (no object, another one
under the key, one that cannot be compared) is written over. The ACL and the tags are not
compared (HeadObject does not tell them): an object with the same bytes and options but
another ACL or other tags would only come from another writer, between two attempts.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from botocore.client import BaseClient
from botocore.exceptions import BotoCoreError, ClientError

from vodpush.transfer.errors import classify
from vodpush.transfer.job import UploadJob
from vodpush.transfer.verify import holds_same

__all__ = ["find_same"]

log = logging.getLogger(__name__)


def find_same(
    client: BaseClient,
    job: UploadJob,
    *,
    file_name: str,
    size: int,
    sha256: str | None = None,
    sha256_composite: str | None = None,
    etag: str | Callable[[], str] | None = None,
) -> dict[str, Any] | None:
    """The HeadObject answer for ``job``'s key when the object there provably holds our
    bytes (the arguments are those of ``verify.holds_same``) stored with the job's options
    (``file_name`` gives the Content-Type when none was chosen), else None.

    HeadObject asks for the newest version, so a later writer's object is never taken for
    ours unless it holds the same bytes. Errors that pass (5xx, connections) raise a
    transient UploadError: the caller keeps what it knows and the next attempt looks again.
    Any other refusal (403 for write-only credentials, a store that rejects the checksum
    mode) means the object cannot be looked at: None, and it is written as it would have
    been without the look.
    """
    args: dict[str, Any] = {"Bucket": job.bucket, "Key": job.key}
    if job.options.checksums:
        args["ChecksumMode"] = "ENABLED"
    try:
        stored: dict[str, Any] = client.head_object(**args)
    except ClientError as exc:
        err = classify(exc)
        if err.transient:
            raise err from exc
        if err.http_status != 404:
            log.info(
                "cannot look at the stored object: %s",
                err,
                extra={"action": "s3.head_refused", "bucket": job.bucket, "key": job.key},
            )
        return None
    except BotoCoreError as exc:
        raise classify(exc) from exc
    differs = _differs(stored, job.object_arguments(file_name))
    if differs is None and not holds_same(
        stored, size=size, sha256=sha256, sha256_composite=sha256_composite, etag=etag
    ):
        differs = "content"
    log.info(
        "the stored object is this upload" if differs is None else "the stored object differs",
        extra={
            "action": "s3.found_same" if differs is None else "s3.found_other",
            "bucket": job.bucket,
            "key": job.key,
            "version_id": stored.get("VersionId"),
            "differs": differs,
        },
    )
    return stored if differs is None else None


def _differs(stored: dict[str, Any], arguments: dict[str, Any]) -> str | None:
    """Which option the stored object does not have as ``arguments`` (those of PutObject)
    ask, among those HeadObject tells; None when none."""

    def lower(pairs: Any) -> dict[str, str]:
        return {str(k).lower(): str(v) for k, v in dict(pairs or {}).items()}

    if lower(stored.get("Metadata")) != lower(arguments.get("Metadata")):
        return "Metadata"
    if stored.get("ContentType") != arguments.get("ContentType"):
        return "ContentType"
    for header in ("CacheControl", "ContentDisposition"):
        if stored.get(header) != arguments.get(header):
            return header
    # HeadObject names the class only when it is not STANDARD; none asked: the bucket's.
    wanted_class = arguments.get("StorageClass")
    if wanted_class and stored.get("StorageClass", "STANDARD") != wanted_class:
        return "StorageClass"
    # Without an encryption asked for, the bucket's default applies: anything goes.
    wanted = arguments.get("ServerSideEncryption")
    if wanted and stored.get("ServerSideEncryption") != wanted:
        return "ServerSideEncryption"
    return None
