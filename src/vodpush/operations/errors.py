"""What an operation refuses, as typed errors an adapter maps to its own answer (the API:
MissingFields 0006, InvalidField 0007, Unauthorized 0005, PreflightFailed 0008, RateLimited
1000; the CLI: an error line)."""

from __future__ import annotations

from vodpush.core.fields import InvalidField, MissingFields, Refused
from vodpush.core.preflight import PreflightReport


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


class PreflightFailed(Refused):
    """The preflight found that the upload would fail (or could not finish its checks:
    ``transient``); nothing was queued. The message is ``preflight: <cause>``."""

    def __init__(self, report: PreflightReport) -> None:
        self.report = report
        failure = report.failure
        self.transient = bool(failure and failure.transient)
        super().__init__(report.message)


__all__ = [
    "InvalidField",
    "MissingFields",
    "PreflightFailed",
    "RateLimited",
    "Refused",
    "Unauthorized",
]
