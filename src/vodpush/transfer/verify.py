"""What S3 stored: compared with what was read (deleting a mismatch), and reported."""

from __future__ import annotations

import base64
import hashlib
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from urllib.parse import quote, urlsplit

from botocore.client import BaseClient
from botocore.exceptions import BotoCoreError, ClientError

from vodpush.core.checkpoint import PartRecord
from vodpush.core.options import SSE_KMS
from vodpush.core.records import RESULT_KEYS
from vodpush.transfer.errors import INTEGRITY_ERROR, UploadError, classify
from vodpush.transfer.hashing import MD5_ETAG, b64, multipart_etag
from vodpush.transfer.job import UploadJob, UploadResult

__all__ = ["build_result", "made_from_parts", "object_url", "verify_stored", "verify_upload"]

log = logging.getLogger(__name__)


def verify_stored(
    stored: Mapping[str, Any],
    *,
    size: int,
    sha256: str | None,
    sha256_composite: str | None = None,
    etag: str | Callable[[], str] | None = None,
) -> str | None:
    """Why the object S3 describes in ``stored`` (a HeadObject, PutObject or
    CompleteMultipartUpload response) differs from what was read, or None.

    ``sha256`` is the base64 SHA-256 of the whole source and ``sha256_composite`` the
    multipart ``base64(sha256(part digests))-N`` (both None when checksums are off); ``etag``
    the expected MD5 ETag, or a function computing it (called only when it is compared).
    A SHA-256 that S3 returns settles it; otherwise an MD5-shaped ETag is compared, except
    under SSE-KMS or SSE-C whose ETags are not the MD5.
    """
    length = stored.get("ContentLength")
    if length is not None and length != size:
        return f"S3 stored {length} bytes but {size} were read"
    stored_sum = stored.get("ChecksumSHA256")
    if stored_sum and (sha256 or sha256_composite):
        if stored.get("ChecksumType") == "FULL_OBJECT":
            expected = {sha256}
        elif "-" in stored_sum:
            expected = {sha256_composite}
        else:  # a composite without its "-N" (moto's HeadObject), or a full-object sum
            expected = {sha256, (sha256_composite or "").partition("-")[0] or None}
        if stored_sum not in expected:
            wanted = " or ".join(sorted(filter(None, expected)))
            return f"S3 reports SHA-256 {stored_sum}, expected {wanted}"
        return None
    stored_etag = str(stored.get("ETag") or "").strip('"')
    encryption = str(stored.get("ServerSideEncryption") or "")
    if (
        not etag
        or not MD5_ETAG.match(stored_etag)
        or encryption.startswith(SSE_KMS)
        or stored.get("SSECustomerAlgorithm")
    ):
        return None
    expected = etag() if callable(etag) else etag
    if stored_etag != expected:
        return f"S3 reports ETag {stored_etag}, expected {expected}"
    return None


def made_from_parts(
    stored: Mapping[str, Any],
    *,
    size: int,
    parts: Sequence[PartRecord],
    arguments: Mapping[str, Any],
) -> bool:
    """Whether ``stored`` (a HeadObject answer) is the object that completing a multipart
    upload of ``parts`` (all of them, in order), created with ``arguments``, makes: the same
    size, Content-Type and metadata, and the same composite SHA-256 (from the parts'
    checksums) or else the same MD5 ETag (from the parts' ETags). False when neither digest
    can be compared (SSE-KMS or SSE-C without checksums): nothing then proves it."""
    if stored.get("ContentLength") != size:
        return False
    if stored.get("ContentType") != arguments.get("ContentType"):
        return False
    wanted_metadata = {k.lower(): v for k, v in (arguments.get("Metadata") or {}).items()}
    if dict(stored.get("Metadata") or {}) != wanted_metadata:
        return False
    sums = [p.checksum_sha256 for p in parts]
    if stored.get("ChecksumSHA256") and all(sums):
        joined = b"".join(base64.b64decode(s or "") for s in sums)
        composite = f"{b64(hashlib.sha256(joined).digest())}-{len(parts)}"
        return verify_stored(stored, size=size, sha256=None, sha256_composite=composite) is None
    etags = [p.etag.strip('"') for p in parts]
    stored_etag = str(stored.get("ETag") or "").strip('"')
    if (
        not MD5_ETAG.match(stored_etag)
        or not all(MD5_ETAG.match(e) and "-" not in e for e in etags)
        or str(stored.get("ServerSideEncryption") or "").startswith(SSE_KMS)
        or stored.get("SSECustomerAlgorithm")
    ):
        return False
    return stored_etag == multipart_etag([bytes.fromhex(e) for e in etags])


def object_url(client: BaseClient, bucket: str, key: str) -> str:
    """The object's URL: virtual-hosted on AWS, path style on custom endpoints."""
    endpoint = str(client.meta.endpoint_url).rstrip("/")
    style = (client.meta.config.s3 or {}).get("addressing_style") or "auto"
    parts = urlsplit(endpoint)
    path = quote(key, safe="/~")
    on_aws = (parts.hostname or "").endswith(".amazonaws.com")
    # Dotted names break the *.s3.amazonaws.com certificate; AWS itself falls back to path.
    virtual_ok = re.fullmatch(r"[a-z0-9][a-z0-9-]{1,61}[a-z0-9]", bucket) is not None
    if style == "path" or not on_aws or not virtual_ok:
        return f"{endpoint}/{bucket}/{path}"
    return f"{parts.scheme}://{bucket}.{parts.netloc}/{path}"


def verify_upload(
    client: BaseClient,
    job: UploadJob,
    written: Mapping[str, Any],
    *,
    size: int,
    sha256: str | None,
    sha256_composite: str | None,
    etag: Callable[[], str],
) -> None:
    """Check what S3 stored; on a mismatch delete the object (see below) and raise.

    When the write response itself carries the SHA-256 we sent (S3 computed it over the
    bytes it stored: the whole object, or the parts it assembled), that settles it;
    otherwise HeadObject tells, by its SHA-256 or else by its MD5 ETag (``etag()`` gives
    the expected one, computed only then).
    """
    if written.get("ChecksumSHA256") and (sha256 or sha256_composite):
        proven = verify_stored(written, size=size, sha256=sha256, sha256_composite=sha256_composite)
        if proven is None:
            return
    args: dict[str, Any] = {"Bucket": job.bucket, "Key": job.key}
    version = written.get("VersionId")
    if version and version != "null":  # the version we wrote, not a later writer's
        args["VersionId"] = version
    if job.options.checksums:
        args["ChecksumMode"] = "ENABLED"
    try:
        stored: Mapping[str, Any] = client.head_object(**args)
    except ClientError as exc:
        err = classify(exc)
        if err.http_status == 404:  # eventually consistent S3-compatible stores
            raise UploadError(
                f"object not found right after the upload ({err.message})",
                transient=True,
                http_status=404,
                code=err.code,
            ) from exc
        if err.http_status != 403:
            raise err from exc
        # Write-only credentials (s3:PutObject without s3:GetObject) are common; S3 has
        # already checked Content-MD5 and the checksums, so the write response is used.
        log.warning(
            "HeadObject denied; verifying the upload from the write response",
            extra={"action": "s3.verify_head_denied", "bucket": job.bucket, "key": job.key},
        )
        stored = written
    except BotoCoreError as exc:
        raise classify(exc) from exc
    problem = verify_stored(
        stored, size=size, sha256=sha256, sha256_composite=sha256_composite, etag=etag
    )
    if problem is None:
        return
    # Decision: a stored object that differs from the source is deleted. A corrupt file
    # under the expected name would be served as if good, while the request says "failed".
    # Only when its ETag is the one our write returned: never delete another writer's object.
    deleted = False
    if stored is not written and stored.get("ETag") == written.get("ETag"):
        delete_args = {k: v for k, v in args.items() if k != "ChecksumMode"}
        try:
            client.delete_object(**delete_args)
            deleted = True
        except (ClientError, BotoCoreError) as exc:
            log.warning(
                "could not delete the mismatching object: %s",
                classify(exc),
                extra={"action": "s3.verify_delete_failed", "bucket": job.bucket},
            )
    raise UploadError(
        f"integrity check failed: {problem}"
        + ("; the object was deleted" if deleted else "; the object was left in place"),
        transient=False,
        http_status=None,
        code=INTEGRITY_ERROR,
    )


def build_result(
    client: BaseClient,
    job: UploadJob,
    response: Mapping[str, Any],
    *,
    sha: bytes,
    size: int,
    sent: int,
    total: int,
) -> UploadResult:
    url = object_url(client, job.bucket, job.key)
    results = dict.fromkeys(RESULT_KEYS, "")
    results |= {"Bucket": job.bucket, "Key": job.key, "ObjectURL": url, "Location": url}
    for name in RESULT_KEYS:
        value = response.get(name)
        if value:
            results[name] = str(value)
    return UploadResult(
        results=results,
        http_status=int(response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 200),
        sha256=sha.hex(),
        size=size,
        parts_sent=sent,
        parts_total=total,
    )
