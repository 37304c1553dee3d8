"""The Content-Type of an object, guessed from its key or its file name."""

from __future__ import annotations

import mimetypes
import os

__all__ = ["DEFAULT_CONTENT_TYPE", "guess_content_type"]

# Types the platform's mime.types may lack or get wrong (.ts is TypeScript on some systems).
_VIDEO_TYPES = {
    ".mp4": "video/mp4",
    ".m4v": "video/x-m4v",
    ".m4a": "audio/mp4",
    ".m4s": "video/iso.segment",
    ".mov": "video/quicktime",
    ".mkv": "video/x-matroska",
    ".webm": "video/webm",
    ".ts": "video/mp2t",
    ".m2ts": "video/mp2t",
    ".mts": "video/mp2t",
    ".m3u8": "application/vnd.apple.mpegurl",
    ".m3u": "audio/x-mpegurl",
    ".mpd": "application/dash+xml",
    ".flv": "video/x-flv",
    ".f4v": "video/mp4",
    ".avi": "video/x-msvideo",
    ".wmv": "video/x-ms-wmv",
    ".mpg": "video/mpeg",
    ".mpeg": "video/mpeg",
    ".3gp": "video/3gpp",
    ".ogv": "video/ogg",
    ".mp3": "audio/mpeg",
    ".aac": "audio/aac",
    ".vtt": "text/vtt",
    ".srt": "application/x-subrip",
}
_COMPRESSED_TYPES = {
    "gzip": "application/gzip",
    "bzip2": "application/x-bzip2",
    "xz": "application/x-xz",
}
DEFAULT_CONTENT_TYPE = "application/octet-stream"


def guess_content_type(*names: str) -> str:
    """The Content-Type for the first of ``names`` (object key, then file name) that tells."""
    for name in names:
        suffix = os.path.splitext(name)[1].lower()
        if suffix in _VIDEO_TYPES:
            return _VIDEO_TYPES[suffix]
        guessed, encoding = mimetypes.guess_type(name, strict=False)
        if encoding is not None:
            # x.tar.gz holds gzip bytes; announcing application/x-tar would be a lie.
            return _COMPRESSED_TYPES.get(encoding, DEFAULT_CONTENT_TYPE)
        if guessed:
            return guessed
    return DEFAULT_CONTENT_TYPE
