"""What an operation refuses, as typed errors an adapter maps to its own answer (the API:
MissingFields 0006, InvalidField 0007, Unauthorized 0005, RateLimited 1000; the CLI: an
error line)."""

from __future__ import annotations

from vodpush.core.fields import InvalidField, MissingFields, Refused


class Unauthorized(Refused):
    """The caller's account may not do this (a bucket outside its list, no file access)."""

    def __init__(self, why: str) -> None:
        self.why = why
        super().__init__(f"unauthorized access: {why}")


class RateLimited(Refused):
    """The caller asked for this too often; the message says when it is possible again."""


__all__ = ["InvalidField", "MissingFields", "RateLimited", "Refused", "Unauthorized"]
