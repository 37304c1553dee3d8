"""The digests S3 speaks: base64 checksums, Content-MD5 and MD5 ETags."""

from __future__ import annotations

import base64
import hashlib
import re

__all__ = ["MD5_ETAG", "b64", "md5", "md5_or_none", "multipart_etag"]

# An ETag that is an MD5 (of the object, or ``md5(part md5s)-N`` of a multipart one).
MD5_ETAG = re.compile(r"^[0-9a-f]{32}(-[0-9]+)?$")


def b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode("ascii")


def md5(data: bytes) -> bytes:
    # MD5 only because S3's Content-MD5 and ETag use it.
    return hashlib.md5(data, usedforsecurity=False).digest()


def multipart_etag(part_md5s: list[bytes]) -> str:
    """The ETag S3 gives a multipart object: ``md5(part md5s)-N``."""
    whole = hashlib.md5(b"".join(part_md5s), usedforsecurity=False).hexdigest()
    return f"{whole}-{len(part_md5s)}"


def md5_or_none(data: bytes, *, checksums: bool) -> bytes | None:
    """The Content-MD5 digest, needed only without SHA-256 checksums: with them S3 checks
    the body against the (signed) checksum header, as AWS's own SDKs now rely on, and
    hashing every byte once more would cost about a third of the worker's CPU."""
    return None if checksums else md5(data)
