"""The source file: opened once, read by offset, and checked to be unchanged before the
object is written."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

from vodpush.sestore import OpenFile, PathRefused, open_plain
from vodpush.transfer.errors import SOURCE_CHANGED, UploadError, classify
from vodpush.transfer.hashing import multipart_etag
from vodpush.transfer.limits import MiB

__all__ = ["Source", "SourceFile", "SourceOpener"]

SourceOpener = Callable[[], OpenFile]
# What UploadJob.source may be: see SourceFile.
Source = Path | OpenFile | SourceOpener


class SourceFile:
    """The open source file, with the identity it had when opened, read by offset
    (``os.pread``: no shared file position, and the name is never looked up again).

    ``source`` is a path (opened here, as given), an ``OpenFile`` already open (its owner
    closes it) or a function opening one (``sestore.open_source``: a customer's file).
    """

    def __init__(self, source: Source) -> None:
        # How to look the name up again (None for an OpenFile: its owner knows the name).
        self._source: Path | SourceOpener | None = None
        if isinstance(source, OpenFile):
            self.file, self.owned = source, False
        else:
            self.file, self.owned = self._open(source), True
            self._source = source
        self.path = self.file.path
        self.name = self.file.name
        self.identity = self.file.identity
        self.size = self.identity.size
        self.mtime_ns = self.identity.mtime_ns

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
        return multipart_etag(
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
        """Before the object is written (every byte read): nothing was appended, the open
        file has the size, mtime and ctime it had when opened, and its name still leads to
        it (same device and inode). Else UploadError SOURCE_CHANGED."""
        try:
            extra = os.pread(self.file.fd, 1, self.size)
            what = self._name_moved() or self.file.changed()
        except OSError as exc:
            raise self._error(exc) from exc
        if extra:
            raise self.changed("its size changed")
        if what is not None:
            raise self.changed(what)

    def _name_moved(self) -> str | None:
        """How the file the name leads to now differs from the one open, or None.

        A rename-over leaves the open file intact (only its ctime moves, on local file
        systems), but the customer's file is now another one: said as such. Opening it
        afresh also fetches fresh attributes where fstat may answer from a cache (NFS
        close-to-open consistency)."""
        if self._source is None:
            return None
        try:
            again = self._open(self._source)
        except UploadError as err:
            if err.transient:
                raise
            return "it was removed or can no longer be opened"
        try:
            return self.identity.difference(again.identity)
        finally:
            again.close()
