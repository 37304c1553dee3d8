"""Cleaning up a multipart upload that will not be completed.

A kept multipart upload costs storage until it is aborted: ``abandon`` aborts a job's upload
and forgets its checkpoint; ``abort_multipart`` aborts one by id.
"""

from __future__ import annotations

import logging

from botocore.client import BaseClient
from botocore.exceptions import BotoCoreError, ClientError

from vodpush.core.checkpoint import PartLedger
from vodpush.core.requests import LeaseLost, StoreUnavailable
from vodpush.transfer.errors import classify
from vodpush.transfer.job import UploadJob

__all__ = ["abandon", "abandon_quietly", "abort_multipart"]

log = logging.getLogger(__name__)


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
