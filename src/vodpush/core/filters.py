"""Which of an account's requests a listing shows (aws.status's filters): one plain value,
and the one definition of what each condition means. The database stores turn it into
indexed SQL; the in-memory store runs ``matches``; the contract tests hold both to it."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from datetime import datetime
from typing import Any

# The Unicode scalar values next to the surrogates, which UTF-8 cannot encode.
_BEFORE_SURROGATES = 0xD7FF
_AFTER_SURROGATES = 0xE000


@dataclass(frozen=True)
class RequestFilter:
    """Conditions on an account's requests, all of them together (AND); None: no
    condition. Times are naive UTC, as the stores keep them."""

    # One of these states (sorted, without repeats).
    states: tuple[str, ...] | None = None
    # Queued at or after this time.
    created_from: datetime | None = None
    # Queued strictly before this time.
    created_before: datetime | None = None
    # To this bucket, exactly.
    bucket: str | None = None
    # Whose source path starts with these characters, exactly: byte for byte in UTF-8,
    # case-sensitive, no character special.
    path_prefix: str | None = None

    @property
    def empty(self) -> bool:
        return (
            self.states is None
            and self.created_from is None
            and self.created_before is None
            and self.bucket is None
            and self.path_prefix is None
        )

    def matches(self, row: Any) -> bool:
        """Whether a request (anything with ``state``, ``created_at``, ``bucket`` and
        ``path``) meets every condition."""
        return (
            (self.states is None or row.state in self.states)
            and (self.created_from is None or row.created_at >= self.created_from)
            and (self.created_before is None or row.created_at < self.created_before)
            and (self.bucket is None or row.bucket == self.bucket)
            and (self.path_prefix is None or row.path.startswith(self.path_prefix))
        )


def prefix_upper_bound(prefix: str) -> str | None:
    """The least string above every string that starts with ``prefix``, or None when there
    is none (``prefix`` is all U+10FFFF). UTF-8 keeps code point order byte for byte, so
    ``prefix <= s < bound`` compared as bytes (SQLite's BINARY collation, PostgreSQL's
    text_pattern_ops) holds exactly for the strings ``s`` that start with ``prefix``: a
    range an index serves, with no wildcard that the customer's text could contain."""
    chars = list(prefix)
    while chars:
        last = ord(chars.pop())
        if last == sys.maxunicode:
            continue  # nothing follows it: carry into the character before
        following = _AFTER_SURROGATES if last == _BEFORE_SURROGATES else last + 1
        return "".join(chars) + chr(following)
    return None
