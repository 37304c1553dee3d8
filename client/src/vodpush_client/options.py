"""Helpers for the object options of ``upload()``."""

from __future__ import annotations

import unicodedata
from urllib.parse import quote

__all__ = ["disposition_header"]


def disposition_header(filename: str, *, inline: bool = False) -> str:
    """A Content-Disposition value (for ``upload(content_disposition=...)``) naming
    ``filename``, which may hold any Unicode text: as RFC 6266 says, an ASCII
    ``filename="..."`` for old browsers and, when the name is not plain ASCII, the exact name
    as ``filename*=UTF-8''<percent-encoded>``, which browsers prefer."""
    kind = "inline" if inline else "attachment"

    def plain(char: str) -> bool:
        return " " <= char <= "~" and char not in '"\\'

    if all(plain(char) for char in filename):
        return f'{kind}; filename="{filename}"'

    def folded(char: str) -> str:
        # Accents dropped (é -> e); anything else that cannot be sent becomes "_".
        ascii_ = unicodedata.normalize("NFKD", char).encode("ascii", "ignore").decode("ascii")
        return ascii_ if ascii_ and all(plain(c) for c in ascii_) else "_"

    fallback = "".join(char if plain(char) else folded(char) for char in filename)
    return f"{kind}; filename=\"{fallback}\"; filename*=UTF-8''{quote(filename, safe='')}"
