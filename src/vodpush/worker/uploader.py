"""The S3 upload engine: one local file to one S3 object, resumable, memory-bounded, verified.

No database here. Multipart progress goes through the small ``PartLedger`` interface
(``vodpush.core.checkpoint``: a DB-backed ledger lives in persistence, ``MemoryLedger`` is
the in-memory fake), and the botocore client is always passed in (see
``vodpush.worker.s3client``).

Failure policy, in one place:

- every error leaves as ``UploadError`` with ``transient`` set by ``classify`` (a pure
  function; only named transient errors are retryable);
- permanent failure: the multipart upload is aborted and the ledger cleared;
- transient failure or ``UploadInterrupted``: the multipart upload and the ledger are kept,
  so the next attempt resumes from the completed parts (``abandon`` cleans up when the
  caller gives up);
- any other exception (a bug, a ledger/database failure) propagates unchanged and keeps the
  upload, like an interruption.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import logging
import mimetypes
import os
import re
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from botocore.client import BaseClient
from botocore.exceptions import (
    BotoCoreError,
    ChecksumError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    CredentialRetrievalError,
    EndpointConnectionError,
    FlexibleChecksumError,
    IncompleteReadError,
    NoCredentialsError,
    PartialCredentialsError,
    ProxyConnectionError,
    ReadTimeoutError,
    ResponseStreamingError,
)

from vodpush.core.checkpoint import MultipartCheckpoint, PartLedger, PartRecord
from vodpush.core.options import CANNED_ACLS, MAX_KEY_BYTES, SSE_CHOICES, SSE_KMS
from vodpush.core.records import RESULT_KEYS
from vodpush.metadata import for_s3
from vodpush.sestore import OpenFile, PathRefused, open_plain

__all__ = [
    "MAX_PARTS",
    "MAX_PART_SIZE",
    "MAX_PUT_SIZE",
    "MIN_PART_SIZE",
    "UploadError",
    "UploadInterrupted",
    "UploadJob",
    "UploadResult",
    "abandon",
    "abort_multipart",
    "classify",
    "guess_content_type",
    "object_url",
    "upload",
    "verify_stored",
]

log = logging.getLogger(__name__)

MiB = 1024 * 1024
GiB = 1024 * MiB
MIN_PART_SIZE = 5 * MiB  # S3's minimum for every part but the last
MAX_PART_SIZE = 5 * GiB
MAX_PUT_SIZE = 5 * GiB  # largest single PutObject
MAX_PARTS = 10_000
MAX_OBJECT_SIZE = 5 * 1024 * GiB

# Codes of our own, beside S3's.
SOURCE_CHANGED = "SourceChanged"
INTEGRITY_ERROR = "IntegrityError"
INTERRUPTED = "Interrupted"
_STALE_CHECKPOINT = ("NoSuchUpload", "InvalidPart")

Progress = Callable[[int, int], None]
ShouldStop = Callable[[], bool]
SourceOpener = Callable[[], OpenFile]
# What UploadJob.source may be: see _Source.
Source = Path | OpenFile | SourceOpener


# -- what to upload, and what came of it ----------------------------------------------------


@dataclass(frozen=True)
class UploadJob:
    """One upload. ``source`` is where the bytes come from: a path the operator names
    (opened as given, following symlinks: tests, benchmarks, library use), or for a
    customer's file a function that opens it safely, called at the start of each attempt
    (the worker passes ``sestore.open_source``), or an ``OpenFile`` already open (the
    caller closes it). The uploader never opens a customer's file by name."""

    source: Source
    bucket: str
    key: str
    acl: str = "private"
    metadata: dict[str, str] = field(default_factory=dict)
    sse: str | None = None
    sse_kms_key_id: str | None = None
    checksums: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.source, str | os.PathLike):
            object.__setattr__(self, "source", Path(self.source))
        elif not (isinstance(self.source, OpenFile) or callable(self.source)):
            raise ValueError("source must be a path, an OpenFile or a function opening one")
        if not self.bucket:
            raise ValueError("bucket must not be empty")
        if not self.key or len(self.key.encode("utf-8")) > MAX_KEY_BYTES:
            raise ValueError(f"key must be 1 to {MAX_KEY_BYTES} bytes of UTF-8")
        if self.acl not in CANNED_ACLS:
            raise ValueError(f"acl must be one of {', '.join(CANNED_ACLS)}, not {self.acl!r}")
        if self.sse is not None and self.sse not in SSE_CHOICES:
            raise ValueError(f"sse must be None or one of {', '.join(SSE_CHOICES)}")
        if self.sse_kms_key_id and self.sse != SSE_KMS:
            raise ValueError("sse_kms_key_id needs sse='aws:kms'")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in self.metadata.items()):
            raise ValueError("metadata keys and values must be strings")


@dataclass(frozen=True)
class UploadResult:
    results: dict[str, str]  # exactly RESULT_KEYS, "" where S3 said nothing
    http_status: int
    sha256: str  # hex digest of the bytes read (and sent)
    size: int
    parts_sent: int  # parts (or puts) sent by this call
    parts_total: int


class UploadError(Exception):
    """An upload failed; ``str()`` is a message fit for the request's status."""

    def __init__(
        self,
        message: str,
        *,
        transient: bool,
        http_status: int | None = None,
        code: str | None = None,
        detail: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.transient = transient
        self.http_status = http_status
        self.code = code
        # For the operator's log only: ``message`` is shown to the customer and must not
        # tell them the operator's endpoints or addresses.
        self.detail = detail

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.message!r}, transient={self.transient}, "
            f"http_status={self.http_status}, code={self.code!r})"
        )


class UploadInterrupted(UploadError):
    """``should_stop`` asked to stop; completed parts are kept for the next attempt."""

    def __init__(self, message: str = "upload interrupted; it will resume") -> None:
        super().__init__(message, transient=True, code=INTERRUPTED)


# -- pure helpers ---------------------------------------------------------------------------

# Types the platform's mime.types may lack or get wrong (.ts is TypeScript on some systems).
_VIDEO_TYPES = {
    ".mp4": "video/mp4",
    ".m4v": "video/x-m4v",
    ".m4a": "audio/mp4",
    ".m4s": "video/iso.segment",
    ".mov": "video/quicktime",
    ".mkv": "video/x-matroska",
    ".webm": "video/webm",
    ".ts": "video/mp2t",
    ".m2ts": "video/mp2t",
    ".mts": "video/mp2t",
    ".m3u8": "application/vnd.apple.mpegurl",
    ".m3u": "audio/x-mpegurl",
    ".mpd": "application/dash+xml",
    ".flv": "video/x-flv",
    ".f4v": "video/mp4",
    ".avi": "video/x-msvideo",
    ".wmv": "video/x-ms-wmv",
    ".mpg": "video/mpeg",
    ".mpeg": "video/mpeg",
    ".3gp": "video/3gpp",
    ".ogv": "video/ogg",
    ".mp3": "audio/mpeg",
    ".aac": "audio/aac",
    ".vtt": "text/vtt",
    ".srt": "application/x-subrip",
}
_COMPRESSED_TYPES = {
    "gzip": "application/gzip",
    "bzip2": "application/x-bzip2",
    "xz": "application/x-xz",
}
DEFAULT_CONTENT_TYPE = "application/octet-stream"


def guess_content_type(*names: str) -> str:
    """The Content-Type for the first of ``names`` (object key, then file name) that tells."""
    for name in names:
        suffix = os.path.splitext(name)[1].lower()
        if suffix in _VIDEO_TYPES:
            return _VIDEO_TYPES[suffix]
        guessed, encoding = mimetypes.guess_type(name, strict=False)
        if encoding is not None:
            # x.tar.gz holds gzip bytes; announcing application/x-tar would be a lie.
            return _COMPRESSED_TYPES.get(encoding, DEFAULT_CONTENT_TYPE)
        if guessed:
            return guessed
    return DEFAULT_CONTENT_TYPE


_TRANSIENT_CODES = frozenset(
    {
        "BadDigest",  # body corrupted in transit: sending it again fixes it
        "BandwidthLimitExceeded",
        "IncompleteBody",
        "InternalError",
        "OperationAborted",
        "PriorRequestNotComplete",
        "RequestLimitExceeded",
        "RequestTimeout",
        "RequestTimeoutException",
        "ServiceUnavailable",
        "SlowDown",
        "TooManyRequestsException",
        "XAmzContentSHA256Mismatch",
    }
)
_TRANSIENT_BOTOCORE = (
    EndpointConnectionError,
    ConnectTimeoutError,
    ProxyConnectionError,
    ConnectionClosedError,
    ReadTimeoutError,
    ResponseStreamingError,
    IncompleteReadError,
    ChecksumError,
    FlexibleChecksumError,
    CredentialRetrievalError,  # instance metadata / SSO endpoints hiccup too
)
_TRANSIENT_ERRNOS = frozenset(
    {errno.EIO, errno.EAGAIN, errno.EINTR, errno.ETIMEDOUT, getattr(errno, "ESTALE", -1)}
)


# What the customer is told of a connection error: botocore's own texts name the endpoint
# URL, which for the operator's default S3 settings is the operator's business.
_CONNECTION_PHRASES: dict[type[BaseException], str] = {
    EndpointConnectionError: "could not connect to the S3 endpoint",
    ConnectTimeoutError: "connecting to the S3 endpoint timed out",
    ProxyConnectionError: "could not connect through the proxy to S3",
    ConnectionClosedError: "S3 closed the connection",
    ReadTimeoutError: "S3 did not answer in time",
    ResponseStreamingError: "the answer of S3 was cut off",
    IncompleteReadError: "the answer of S3 was cut off",
    ChecksumError: "a checksum of the answer of S3 did not match",
    FlexibleChecksumError: "a checksum of the answer of S3 did not match",
    CredentialRetrievalError: "S3 credentials could not be fetched",
}


def classify(exc: BaseException) -> UploadError:
    """The UploadError for ``exc``: transient only for errors known to pass on their own."""
    if isinstance(exc, UploadError):
        return exc
    if isinstance(exc, ClientError):
        return _classify_client_error(exc)
    if isinstance(exc, _TRANSIENT_BOTOCORE):
        return UploadError(
            f"S3 connection error: {_CONNECTION_PHRASES.get(type(exc), 'the connection failed')}",
            transient=True,
            code=type(exc).__name__,
            detail=str(exc),
        )
    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        return UploadError(
            f"S3 credentials missing: {exc} (set them on the account or in the environment)",
            transient=False,
            code=type(exc).__name__,
        )
    if isinstance(exc, BotoCoreError):
        return UploadError(f"S3 client error: {exc}", transient=False, code=type(exc).__name__)
    if isinstance(exc, ConnectionError | TimeoutError):
        return UploadError(f"network error: {exc}", transient=True, code=type(exc).__name__)
    if isinstance(exc, OSError):
        return _classify_os_error(exc)
    return UploadError(f"unexpected error: {type(exc).__name__}: {exc}", transient=False)


def _classify_client_error(exc: ClientError) -> UploadError:
    error = exc.response.get("Error") or {}
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    code = str(error.get("Code") or "")
    message = str(error.get("Message") or "")
    if code.isdigit():  # HEAD responses have no body: botocore uses the status as the code
        status = status or int(code)
        code = ""
    if not code and status:
        try:
            code = HTTPStatus(status).phrase.replace(" ", "")
        except ValueError:
            code = f"HTTP{status}"
        message = message if message and not message.isdigit() else ""
    code = code or "Unknown"
    transient = (
        code in _TRANSIENT_CODES
        or "Throttl" in code
        or (status is not None and (status >= 500 or status in (408, 429)))
    )
    text = f"S3 error {code}" + (f" ({status})" if status else "")
    if message:
        text += f": {message}"
    return UploadError(text, transient=transient, http_status=status, code=code)


def _classify_os_error(exc: OSError) -> UploadError:
    name = exc.filename if exc.filename is not None else "?"
    reason = exc.strerror or str(exc)
    if isinstance(exc, FileNotFoundError):
        return UploadError(f"source file missing: {name}", transient=False, code="SourceMissing")
    if isinstance(exc, PermissionError):
        return UploadError(
            f"source file not readable (permission denied): {name}",
            transient=False,
            code="SourceUnreadable",
        )
    if isinstance(exc, IsADirectoryError | NotADirectoryError):
        return UploadError(
            f"source is not a regular file: {name}", transient=False, code="SourceNotFile"
        )
    if exc.errno in _TRANSIENT_ERRNOS:
        return UploadError(
            f"I/O error reading source file {name}: {reason}", transient=True, code="SourceIO"
        )
    return UploadError(
        f"cannot read source file {name}: {reason}", transient=False, code="SourceUnreadable"
    )


_MD5_ETAG = re.compile(r"^[0-9a-f]{32}(-[0-9]+)?$")


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
        or not _MD5_ETAG.match(stored_etag)
        or encryption.startswith(SSE_KMS)  # aws:kms and aws:kms:dsse
        or stored.get("SSECustomerAlgorithm")
    ):
        return None
    expected = etag() if callable(etag) else etag
    if stored_etag != expected:
        return f"S3 reports ETag {stored_etag}, expected {expected}"
    return None


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


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode("ascii")


def _md5(data: bytes) -> bytes:
    # MD5 only because S3's Content-MD5 and ETag use it.
    return hashlib.md5(data, usedforsecurity=False).digest()


def _multipart_etag(part_md5s: list[bytes]) -> str:
    """The ETag S3 gives a multipart object: ``md5(part md5s)-N``."""
    whole = hashlib.md5(b"".join(part_md5s), usedforsecurity=False).hexdigest()
    return f"{whole}-{len(part_md5s)}"


def _md5_or_none(data: bytes, job: UploadJob) -> bytes | None:
    """The Content-MD5 digest, needed only without SHA-256 checksums: with them S3 checks
    the body against the (signed) checksum header, as AWS's own SDKs now rely on, and
    hashing every byte once more would cost about a third of the worker's CPU."""
    return None if job.checksums else _md5(data)


def _part_size(size: int, chunksize: int) -> int:
    """``chunksize``, grown (to whole MiB) when the file would need more than 10,000 parts."""
    if size > MAX_OBJECT_SIZE:
        raise UploadError(
            f"source is {size} bytes; S3 objects are at most 5 TiB",
            transient=False,
            code="EntityTooLarge",
        )
    if -(-size // chunksize) <= MAX_PARTS:
        return chunksize
    needed = -(-size // MAX_PARTS)
    return -(-needed // MiB) * MiB


def _check_tuning(threshold: int, chunksize: int, concurrency: int) -> None:
    if not 1 <= threshold <= MAX_PUT_SIZE:
        raise ValueError(f"threshold must be 1 to {MAX_PUT_SIZE} bytes (S3's PutObject limit)")
    if not MIN_PART_SIZE <= chunksize <= MAX_PART_SIZE:
        raise ValueError(
            f"chunksize must be {MIN_PART_SIZE} to {MAX_PART_SIZE} bytes (S3's part limits)"
        )
    if concurrency < 1:
        raise ValueError("concurrency must be at least 1")


# -- the source file ------------------------------------------------------------------------


class _Source:
    """The open source file, with the identity it had when opened, read by offset
    (``os.pread``: no shared file position, and the name is never looked up again).

    ``source`` is a path (opened here, as given), an ``OpenFile`` already open (its owner
    closes it) or a function opening one (``sestore.open_source``: a customer's file).
    """

    def __init__(self, source: Source) -> None:
        if isinstance(source, OpenFile):
            self.file, self.owned = source, False
        else:
            self.file, self.owned = self._open(source), True
        self.path = self.file.path
        self.name = self.file.name
        self.size = self.file.size
        self.mtime_ns = self.file.identity.mtime_ns

    @staticmethod
    def _open(source: Path | SourceOpener) -> OpenFile:
        if isinstance(source, str | os.PathLike):
            try:
                return open_plain(Path(source))
            except PathRefused:
                raise UploadError(
                    f"source is not a regular file: {source}", transient=False, code="SourceNotFile"
                ) from None
            except OSError as exc:
                raise classify(exc) from exc
        try:
            return source()
        except PathRefused as exc:
            raise UploadError(
                f"source file unavailable: {exc}",
                transient=exc.transient,
                code="SourceUnavailable",
            ) from None

    def close(self) -> None:
        if self.owned:
            self.file.close()

    def changed(self, what: str) -> UploadError:
        # Transient: once the writer is done the file can be sent whole.
        return UploadError(
            f"source file changed while uploading ({what}): {self.path}",
            transient=True,
            code=SOURCE_CHANGED,
        )

    def _error(self, exc: OSError) -> UploadError:
        exc.filename = self.path  # reads go by fd: name the file in the message
        return classify(exc)

    def read_at(self, offset: int, length: int) -> bytes:
        chunks: list[bytes] = []
        try:
            while length:
                chunk = os.pread(self.file.fd, length, offset)
                if not chunk:
                    raise self.changed("it got shorter")
                chunks.append(chunk)
                offset += len(chunk)
                length -= len(chunk)
        except OSError as exc:
            raise self._error(exc) from exc
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def md5_etag(self, part_size: int | None) -> str:
        """The MD5 ETag of the file read again: of the whole, or with ``part_size`` the
        multipart ``md5(part md5s)-N``. Only for stores that report no SHA-256 to compare."""
        if part_size is None:
            return self._md5_of(0, self.size).hex()
        return _multipart_etag(
            [
                self._md5_of(offset, min(part_size, self.size - offset))
                for offset in range(0, self.size, part_size)
            ]
        )

    def _md5_of(self, offset: int, length: int) -> bytes:
        md5 = hashlib.md5(usedforsecurity=False)
        while length:
            step = min(length, 8 * MiB)  # bounded memory, whatever the length
            md5.update(self.read_at(offset, step))
            offset += step
            length -= step
        return md5.digest()

    def check_unchanged(self) -> None:
        """After the last byte: nothing was appended, and the open file is the one opened
        (size, mtime, ctime, inode)."""
        try:
            extra = os.pread(self.file.fd, 1, self.size)
            what = self.file.changed()
        except OSError as exc:
            raise self._error(exc) from exc
        if extra:
            raise self.changed("its size changed")
        if what is not None:
            raise self.changed(what)


# -- the engine ------------------------------------------------------------------------------


def upload(
    client: BaseClient,
    job: UploadJob,
    ledger: PartLedger,
    *,
    threshold: int,
    chunksize: int,
    concurrency: int,
    progress: Progress | None = None,
    should_stop: ShouldStop | None = None,
) -> UploadResult:
    """Upload ``job.source`` to ``s3://job.bucket/job.key`` and verify what S3 stored.

    Below ``threshold`` bytes one PutObject; from it on a multipart upload of ``chunksize``
    parts, ``concurrency`` at a time, resuming from ``ledger``. ``progress(done, total)`` is
    called (never concurrently) as parts complete; ``should_stop()`` is polled between parts.
    Raises UploadError (UploadInterrupted when stopped); see the module doc for cleanup.
    """
    _check_tuning(threshold, chunksize, concurrency)
    try:
        if should_stop is not None and should_stop():
            raise UploadInterrupted("upload interrupted before it started")
        source = _Source(job.source)
        try:
            if source.size < threshold:
                return _put_single(client, job, ledger, source, progress)
            return _Multipart(
                client=client,
                job=job,
                ledger=ledger,
                source=source,
                chunksize=_part_size(source.size, chunksize),
                concurrency=concurrency,
                progress=progress,
                should_stop=should_stop,
            ).run()
        finally:
            source.close()
    except UploadInterrupted:
        raise
    except UploadError as err:
        # A changed source or a vanished upload make the checkpoint useless even though a
        # retry may succeed: start that retry from scratch.
        if not err.transient or err.code in (SOURCE_CHANGED, *_STALE_CHECKPOINT):
            _abandon_quietly(client, job, ledger)
        raise


def abort_multipart(client: BaseClient, bucket: str, key: str, upload_id: str) -> bool:
    """Abort a multipart upload; True when it is gone (or already was). Never raises."""
    extra = {"bucket": bucket, "key": key, "upload_id": upload_id}
    try:
        client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
    except (ClientError, BotoCoreError) as exc:
        err = classify(exc)
        if err.code in ("NoSuchUpload", "NoSuchBucket"):  # gone already
            return True
        log.warning(
            "abort of multipart upload failed: %s",
            err,
            extra={"action": "s3.multipart.abort_failed", **extra},
        )
        return False
    log.info("multipart upload aborted", extra={"action": "s3.multipart.abort", **extra})
    return True


def abandon(client: BaseClient, job: UploadJob, ledger: PartLedger) -> bool:
    """Give up on ``job``: abort its multipart upload, if any, and clear the ledger.

    False when the abort failed (network, permissions): the checkpoint is then kept, so
    the upload id is not lost and a later call can try again.
    """
    checkpoint = ledger.load()
    if checkpoint is None:
        return True  # nothing to abort, nothing to clear (and no write)
    if not abort_multipart(client, job.bucket, job.key, checkpoint.upload_id):
        return False
    ledger.clear()
    return True


def _abandon_quietly(client: BaseClient, job: UploadJob, ledger: PartLedger) -> None:
    # Cleanup must not hide the error that caused it.
    try:
        abandon(client, job, ledger)
    except Exception:
        log.exception(
            "could not clean up after a failed upload",
            extra={"action": "s3.cleanup_failed", "bucket": job.bucket, "key": job.key},
        )


def _object_args(job: UploadJob, name: str) -> dict[str, Any]:
    args: dict[str, Any] = {
        "Bucket": job.bucket,
        "Key": job.key,
        "ContentType": guess_content_type(job.key, name),
        "Metadata": for_s3(job.metadata),
    }
    # "private" is what S3 does without an ACL; not sending it keeps buckets with ACLs
    # disabled (Object Ownership "bucket owner enforced", the AWS default) working.
    if job.acl != "private":
        args["ACL"] = job.acl
    if job.sse is not None:
        args["ServerSideEncryption"] = job.sse
        if job.sse_kms_key_id:
            args["SSEKMSKeyId"] = job.sse_kms_key_id
    return args


def _s3_call(method: Callable[..., dict[str, Any]], **kwargs: Any) -> dict[str, Any]:
    try:
        return method(**kwargs)
    except (ClientError, BotoCoreError) as exc:
        raise classify(exc) from exc


def _put_single(
    client: BaseClient,
    job: UploadJob,
    ledger: PartLedger,
    source: _Source,
    progress: Progress | None,
) -> UploadResult:
    abandon(client, job, ledger)  # a checkpoint from an earlier, larger version of the file
    data = source.read_at(0, source.size)
    source.check_unchanged()
    sha = hashlib.sha256(data).digest()
    md5 = _md5_or_none(data, job)
    args = _object_args(job, source.name) | {"Body": data}
    if md5 is not None:
        args["ContentMD5"] = _b64(md5)
    if job.checksums:
        args |= {"ChecksumAlgorithm": "SHA256", "ChecksumSHA256": _b64(sha)}
    response = _s3_call(client.put_object, **args)
    if progress is not None:
        progress(source.size, source.size)
    _verify(
        client,
        job,
        response,
        size=source.size,
        sha256=_b64(sha) if job.checksums else None,
        sha256_composite=None,
        etag=(lambda: md5.hex()) if md5 is not None else (lambda: source.md5_etag(None)),
    )
    return _result(client, job, response, sha=sha, size=source.size, sent=1, total=1)


def _verify(
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
    if job.checksums:
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


def _result(
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


@dataclass(frozen=True)
class _DonePart:
    record: PartRecord
    md5: bytes | None  # None with checksums on (see _md5_or_none)
    sha256: bytes | None


class _Multipart:
    """One multipart upload attempt. The calling thread reads the file in order (hashing
    the whole of it); parts go to ``concurrency`` threads. A semaphore of concurrency + 1
    slots bounds the buffers alive: one being read, the rest queued or in flight."""

    def __init__(
        self,
        *,
        client: BaseClient,
        job: UploadJob,
        ledger: PartLedger,
        source: _Source,
        chunksize: int,
        concurrency: int,
        progress: Progress | None,
        should_stop: ShouldStop | None,
    ) -> None:
        self.client = client
        self.job = job
        self.ledger = ledger
        self.source = source
        self.chunksize = chunksize
        self.concurrency = concurrency
        self.progress = progress
        self.should_stop = should_stop
        self.total = -(-source.size // chunksize)
        self.upload_id = ""
        self._lock = threading.Lock()  # guards the fields below and serializes progress
        self._done: dict[int, _DonePart] = {}
        self._sent = 0
        self._bytes_done = 0
        self._errors: list[BaseException] = []
        self._failed = threading.Event()
        self._slots = threading.BoundedSemaphore(concurrency + 1)

    def _log(self, message: str, action: str, **extra: Any) -> None:
        log.info(
            message,
            extra={
                "action": action,
                "bucket": self.job.bucket,
                "key": self.job.key,
                "upload_id": self.upload_id,
                **extra,
            },
        )

    # -- lifecycle ----------------------------------------------------------------------

    def run(self) -> UploadResult:
        checkpoint = self._resume() or self._create()
        self.upload_id = checkpoint.upload_id
        try:
            sha = self._send_parts(checkpoint)
            response = self._complete()
        except UploadError as err:
            # The upload was aborted behind our back (or expired), or S3 lacks a part the
            # ledger claims: the checkpoint is wrong, but a fresh upload will work.
            if err.code in _STALE_CHECKPOINT:
                raise UploadError(
                    f"{err.message}; the next attempt starts the upload over",
                    transient=True,
                    http_status=err.http_status,
                    code=err.code,
                ) from err
            raise
        digests = [self._done[n] for n in range(1, self.total + 1)]
        composite = hashlib.sha256(b"".join(d.sha256 or b"" for d in digests)).digest()
        _verify(
            self.client,
            self.job,
            response,
            size=self.source.size,
            sha256=_b64(sha) if self.job.checksums else None,
            sha256_composite=f"{_b64(composite)}-{self.total}" if self.job.checksums else None,
            etag=lambda: self._expected_etag(digests),
        )
        self.ledger.clear()
        self._log("multipart upload completed", "s3.multipart.complete", parts=self.total)
        return _result(
            self.client,
            self.job,
            response,
            sha=sha,
            size=self.source.size,
            sent=self._sent,
            total=self.total,
        )

    def _expected_etag(self, digests: list[_DonePart]) -> str:
        md5s = [d.md5 for d in digests if d.md5 is not None]
        if len(md5s) < len(digests):  # checksums on: no part MD5s were computed
            return self.source.md5_etag(self.chunksize)
        return _multipart_etag(md5s)

    def _resume(self) -> MultipartCheckpoint | None:
        """The checkpoint to continue, with only parts S3 still holds; None to start over."""
        checkpoint = self.ledger.load()
        if checkpoint is None:
            return None
        same = (checkpoint.size, checkpoint.mtime_ns, checkpoint.chunksize, checkpoint.checksums)
        if same != (self.source.size, self.source.mtime_ns, self.chunksize, self.job.checksums):
            self._drop(checkpoint, "source or part size changed")
            return None
        try:
            listed = self._list_parts(checkpoint.upload_id)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code")
            if code == "NoSuchUpload":
                self._drop(checkpoint, "upload gone from S3")
                return None
            if code not in ("AccessDenied", "NotImplemented"):
                raise classify(exc) from exc
            # Without s3:ListMultipartUploadParts (or ListParts at all), trust the ledger;
            # a part S3 lacks shows up as NoSuchUpload or InvalidPart, and the retry starts
            # over.
            listed = None
        except BotoCoreError as exc:
            raise classify(exc) from exc
        parts = {
            number: record
            for number, record in checkpoint.parts.items()
            if listed is None or listed.get(number) == (record.etag.strip('"'), record.size)
        }
        self._log(
            "resuming multipart upload",
            "s3.multipart.resume",
            upload_id=checkpoint.upload_id,
            parts_done=len(parts),
        )
        return replace(checkpoint, parts=parts)

    def _drop(self, checkpoint: MultipartCheckpoint, why: str) -> None:
        self._log(
            f"discarding checkpoint: {why}", "s3.multipart.discard", upload_id=checkpoint.upload_id
        )
        abort_multipart(self.client, self.job.bucket, self.job.key, checkpoint.upload_id)
        self.ledger.clear()

    def _list_parts(self, upload_id: str) -> dict[int, tuple[str, int]]:
        listed: dict[int, tuple[str, int]] = {}
        paginator = self.client.get_paginator("list_parts")
        for page in paginator.paginate(
            Bucket=self.job.bucket, Key=self.job.key, UploadId=upload_id
        ):
            for part in page.get("Parts", []):
                listed[int(part["PartNumber"])] = (str(part["ETag"]).strip('"'), int(part["Size"]))
        return listed

    def _create(self) -> MultipartCheckpoint:
        args = _object_args(self.job, self.source.name)
        if self.job.checksums:
            args["ChecksumAlgorithm"] = "SHA256"
        response = _s3_call(self.client.create_multipart_upload, **args)
        upload_id = str(response["UploadId"])
        checkpoint = MultipartCheckpoint(
            upload_id=upload_id,
            chunksize=self.chunksize,
            size=self.source.size,
            mtime_ns=self.source.mtime_ns,
            checksums=self.job.checksums,
        )
        # The upload exists from here on: if it cannot be recorded, nobody could ever
        # resume or abort it, so abort it now.
        try:
            self.ledger.begin(checkpoint)
        except BaseException:
            abort_multipart(self.client, self.job.bucket, self.job.key, upload_id)
            raise
        self.upload_id = upload_id
        self._log("multipart upload created", "s3.multipart.create", parts=self.total)
        return checkpoint

    def _complete(self) -> dict[str, Any]:
        parts = []
        for number in range(1, self.total + 1):
            record = self._done[number].record
            entry: dict[str, Any] = {"PartNumber": number, "ETag": record.etag}
            if self.job.checksums and record.checksum_sha256:
                entry["ChecksumSHA256"] = record.checksum_sha256
            parts.append(entry)
        return _s3_call(
            self.client.complete_multipart_upload,
            Bucket=self.job.bucket,
            Key=self.job.key,
            UploadId=self.upload_id,
            MultipartUpload={"Parts": parts},
        )

    # -- reading and sending parts -------------------------------------------------------

    def _send_parts(self, checkpoint: MultipartCheckpoint) -> bytes:
        """Read every part, send those S3 lacks; the SHA-256 digest of the whole file."""
        whole = hashlib.sha256()
        stopped = False
        futures: list[Future[None]] = []
        with ThreadPoolExecutor(self.concurrency, thread_name_prefix="vodpush-part") as pool:
            try:
                for number in range(1, self.total + 1):
                    if self._failed.is_set():
                        break
                    if self.should_stop is not None and self.should_stop():
                        stopped = True
                        break
                    self._slots.acquire()
                    handed_off = False
                    try:
                        if self._failed.is_set():
                            break
                        offset = (number - 1) * self.chunksize
                        data = self.source.read_at(
                            offset, min(self.chunksize, self.source.size - offset)
                        )
                        whole.update(data)
                        done = self._already_sent(checkpoint.parts.get(number), data)
                        if done is not None:
                            self._record(number, done, sent=False)
                        else:
                            futures.append(pool.submit(self._send_part, number, data))
                            handed_off = True
                        del data  # the buffer must die with its upload, not live on here
                    finally:
                        if not handed_off:
                            self._slots.release()
                else:
                    self.source.check_unchanged()
            except UploadError as err:
                self._fail(err)
            except BaseException:
                self._failed.set()  # queued parts must not start
                for future in futures:
                    future.cancel()
                raise
        if self._errors:
            raise self._worst_error()
        if stopped:
            self._log("multipart upload interrupted", "s3.multipart.interrupted")
            raise UploadInterrupted()
        return whole.digest()

    def _already_sent(self, record: PartRecord | None, data: bytes) -> _DonePart | None:
        """The part, when S3 already holds exactly ``data`` for it; else None (send it)."""
        if record is None or record.size != len(data):
            return None
        if self.job.checksums:
            sha = hashlib.sha256(data).digest()
            return _DonePart(record, None, sha) if record.checksum_sha256 == _b64(sha) else None
        md5 = _md5(data)
        etag = record.etag.strip('"')
        if _MD5_ETAG.match(etag) and etag != md5.hex():
            return None
        # Not an MD5 ETag (SSE-KMS): size and mtime matched the checkpoint, trust it.
        return _DonePart(record, md5, None)

    def _send_part(self, number: int, data: bytes) -> None:
        try:
            if self._failed.is_set():
                return
            md5 = _md5_or_none(data, self.job)
            sha = hashlib.sha256(data).digest() if self.job.checksums else None
            args: dict[str, Any] = {
                "Bucket": self.job.bucket,
                "Key": self.job.key,
                "UploadId": self.upload_id,
                "PartNumber": number,
                "Body": data,
            }
            # Either header makes S3 refuse the part if the bytes differ.
            if md5 is not None:
                args["ContentMD5"] = _b64(md5)
            if sha is not None:
                args |= {"ChecksumAlgorithm": "SHA256", "ChecksumSHA256": _b64(sha)}
            response = _s3_call(self.client.upload_part, **args)
            record = PartRecord(
                etag=str(response["ETag"]),
                checksum_sha256=_b64(sha) if sha is not None else None,
                size=len(data),
            )
            self.ledger.part_done(number, record)
            self._record(number, _DonePart(record, md5, sha), sent=True)
        except BaseException as exc:  # handed to the reading thread, which re-raises
            self._fail(exc)
        finally:
            self._slots.release()

    def _record(self, number: int, part: _DonePart, *, sent: bool) -> None:
        with self._lock:
            self._done[number] = part
            self._sent += sent
            self._bytes_done += part.record.size
            if self.progress is not None:
                self.progress(self._bytes_done, self.source.size)

    def _fail(self, exc: BaseException) -> None:
        with self._lock:
            self._errors.append(exc)
        self._failed.set()

    def _worst_error(self) -> BaseException:
        """Unexpected exceptions first (bugs must surface), then permanent failures."""
        for exc in self._errors:
            if not isinstance(exc, UploadError):
                return exc
        for exc in self._errors:
            if isinstance(exc, UploadError) and not exc.transient:
                return exc
        return self._errors[0]
