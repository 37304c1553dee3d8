"""Cleaning up a multipart upload that will not be completed.

A kept multipart upload costs storage until it is aborted: ``abandon`` aborts a job's upload
and forgets its checkpoint; ``abort_multipart`` aborts one by id (``abort_error`` says why
not). An upload whose abort fails keeps its checkpoint: whoever then drops it records the
upload id as an orphan (``PartLedger.give_up``, or the request's outcome), and the worker's
reaper aborts it later.
"""

from __future__ import annotations

import logging

from botocore.client import BaseClient
from botocore.exceptions import BotoCoreError, ClientError

from vodpush.core.checkpoint import PartLedger
from vodpush.core.requests import LeaseLost, StoreUnavailable
from vodpush.transfer.errors import UploadError, classify
from vodpush.transfer.job import UploadJob

__all__ = ["abandon", "abandon_quietly", "abort_error", "abort_multipart"]

log = logging.getLogger(__name__)

# What S3 answers for an upload that is no longer there: as good as a confirmed abort.
GONE = ("NoSuchUpload", "NoSuchBucket")


def abort_error(client: BaseClient, bucket: str, key: str, upload_id: str) -> UploadError | None:
    """Abort a multipart upload: None when S3 confirms it gone (aborted now, or already
    gone), else why not. Never raises for an S3 or connection error."""
    try:
        client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
    except (ClientError, BotoCoreError) as exc:
        err = classify(exc)
        return None if err.code in GONE else err
    log.info(
        "multipart upload aborted",
        extra={
            "action": "s3.multipart.abort",
            "bucket": bucket,
            "key": key,
            "upload_id": upload_id,
        },
    )
    return None


def abort_multipart(client: BaseClient, bucket: str, key: str, upload_id: str) -> bool:
    """Abort a multipart upload; True when it is gone (or already was). Never raises for an
    S3 or connection error."""
    err = abort_error(client, bucket, key, upload_id)
    if err is not None:
        log.warning(
            "abort of multipart upload failed: %s",
            err,
            extra={
                "action": "s3.multipart.abort_failed",
                "bucket": bucket,
                "key": key,
                "upload_id": upload_id,
                "detail": err.detail,
            },
        )
    return err is None


def abandon(client: BaseClient, job: UploadJob, ledger: PartLedger) -> bool:
    """Give up on ``job``: abort its multipart upload, if any, and clear the ledger.

    False when the abort failed (network, permissions): the checkpoint is then kept, so
    the upload id is not lost: a later attempt tries again, or the request's outcome
    records it as an orphan for the reaper.
    """
    checkpoint = ledger.load()
    if checkpoint is None:
        return True  # nothing to abort, nothing to clear (and no write)
    # The checkpoint may be a new lease holder's: only the holder aborts (else LeaseLost).
    ledger.confirm()
    if not abort_multipart(client, job.bucket, job.key, checkpoint.upload_id):
        return False
    ledger.clear()
    return True


def abandon_quietly(client: BaseClient, job: UploadJob, ledger: PartLedger) -> None:
    # Cleanup must not hide the error that caused it, except a lost lease or a database
    # that did not answer: then the checkpoint is not ours to drop (failing the request
    # would forget an upload id that was not aborted); the next attempt, ours or the next
    # holder's, meets the same error and cleans up.
    try:
        abandon(client, job, ledger)
    except (LeaseLost, StoreUnavailable):
        raise
    except Exception:
        log.exception(
            "could not clean up after a failed upload",
            extra={"action": "s3.cleanup_failed", "bucket": job.bucket, "key": job.key},
        )
