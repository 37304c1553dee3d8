"""What to upload (``UploadJob``), and what came of it (``UploadResult``)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vodpush.core.options import MAX_KEY_BYTES
from vodpush.sestore import OpenFile
from vodpush.transfer.options import ObjectOptions
from vodpush.transfer.source import Source

__all__ = ["Progress", "ShouldStop", "UploadJob", "UploadResult"]

Progress = Callable[[int, int], None]
ShouldStop = Callable[[], bool]


@dataclass(frozen=True)
class UploadJob:
    """One upload. ``source`` is where the bytes come from: a path the operator names
    (opened as given, following symlinks: tests, benchmarks, library use), or for a
    customer's file a function that opens it safely, called at the start of each attempt
    (the worker passes ``sestore.open_source``), or an ``OpenFile`` already open (the
    caller closes it). The uploader never opens a customer's file by name. ``options``
    say how the object is stored (ACL, metadata, encryption, checksums).

    ``may_exist``: an earlier attempt may have written the object without its outcome
    being recorded (it was retried, or its worker died). A single PUT then first looks
    whether S3 already holds these bytes under the key, and claims that object instead of
    writing a second version. (A multipart upload knows it from its checkpoint.)"""

    source: Source
    bucket: str
    key: str
    options: ObjectOptions = field(default_factory=ObjectOptions)
    may_exist: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.source, str | os.PathLike):
            object.__setattr__(self, "source", Path(self.source))
        elif not (isinstance(self.source, OpenFile) or callable(self.source)):
            raise ValueError("source must be a path, an OpenFile or a function opening one")
        if not self.bucket:
            raise ValueError("bucket must not be empty")
        if not self.key or len(self.key.encode("utf-8")) > MAX_KEY_BYTES:
            raise ValueError(f"key must be 1 to {MAX_KEY_BYTES} bytes of UTF-8")
        if not isinstance(self.options, ObjectOptions):
            raise ValueError("options must be an ObjectOptions")
        if not isinstance(self.may_exist, bool):
            raise ValueError("may_exist must be True or False")

    def object_arguments(self, file_name: str) -> dict[str, Any]:
        """What PutObject and CreateMultipartUpload are both given: Bucket, Key and the
        object options (``file_name`` helps guess the Content-Type)."""
        options = self.options.s3_arguments(key=self.key, file_name=file_name)
        return {"Bucket": self.bucket, "Key": self.key} | options


@dataclass(frozen=True)
class UploadResult:
    results: dict[str, str]  # exactly RESULT_KEYS, "" where S3 said nothing
    http_status: int
    sha256: str  # hex digest of the bytes read (and sent)
    size: int
    parts_sent: int  # parts (or puts) sent by this call
    parts_total: int
    # The multipart upload S3 completed into this object (None: a single PUT): gone at S3,
    # so dropping its checkpoint with the success must not record it as an orphan.
    completed_upload_id: str | None = None
