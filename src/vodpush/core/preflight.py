"""The preflight of an upload: whether its bucket would take it, checked before it is queued.

A preflight checks, in order, that the credentials work (the role can be assumed, S3
accepts the keys), that the bucket exists, that the ACL asked for is not blocked by the
bucket's settings, and that the account can write the key. Its answer is a report of plain
values; ``PreflightPort`` is what runs one (transfer.preflight, against S3), handed to the
API by whoever wires it (``vodpush serve``), so that the API loads no S3 library itself.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Protocol

from vodpush.core.accounts import S3Settings

__all__ = [
    "PUBLIC_ACLS",
    "Check",
    "PreflightPort",
    "PreflightReport",
    "Verdict",
    "sends_acl",
]

# Canned ACLs that grant to everyone (or every AWS user): what a public access block's
# BlockPublicAcls refuses and IgnorePublicAcls voids.
PUBLIC_ACLS = frozenset({"public-read", "public-read-write", "authenticated-read"})
# ACL values that put no ACL header on the request: S3's default ("private" is what S3 does
# without one; "bucket-default" asks for no header at all). Buckets with ACLs disabled take
# these.
_NO_HEADER_ACLS = frozenset({"private", "bucket-default"})


def sends_acl(acl: str) -> bool:
    """Whether an upload with ``acl`` sends an ACL header (refused when ACLs are off)."""
    return acl not in _NO_HEADER_ACLS


class Verdict(enum.StrEnum):
    OK = "ok"
    FAILED = "failed"
    # Could not be told (S3 refused to show the setting): not a failure.
    UNKNOWN = "unknown"
    # Not asked for (an ACL that needs no check), or not reached after a failure.
    SKIPPED = "skipped"


@dataclass(frozen=True)
class Check:
    """One step: ``name`` is credentials, bucket, acl or writable (or preflight, for one that
    could not run its checks: too slow, too many at once); ``detail`` says what was
    found, fit for the customer (it names no endpoint and no secret); ``transient``: a
    failure that may pass (S3 or STS not reached, throttled, too slow)."""

    name: str
    verdict: Verdict
    detail: str
    transient: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {
            "check": self.name,
            "verdict": self.verdict.value,
            "detail": self.detail,
            "transient": self.transient,
        }


@dataclass(frozen=True)
class PreflightReport:
    bucket: str
    key: str
    acl: str
    checks: tuple[Check, ...]

    @property
    def failure(self) -> Check | None:
        """The check that failed (a preflight stops at the first), or None."""
        return next((c for c in self.checks if c.verdict is Verdict.FAILED), None)

    @property
    def passed(self) -> bool:
        return self.failure is None

    @property
    def message(self) -> str:
        """``preflight: <cause>`` for a failure, ``preflight passed`` otherwise."""
        failure = self.failure
        return "preflight passed" if failure is None else f"preflight: {failure.detail}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "bucket": self.bucket,
            "key": self.key,
            "acl": self.acl,
            "passed": self.passed,
            "message": self.message,
            "checks": [c.as_dict() for c in self.checks],
        }


class PreflightPort(Protocol):
    """Runs a preflight of writing ``key`` to ``bucket`` with ``acl`` and ``s3``'s settings;
    bounded in time, never raises for what S3 or STS answer (a failure is in the report).
    ``session_name``: what the session of an assumed role is called."""

    def __call__(
        self,
        s3: S3Settings,
        *,
        bucket: str,
        key: str,
        acl: str,
        session_name: str | None = None,
    ) -> PreflightReport: ...
