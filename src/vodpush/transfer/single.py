"""A file below the multipart threshold: one PutObject, then verified; or, when an earlier
attempt may have written it already, the object found holding the same bytes."""

from __future__ import annotations

import hashlib

from botocore.client import BaseClient

from vodpush.core.checkpoint import PartLedger
from vodpush.transfer.cleanup import abandon
from vodpush.transfer.errors import s3_call
from vodpush.transfer.existing import find_same
from vodpush.transfer.hashing import b64, md5, md5_or_none
from vodpush.transfer.job import Progress, UploadJob, UploadResult
from vodpush.transfer.source import SourceFile
from vodpush.transfer.verify import build_result, verify_upload

__all__ = ["put_single"]


def put_single(
    client: BaseClient,
    job: UploadJob,
    ledger: PartLedger,
    source: SourceFile,
    progress: Progress | None,
) -> UploadResult:
    abandon(client, job, ledger)  # a checkpoint from an earlier, larger version of the file
    checksums = job.options.checksums
    data = source.read_at(0, source.size)
    source.check_unchanged()
    sha = hashlib.sha256(data).digest()
    content_md5 = md5_or_none(data, checksums=checksums)
    if job.may_exist:
        # The bytes are in memory and hashed already: looking costs one HeadObject.
        stored = find_same(
            client,
            job,
            file_name=source.name,
            size=source.size,
            sha256=b64(sha),
            etag=(lambda: (content_md5 or md5(data)).hex()),
        )
        if stored is not None:
            if progress is not None:
                progress(source.size, source.size)
            return build_result(client, job, stored, sha=sha, size=source.size, sent=0, total=1)
    args = job.object_arguments(source.name) | {"Body": data}
    # Either header makes S3 refuse the body if the bytes differ.
    if content_md5 is not None:
        args["ContentMD5"] = b64(content_md5)
    if checksums:
        args["ChecksumSHA256"] = b64(sha)  # ChecksumAlgorithm comes with the options
    ledger.confirm()  # a worker that lost its lease must not write the object
    response = s3_call(client.put_object, **args)
    if progress is not None:
        progress(source.size, source.size)
    verify_upload(
        client,
        job,
        response,
        size=source.size,
        sha256=b64(sha) if checksums else None,
        sha256_composite=None,
        etag=(lambda: content_md5.hex())
        if content_md5 is not None
        else (lambda: source.md5_etag(None)),
    )
    return build_result(client, job, response, sha=sha, size=source.size, sent=1, total=1)
