"""The multipart checkpoint: what a resumed upload needs, and the small ledger interface
that keeps it across crashes (``persistence.queue.DbLedger`` on the database,
``vodpush.memory`` for a request in memory, ``MemoryLedger`` here for one-shot uploads)."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol


@dataclass(frozen=True)
class PartRecord:
    etag: str
    checksum_sha256: str | None  # base64, as S3 takes it; None when checksums are off
    size: int


@dataclass(frozen=True)
class MultipartCheckpoint:
    """What is needed to resume: valid only for the same file, part size and checksum mode.

    The file is told by its size, mtime, ctime and inode when the upload began (ctime and
    inode are None in checkpoints written before they were kept). Not its device number:
    one NFS export has a different one on each host, and any worker may resume."""

    upload_id: str
    chunksize: int
    size: int
    mtime_ns: int
    checksums: bool
    parts: dict[int, PartRecord] = field(default_factory=dict)
    ctime_ns: int | None = None
    inode: int | None = None

    @property
    def part_count(self) -> int:
        """How many parts the completed upload has."""
        return -(-self.size // self.chunksize)

    def same_file(self, *, size: int, mtime_ns: int, ctime_ns: int, inode: int) -> bool:
        """Whether a file with this identity is the one the upload began with."""
        return (
            (self.size, self.mtime_ns) == (size, mtime_ns)
            and self.ctime_ns in (None, ctime_ns)
            and self.inode in (None, inode)
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (part numbers become strings), for ledgers that store a document."""
        return {
            "upload_id": self.upload_id,
            "chunksize": self.chunksize,
            "size": self.size,
            "mtime_ns": self.mtime_ns,
            "checksums": self.checksums,
            "ctime_ns": self.ctime_ns,
            "inode": self.inode,
            "parts": {
                str(number): {
                    "etag": part.etag,
                    "checksum_sha256": part.checksum_sha256,
                    "size": part.size,
                }
                for number, part in sorted(self.parts.items())
            },
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MultipartCheckpoint:
        return cls(
            upload_id=str(data["upload_id"]),
            chunksize=int(data["chunksize"]),
            size=int(data["size"]),
            mtime_ns=int(data["mtime_ns"]),
            checksums=bool(data["checksums"]),
            ctime_ns=_int_or_none(data.get("ctime_ns")),
            inode=_int_or_none(data.get("inode")),
            parts={
                int(number): PartRecord(
                    etag=str(part["etag"]),
                    checksum_sha256=part.get("checksum_sha256"),
                    size=int(part["size"]),
                )
                for number, part in dict(data.get("parts") or {}).items()
            },
        )


def _int_or_none(value: Any) -> int | None:
    return None if value is None else int(value)


class PartLedger(Protocol):
    """Persists one job's multipart progress. ``part_done`` is called from upload threads at
    the same time: implementations must be thread-safe."""

    def load(self) -> MultipartCheckpoint | None:
        """The checkpoint with every part recorded so far, or None."""
        ...

    def begin(self, checkpoint: MultipartCheckpoint) -> None:
        """A new multipart upload exists: replace whatever was stored."""
        ...

    def part_done(self, part_number: int, record: PartRecord) -> None:
        """A part is stored in S3 (overwrites an earlier record of the same part)."""
        ...

    def clear(self) -> None:
        """Forget the checkpoint (upload aborted). A completed upload's checkpoint is kept
        until the caller has recorded the outcome, and dropped with that record: it is how
        an attempt killed in between is recognised (see transfer.multipart)."""
        ...

    def give_up(self) -> None:
        """Forget the checkpoint although its upload may still exist (the abort was not
        confirmed): its upload id is recorded as an orphan for the reaper, in the same
        write. An upload id is never dropped any other way."""
        ...

    def confirm(self) -> None:
        """Called just before the final S3 call (PutObject, CompleteMultipartUpload, the
        abort of an upload given up): raise ``core.requests.LeaseLost`` if the job's lease
        is gone. Ledgers of a request guard every write the same way (``begin``,
        ``part_done``, ``clear``), and this one also marks the request as finishing: from
        here on it can no longer be canceled (the object may be written any moment)."""
        ...


class MemoryLedger:
    """The in-memory PartLedger: for tests and one-shot uploads. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._checkpoint: MultipartCheckpoint | None = None
        # Upload ids given up without a confirmed abort: a one-shot caller has no reaper,
        # so it must look here.
        self.given_up: list[str] = []

    def load(self) -> MultipartCheckpoint | None:
        with self._lock:
            if self._checkpoint is None:
                return None
            # A copy: callers must not see later part_done calls mutate what they hold.
            return replace(self._checkpoint, parts=dict(self._checkpoint.parts))

    def begin(self, checkpoint: MultipartCheckpoint) -> None:
        with self._lock:
            self._checkpoint = replace(checkpoint, parts=dict(checkpoint.parts))

    def part_done(self, part_number: int, record: PartRecord) -> None:
        with self._lock:
            if self._checkpoint is None:
                raise RuntimeError("part_done before begin")
            self._checkpoint.parts[part_number] = record

    def clear(self) -> None:
        with self._lock:
            self._checkpoint = None

    def give_up(self) -> None:
        with self._lock:
            if self._checkpoint is not None:
                self.given_up.append(self._checkpoint.upload_id)
            self._checkpoint = None

    def confirm(self) -> None:
        pass  # a one-shot upload has no lease to lose
