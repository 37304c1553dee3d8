"""S3's size limits, and the part size and tuning that respect them."""

from __future__ import annotations

from vodpush.transfer.errors import UploadError

__all__ = [
    "MAX_OBJECT_SIZE",
    "MAX_PARTS",
    "MAX_PART_SIZE",
    "MAX_PUT_SIZE",
    "MIN_PART_SIZE",
    "MiB",
    "check_tuning",
    "part_size",
]

MiB = 1024 * 1024
GiB = 1024 * MiB
MIN_PART_SIZE = 5 * MiB  # S3's minimum for every part but the last
MAX_PART_SIZE = 5 * GiB
MAX_PUT_SIZE = 5 * GiB  # largest single PutObject
MAX_PARTS = 10_000
MAX_OBJECT_SIZE = 5 * 1024 * GiB


def part_size(size: int, chunksize: int) -> int:
    """``chunksize``, grown (to whole MiB) when the file would need more than 10,000 parts."""
    if size > MAX_OBJECT_SIZE:
        raise UploadError(
            f"source is {size} bytes; S3 objects are at most 5 TiB",
            transient=False,
            code="EntityTooLarge",
        )
    if -(-size // chunksize) <= MAX_PARTS:
        return chunksize
    needed = -(-size // MAX_PARTS)
    return -(-needed // MiB) * MiB


def check_tuning(threshold: int, chunksize: int, concurrency: int) -> None:
    if not 1 <= threshold <= MAX_PUT_SIZE:
        raise ValueError(f"threshold must be 1 to {MAX_PUT_SIZE} bytes (S3's PutObject limit)")
    if not MIN_PART_SIZE <= chunksize <= MAX_PART_SIZE:
        raise ValueError(
            f"chunksize must be {MIN_PART_SIZE} to {MAX_PART_SIZE} bytes (S3's part limits)"
        )
    if concurrency < 1:
        raise ValueError("concurrency must be at least 1")
