"""The S3 transfer engine: one local file to one S3 object, resumable, memory-bounded,
verified.

No database here. Multipart progress goes through the small ``PartLedger`` interface (a
DB-backed ledger lives in persistence; ``MemoryLedger`` is the in-memory fake), and the
botocore client is always passed in (``s3client.make_s3_client`` builds one).

One module per concern: ``job`` (what to upload and the result), ``options`` (the object
options as one checked value), ``source`` (the file, read by offset), ``errors`` (UploadError
and ``classify``), ``verify`` (what S3 stored), ``existing`` (an object an earlier attempt
wrote), ``single`` (one PutObject), ``multipart`` (parts, resume), ``cleanup`` (abort,
abandon), ``checkpoint`` (the ledger), ``engine`` (``upload``, choosing single or
multipart), ``s3client``; with ``limits``, ``hashing`` and ``content_types`` beneath them.

Failure policy, in one place:

- every error leaves as ``UploadError`` with ``transient`` set by ``classify`` (a pure
  function; only named transient errors are retryable);
- permanent failure: the multipart upload is aborted and the ledger cleared (an abort that
  fails keeps the checkpoint, so the upload id is not lost: the request's outcome records it
  as an orphan, which the worker's reaper aborts later);
- transient failure or ``UploadInterrupted``: the multipart upload and the ledger are kept,
  so the next attempt resumes from the completed parts (``abandon`` cleans up when the
  caller gives up);
- any other exception (a bug, a ledger/database failure) propagates unchanged and keeps the
  upload, like an interruption; so does StoreUnavailable met while cleaning up after an
  UploadError (the checkpoint must outlive an abort that was not recorded);
- success leaves the checkpoint of a multipart upload in the ledger: the caller drops it
  with its record of the outcome. An attempt killed between S3's answer and that record is
  recognised by the next one, which claims the object S3 holds when it provably holds the
  file's bytes instead of writing it again (a single PUT looks when ``UploadJob.may_exist``);
- the source must be unchanged (size, mtime, ctime, and the inode its name leads to) from
  its opening until the object is written, else ``SourceChanged``: transient, the
  multipart upload is aborted and the next attempt sends the file as it is then.
"""

from __future__ import annotations

from vodpush.transfer.cleanup import abandon, abandon_quietly, abort_error, abort_multipart
from vodpush.transfer.content_types import guess_content_type
from vodpush.transfer.engine import upload
from vodpush.transfer.errors import UploadError, UploadInterrupted, classify
from vodpush.transfer.job import UploadJob, UploadResult
from vodpush.transfer.limits import MAX_PART_SIZE, MAX_PARTS, MAX_PUT_SIZE, MIN_PART_SIZE
from vodpush.transfer.options import ObjectOptions
from vodpush.transfer.verify import object_url, verify_stored

__all__ = [
    "MAX_PARTS",
    "MAX_PART_SIZE",
    "MAX_PUT_SIZE",
    "MIN_PART_SIZE",
    "ObjectOptions",
    "UploadError",
    "UploadInterrupted",
    "UploadJob",
    "UploadResult",
    "abandon",
    "abandon_quietly",
    "abort_error",
    "abort_multipart",
    "classify",
    "guess_content_type",
    "object_url",
    "upload",
    "verify_stored",
]
