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
    """The caller asked for this too often: possible again in ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


__all__ = ["InvalidField", "MissingFields", "RateLimited", "Refused", "Unauthorized"]
