"""What S3 stored: compared with what was read (deleting a mismatch), and reported."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import quote, urlsplit

from botocore.client import BaseClient
from botocore.exceptions import BotoCoreError, ClientError

from vodpush.core.options import SSE_KMS
from vodpush.core.records import RESULT_KEYS
from vodpush.transfer.errors import INTEGRITY_ERROR, UploadError, classify
from vodpush.transfer.hashing import MD5_ETAG
from vodpush.transfer.job import UploadJob, UploadResult

__all__ = ["build_result", "holds_same", "object_url", "verify_stored", "verify_upload"]

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
        expected = _sums_to_compare(stored, sha256, sha256_composite)
        if stored_sum not in expected:
            wanted = " or ".join(sorted(expected))
            return f"S3 reports SHA-256 {stored_sum}, expected {wanted}"
        return None
    stored_etag = _md5_etag(stored)
    if not etag or stored_etag is None:
        return None
    expected_etag = etag() if callable(etag) else etag
    if stored_etag != expected_etag:
        return f"S3 reports ETag {stored_etag}, expected {expected_etag}"
    return None


def holds_same(
    stored: Mapping[str, Any],
    *,
    size: int,
    sha256: str | None = None,
    sha256_composite: str | None = None,
    etag: str | Callable[[], str] | None = None,
) -> bool:
    """Whether the object ``stored`` describes (a HeadObject response) provably holds the
    bytes we have: the same size, and a SHA-256 or else an MD5 ETag equal to ours.

    The arguments are those of ``verify_stored``, which finds no fault where nothing can
    be compared; this wants proof, and is False then (an object under SSE-KMS stored
    without a SHA-256): an object that is not proven ours is written again, never claimed.
    """
    if stored.get("ContentLength") != size:
        return False
    stored_sum = stored.get("ChecksumSHA256")
    if stored_sum and (sha256 or sha256_composite):
        return stored_sum in _sums_to_compare(stored, sha256, sha256_composite)
    stored_etag = _md5_etag(stored)
    if not etag or stored_etag is None:
        return False
    return stored_etag == (etag() if callable(etag) else etag)


def _sums_to_compare(
    stored: Mapping[str, Any], sha256: str | None, sha256_composite: str | None
) -> set[str]:
    """Which of our sums the SHA-256 S3 reports is to be equal to."""
    stored_sum = str(stored.get("ChecksumSHA256") or "")
    if stored.get("ChecksumType") == "FULL_OBJECT":
        expected = {sha256}
    elif "-" in stored_sum:
        expected = {sha256_composite}
    else:  # a composite without its "-N" (moto's HeadObject), or a full-object sum
        expected = {sha256, (sha256_composite or "").partition("-")[0] or None}
    return {value for value in expected if value}


def _md5_etag(stored: Mapping[str, Any]) -> str | None:
    """The stored ETag when it is an MD5 (of the object, or multipart): not under SSE-KMS
    or SSE-C, whose ETags are not."""
    stored_etag = str(stored.get("ETag") or "").strip('"')
    encryption = str(stored.get("ServerSideEncryption") or "")
    if (
        not MD5_ETAG.match(stored_etag)
        or encryption.startswith(SSE_KMS)
        or stored.get("SSECustomerAlgorithm")
    ):
        return None
    return stored_etag


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
