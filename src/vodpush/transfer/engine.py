"""The engine's entry point: ``upload`` one file, by a single PUT or a multipart upload, and clean
up as the failure policy says (see the package doc)."""

from __future__ import annotations

from botocore.client import BaseClient

from vodpush.core.checkpoint import PartLedger
from vodpush.transfer.cleanup import abandon_quietly
from vodpush.transfer.errors import SOURCE_CHANGED, STALE_CHECKPOINT, UploadError, UploadInterrupted
from vodpush.transfer.job import Progress, ShouldStop, UploadJob, UploadResult
from vodpush.transfer.limits import check_tuning, part_size
from vodpush.transfer.multipart import Multipart
from vodpush.transfer.single import put_single
from vodpush.transfer.source import SourceFile

__all__ = ["upload"]


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
    Raises UploadError (UploadInterrupted when stopped); see the package doc for cleanup.
    """
    check_tuning(threshold, chunksize, concurrency)
    try:
        if should_stop is not None and should_stop():
            raise UploadInterrupted("upload interrupted before it started")
        source = SourceFile(job.source)
        try:
            if source.size < threshold:
                return put_single(client, job, ledger, source, progress)
            return Multipart(
                client=client,
                job=job,
                ledger=ledger,
                source=source,
                chunksize=part_size(source.size, chunksize),
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
        if not err.transient or err.code in (SOURCE_CHANGED, *STALE_CHECKPOINT):
            abandon_quietly(client, job, ledger)
        raise
