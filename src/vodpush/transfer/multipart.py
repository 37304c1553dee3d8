"""A file from the multipart threshold on: parts read in order, sent by a thread pool,
recorded in the ledger as they complete, resumed from it after a crash, then verified.

The checkpoint outlives the completed upload: the caller drops it with its record of the
outcome (``queue.succeed``). A worker killed between CompleteMultipartUpload and that
record leaves a checkpoint whose upload S3 no longer knows (NoSuchUpload); the next attempt
then looks at the object under the key, and when it is the one these parts make, and the
file still holds these parts, that object is the result: nothing is sent again.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import threading
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import Any

from botocore.client import BaseClient
from botocore.exceptions import BotoCoreError, ClientError

from vodpush.core.checkpoint import MultipartCheckpoint, PartLedger, PartRecord
from vodpush.transfer.cleanup import abort_multipart
from vodpush.transfer.errors import (
    STALE_CHECKPOINT,
    UploadError,
    UploadInterrupted,
    classify,
    s3_call,
)
from vodpush.transfer.existing import find_same
from vodpush.transfer.hashing import MD5_ETAG, b64, md5, md5_or_none, multipart_etag
from vodpush.transfer.job import Progress, ShouldStop, UploadJob, UploadResult
from vodpush.transfer.source import SourceFile
from vodpush.transfer.threads import DaemonPool
from vodpush.transfer.verify import build_result, verify_upload

__all__ = ["Multipart"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _DonePart:
    record: PartRecord
    md5: bytes | None  # None with checksums on (see md5_or_none)
    sha256: bytes | None


class Multipart:
    """One multipart upload attempt. The calling thread reads the file in order (hashing
    the whole of it); parts go to ``concurrency`` threads. A semaphore of concurrency + 1
    slots bounds the buffers alive: one being read, the rest queued or in flight."""

    def __init__(
        self,
        *,
        client: BaseClient,
        job: UploadJob,
        ledger: PartLedger,
        source: SourceFile,
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
        checkpoint = self.ledger.load()
        if checkpoint is not None:
            resumed = self._resume(checkpoint)
            if isinstance(resumed, UploadResult):
                return resumed
            checkpoint = resumed
        if checkpoint is None:
            checkpoint = self._create()
        self.upload_id = checkpoint.upload_id
        try:
            sha = self._send_parts(checkpoint)
            try:
                response = self._complete()
            except UploadError as err:
                # AWS answers NoSuchUpload to a Complete that had already succeeded (its
                # answer was lost, botocore sent it again): the object may be there.
                found = self._completed_already(err, checkpoint, sha)
                if found is not None:
                    return found
                raise
        except UploadError as err:
            # The upload was aborted behind our back (or expired), or S3 lacks a part the
            # ledger claims: the checkpoint is wrong, but a fresh upload will work.
            if err.code in STALE_CHECKPOINT:
                raise UploadError(
                    f"{err.message}; the next attempt starts the upload over",
                    transient=True,
                    http_status=err.http_status,
                    code=err.code,
                ) from err
            raise
        digests = [self._done[n] for n in range(1, self.total + 1)]
        composite = hashlib.sha256(b"".join(d.sha256 or b"" for d in digests)).digest()
        verify_upload(
            self.client,
            self.job,
            response,
            size=self.source.size,
            sha256=b64(sha) if self.job.options.checksums else None,
            sha256_composite=f"{b64(composite)}-{self.total}"
            if self.job.options.checksums
            else None,
            etag=lambda: self._expected_etag(digests),
        )
        # The checkpoint stays: the caller drops it with the record of success (see above).
        self._log("multipart upload completed", "s3.multipart.complete", parts=self.total)
        result = build_result(
            self.client,
            self.job,
            response,
            sha=sha,
            size=self.source.size,
            sent=self._sent,
            total=self.total,
        )
        return replace(result, completed_upload_id=checkpoint.upload_id)

    def _expected_etag(self, digests: list[_DonePart]) -> str:
        md5s = [d.md5 for d in digests if d.md5 is not None]
        if len(md5s) < len(digests):  # checksums on: no part MD5s were computed
            return self.source.md5_etag(self.chunksize)
        return multipart_etag(md5s)

    def _resume(self, checkpoint: MultipartCheckpoint) -> MultipartCheckpoint | UploadResult | None:
        """The checkpoint to continue, with only parts S3 still holds; or the object its
        upload completed to; or None to start over."""
        try:
            listed = self._list_parts(checkpoint.upload_id)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code")
            if code == "NoSuchUpload":
                found = self._adopt(checkpoint)
                if found is None:
                    self._drop(checkpoint, "upload gone from S3")
                return found
            if code not in ("AccessDenied", "NotImplemented"):
                raise classify(exc) from exc
            # Without s3:ListMultipartUploadParts (or ListParts at all), trust the ledger;
            # a part S3 lacks shows up as NoSuchUpload or InvalidPart, and the retry starts
            # over.
            listed = None
        except BotoCoreError as exc:
            raise classify(exc) from exc
        source = self.source
        same_file = checkpoint.same_file(
            size=source.size,
            mtime_ns=source.mtime_ns,
            ctime_ns=source.identity.ctime_ns,
            inode=source.identity.ino,
        )
        same_parts = (checkpoint.chunksize, checkpoint.checksums) == (
            self.chunksize,
            self.job.options.checksums,
        )
        if not (same_file and same_parts):
            # Parts of another version of the file must not be mixed into this one, even
            # where their hashes cannot be compared (SSE-KMS ETags): start over.
            self._drop(checkpoint, "source or part size changed")
            return None
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

    def _adopt(self, checkpoint: MultipartCheckpoint) -> UploadResult | None:
        """The object ``checkpoint``'s upload completed to, when S3 holds it under the key
        and the file still holds every part; None to start over.

        HeadObject first (the parts recorded tell what the completed object must be), so
        that an upload that was aborted costs one request; only then is the file read, once,
        as an upload reads it: each part compared with its record, the whole hashed for the
        result."""
        if checkpoint.size != self.source.size:
            return None
        stored = self._stored_object(checkpoint)
        if stored is None:
            return None
        sha = self._read_as_recorded(checkpoint)
        if sha is None:
            return None
        self.source.check_unchanged()
        return self._found(stored, checkpoint, sha, sent=0, how="by an earlier attempt")

    def _read_as_recorded(self, checkpoint: MultipartCheckpoint) -> bytes | None:
        """The SHA-256 of the file, read part by part; None as soon as a part differs from
        what the checkpoint recorded (the file is no longer what was uploaded)."""
        whole = hashlib.sha256()
        offset = 0
        for number in range(1, checkpoint.part_count + 1):
            if self.should_stop is not None and self.should_stop():
                raise UploadInterrupted()  # the checkpoint stays: the next attempt looks again
            record = checkpoint.parts[number]
            data = self.source.read_at(offset, record.size)
            whole.update(data)
            if checkpoint.checksums:
                same = record.checksum_sha256 == b64(hashlib.sha256(data).digest())
            else:
                same = record.etag.strip('"') == md5(data).hex()
            del data
            if not same:
                self._log(
                    "the file no longer holds the uploaded parts",
                    "s3.multipart.found_changed",
                    upload_id=checkpoint.upload_id,
                    part=number,
                )
                return None
            offset += record.size
            if self.progress is not None:
                self.progress(offset, self.source.size)
        return whole.digest()

    def _completed_already(
        self, err: UploadError, checkpoint: MultipartCheckpoint, sha: bytes
    ) -> UploadResult | None:
        """After CompleteMultipartUpload said NoSuchUpload: the object, when S3 holds the
        one these parts make (this attempt read every part and compared it or sent it)."""
        if err.code != "NoSuchUpload":
            return None
        done = replace(
            checkpoint, parts={n: self._done[n].record for n in range(1, self.total + 1)}
        )
        stored = self._stored_object(done)
        if stored is None:
            return None
        return self._found(stored, done, sha, sent=self._sent, how="though S3 lost track")

    def _stored_object(self, checkpoint: MultipartCheckpoint) -> dict[str, Any] | None:
        """HeadObject of the key, when it holds the object ``checkpoint``'s parts make."""
        expected = _completed_object(checkpoint)
        if expected is None:
            return None
        composite, etag = expected
        return find_same(
            self.client,
            self.job,
            file_name=self.source.name,
            size=checkpoint.size,
            sha256_composite=composite,
            etag=etag,
        )

    def _found(
        self,
        stored: dict[str, Any],
        checkpoint: MultipartCheckpoint,
        sha: bytes,
        *,
        sent: int,
        how: str,
    ) -> UploadResult:
        """The result of the upload S3 completed ``how``: the object was verified by
        ``find_same`` (size, SHA-256 or ETag against the parts, as after any upload)."""
        self._log(
            f"multipart upload found completed {how}",
            "s3.multipart.found_completed",
            upload_id=checkpoint.upload_id,
            version_id=stored.get("VersionId"),
            parts=checkpoint.part_count,
        )
        result = build_result(
            self.client,
            self.job,
            stored,
            sha=sha,
            size=self.source.size,
            sent=sent,
            total=checkpoint.part_count,
        )
        return replace(result, completed_upload_id=checkpoint.upload_id)

    def _drop(self, checkpoint: MultipartCheckpoint, why: str) -> None:
        self._log(
            f"discarding checkpoint: {why}", "s3.multipart.discard", upload_id=checkpoint.upload_id
        )
        if abort_multipart(self.client, self.job.bucket, self.job.key, checkpoint.upload_id):
            self.ledger.clear()
        else:
            self.ledger.give_up()  # the reaper aborts it later; this attempt starts anew

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
        args = self.job.object_arguments(self.source.name)  # what PutObject gets too
        response = s3_call(self.client.create_multipart_upload, **args)
        upload_id = str(response["UploadId"])
        checkpoint = MultipartCheckpoint(
            upload_id=upload_id,
            chunksize=self.chunksize,
            size=self.source.size,
            mtime_ns=self.source.mtime_ns,
            checksums=self.job.options.checksums,
            ctime_ns=self.source.identity.ctime_ns,
            inode=self.source.identity.ino,
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
            if self.job.options.checksums and record.checksum_sha256:
                entry["ChecksumSHA256"] = record.checksum_sha256
            parts.append(entry)
        # The object is written from here on: what was read must still be the file.
        self.source.check_unchanged()
        # A worker that lost its lease must not complete: the new holder may be sending
        # (or have completed) the same object.
        self.ledger.confirm()
        return s3_call(
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
        # Daemon threads: a part S3 never answers must not hold the process's exit.
        with DaemonPool(self.concurrency, name="vodpush-part") as pool:
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
        if self.job.options.checksums:
            sha = hashlib.sha256(data).digest()
            return _DonePart(record, None, sha) if record.checksum_sha256 == b64(sha) else None
        digest = md5(data)
        etag = record.etag.strip('"')
        if MD5_ETAG.match(etag) and etag != digest.hex():
            return None
        # Not an MD5 ETag (SSE-KMS): size and mtime matched the checkpoint, trust it.
        return _DonePart(record, digest, None)

    def _send_part(self, number: int, data: bytes) -> None:
        try:
            if self._failed.is_set():
                return
            part_md5 = md5_or_none(data, checksums=self.job.options.checksums)
            sha = hashlib.sha256(data).digest() if self.job.options.checksums else None
            args: dict[str, Any] = {
                "Bucket": self.job.bucket,
                "Key": self.job.key,
                "UploadId": self.upload_id,
                "PartNumber": number,
                "Body": data,
            }
            # Either header makes S3 refuse the part if the bytes differ.
            if part_md5 is not None:
                args["ContentMD5"] = b64(part_md5)
            if sha is not None:
                args |= {"ChecksumAlgorithm": "SHA256", "ChecksumSHA256": b64(sha)}
            response = s3_call(self.client.upload_part, **args)
            record = PartRecord(
                etag=str(response["ETag"]),
                checksum_sha256=b64(sha) if sha is not None else None,
                size=len(data),
            )
            self.ledger.part_done(number, record)
            self._record(number, _DonePart(record, part_md5, sha), sent=True)
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


def _completed_object(checkpoint: MultipartCheckpoint) -> tuple[str | None, str | None] | None:
    """What CompleteMultipartUpload makes of the checkpoint's parts: its composite SHA-256
    (``base64-N``, with checksums) and its ETag (``md5(part md5s)-N``, when the part ETags
    are MD5s). None when a part is missing or the wrong size, or neither can be told
    (SSE-KMS without checksums): such an object can never be proven ours."""
    count = checkpoint.part_count
    parts = [checkpoint.parts.get(number) for number in range(1, count + 1)]
    last = checkpoint.size - (count - 1) * checkpoint.chunksize
    sizes = [checkpoint.chunksize] * (count - 1) + [last]
    if not parts or any(p is None or p.size != size for p, size in zip(parts, sizes, strict=True)):
        return None
    records = [p for p in parts if p is not None]
    composite = None
    sums = [r.checksum_sha256 for r in records]
    if checkpoint.checksums and all(sums):
        digests = b"".join(base64.b64decode(str(value)) for value in sums)
        composite = f"{b64(hashlib.sha256(digests).digest())}-{count}"
    etags = [r.etag.strip('"') for r in records]
    etag = None
    if all(MD5_ETAG.match(e) and "-" not in e for e in etags):
        etag = multipart_etag([bytes.fromhex(e) for e in etags])
    if composite is None and etag is None:
        return None
    return composite, etag
