"""Accounts as every layer sees them: the S3 settings, the record with its rules (which
buckets, whose files), and the checks of what an operator may set. No storage here."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from fnmatch import fnmatchcase
from typing import Any

from vodpush.core.options import SSE_CHOICES, SSE_KMS
from vodpush.core.records import format_time

# Matched with fullmatch: "$" would let a trailing newline through.
USERNAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# Bucket patterns: bucket-name characters plus fnmatch's * ? [ ]; as long as a bucket name.
_PATTERN_CHARS = re.compile(r"[A-Za-z0-9._\-*?\[\]]{1,255}")
_BUCKET_CHARS = re.compile(r"[A-Za-z0-9._-]{1,255}")
MAX_BUCKET_PATTERNS = 1000
# The largest limit of uploads in flight an account may be given (far beyond any cluster).
MAX_IN_FLIGHT_LIMIT = 100_000
# What is shown in place of a secret (as pydantic shows a SecretStr).
MASKED = "**********"
# An IAM role's ARN: any AWS partition, a 12-digit account, an optional path, a name of
# 1-64 characters. STS takes at most 2048 characters.
ROLE_ARN_RE = re.compile(
    r"arn:aws[a-z-]{0,20}:iam::[0-9]{12}:role/(?:[\w+=,.@-]+/){0,64}[\w+=,.@-]{1,64}",
    re.ASCII,
)
MAX_ROLE_ARN = 2048
# STS's ExternalId: 2-1224 characters of [\w+=,.@:/-].
EXTERNAL_ID_RE = re.compile(r"[\w+=,.@:/-]{2,1224}", re.ASCII)


class AccountError(ValueError):
    """An operator asked for something about accounts that cannot be done."""


@dataclass(frozen=True)
class S3Settings:
    endpoint_url: str | None = None
    region: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = None
    sse: str | None = None
    sse_kms_key_id: str | None = None
    checksums: bool = True
    # An IAM role to assume through STS (with the keys above, or boto3's defaults) and the
    # external id the role's trust policy asks for; None: the keys are used as they are.
    role_arn: str | None = None
    external_id: str | None = None

    def __repr__(self) -> str:  # never show the secret
        masked = MASKED if self.secret_access_key else None
        return (
            f"S3Settings(endpoint_url={self.endpoint_url!r}, region={self.region!r}, "
            f"access_key_id={self.access_key_id!r}, secret_access_key={masked!r}, "
            f"sse={self.sse!r}, sse_kms_key_id={self.sse_kms_key_id!r}, "
            f"checksums={self.checksums!r}, role_arn={self.role_arn!r}, "
            f"external_id={MASKED if self.external_id else None!r})"
        )


@dataclass(frozen=True)
class AccountRecord:
    id: int
    cdn: int
    username: str
    api_key: str
    enabled: bool
    api_secret_enc: str
    s3: S3Settings
    created_at: datetime | str
    allowed_buckets: tuple[str, ...] = ()
    webhook_secret_enc: str | None = None
    # Another account has the same username (a database from before 0003): whose
    # sestore directory that is cannot be told, so no file is read for either.
    username_shared: bool = False
    # Uploads of this account in flight at once, across all workers; None: no limit.
    max_in_flight: int | None = None

    @property
    def has_own_s3_credentials(self) -> bool:
        """Keys of its own, or a role of its own to assume: an identity whose reach is not
        the operator's default credentials'."""
        return bool(self.s3.access_key_id or self.s3.role_arn)

    def may_use_bucket(self, bucket: str) -> str | None:
        """None when this account may write to ``bucket``, else why not (for the customer).

        The one place of the rule: a non-empty list always applies; with an empty list an
        account with its own S3 credentials may use whatever they reach, and one without
        (the operator's default credentials) may use no bucket at all."""
        if not _BUCKET_CHARS.fullmatch(bucket):
            # "*" matches any character, a newline too: only names a bucket can have.
            return f"bucket {bucket!r} is not a valid bucket name"
        if self.allowed_buckets:
            if any(fnmatchcase(bucket, pattern) for pattern in self.allowed_buckets):
                return None
            return (
                f"bucket {bucket!r} is not among the buckets this account may write to; "
                "ask the operator to allow it for your account"
            )
        if self.has_own_s3_credentials:
            return None
        return (
            f"bucket {bucket!r} refused: this account may not write to any bucket yet; "
            "ask the operator to allow your buckets for your account"
        )

    def files_refused(self) -> str | None:
        """None when this account's sestore directory is its own, else why not."""
        if self.username_shared:
            return (
                f"username {self.username!r} is also used by another account, so its files "
                "cannot be read until the operator renames one of them"
            )
        return None

    def public(self) -> dict[str, Any]:
        """What an operator may see: no secrets."""
        return {
            "id": self.id,
            "cdn": self.cdn,
            "username": self.username,
            "api_key": self.api_key,
            "enabled": self.enabled,
            "s3_endpoint_url": self.s3.endpoint_url,
            "s3_region": self.s3.region,
            "s3_access_key_id": self.s3.access_key_id,
            "s3_secret_access_key": MASKED if self.s3.secret_access_key else None,
            "s3_sse": self.s3.sse,
            "s3_sse_kms_key_id": self.s3.sse_kms_key_id,
            "s3_checksums": self.s3.checksums,
            "s3_role_arn": self.s3.role_arn,
            "s3_external_id": mask_tail(self.s3.external_id),
            "allowed_buckets": list(self.allowed_buckets),
            "own_webhook_secret": bool(self.webhook_secret_enc),
            "username_shared": self.username_shared,
            "max_in_flight": self.max_in_flight,
            "created": format_time(self.created_at),
        }


def role_session_name(account_id: int | None) -> str:
    """The RoleSessionName of an account's sessions of its role (the customer's CloudTrail
    shows it): 2-64 characters of [\\w+=,.@-]."""
    return "vodpush" if account_id is None else f"vodpush-{int(account_id)}"


def mask_tail(value: str | None) -> str | None:
    """``value`` masked but for its last 4 characters when it is long enough to keep them
    (enough for an operator to tell which it is): for identifiers that are not secrets but
    not for everyone's eyes either, such as an external id."""
    if not value:
        return None
    return MASKED + value[-4:] if len(value) >= 12 else MASKED


def with_patterns_added(have: Iterable[str], patterns: Iterable[str]) -> list[str]:
    """The bucket list with ``patterns`` (checked by ``check_bucket_pattern``) added, sorted
    and bounded."""
    return _bounded(set(have) | set(patterns))


def with_patterns_removed(have: Iterable[str], patterns: Iterable[str]) -> list[str]:
    """The bucket list without ``patterns``, each of which must be on it exactly as listed;
    a refusal names the wildcard that covers a pattern, if one does."""
    have, patterns = set(have), list(patterns)
    for pattern in patterns:
        if pattern not in have:
            covering = [p for p in sorted(have) if fnmatchcase(pattern, p)]
            hint = (
                f" (it matches {', '.join(covering)}: remove that pattern and allow "
                "the buckets to keep one by one)"
                if covering
                else ""
            )
            raise AccountError(f"{pattern!r} is not on the account's list{hint}")
    return _bounded(have - set(patterns))


def _bounded(patterns: set[str]) -> list[str]:
    if len(patterns) > MAX_BUCKET_PATTERNS:
        raise AccountError(f"an account may have at most {MAX_BUCKET_PATTERNS} patterns")
    return sorted(patterns)


def check_bucket_pattern(pattern: str) -> None:
    """Refuse a pattern that is empty, too long, or holds what no bucket name can."""
    if not isinstance(pattern, str) or not _PATTERN_CHARS.fullmatch(pattern):
        raise AccountError(
            f"bucket pattern {pattern!r} must be 1-255 characters: letters, digits, '.', "
            "'_', '-' and the wildcards * ? [ ]"
        )
    depth = 0
    for char in pattern:
        if char == "[":
            if depth:
                raise AccountError(f"bucket pattern {pattern!r}: '[' inside [...]")
            depth = 1
        elif char == "]":
            if not depth:
                raise AccountError(f"bucket pattern {pattern!r}: ']' without '['")
            depth = 0
    if depth:
        raise AccountError(f"bucket pattern {pattern!r}: '[' without ']'")
    if "[]" in pattern:
        raise AccountError(f"bucket pattern {pattern!r}: empty [] matches nothing")


def check_max_in_flight(limit: int | None) -> None:
    """Refuse a limit of uploads in flight that is not a count (None: no limit)."""
    if limit is None:
        return
    if isinstance(limit, bool) or not isinstance(limit, int):
        raise AccountError(f"max_in_flight must be a whole number, not {limit!r}")
    if limit < 1:
        raise AccountError(
            "max_in_flight must be at least 1 (to hold an account's uploads, disable it)"
        )
    if limit > MAX_IN_FLIGHT_LIMIT:
        raise AccountError(f"max_in_flight must be at most {MAX_IN_FLIGHT_LIMIT}")


def check_username(username: str) -> None:
    """A username names a directory: refuse what cannot be one."""
    if not isinstance(username, str) or not USERNAME_RE.fullmatch(username):
        raise AccountError(
            "username must be 1-64 characters of letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )


def check_s3(s3: S3Settings) -> None:
    """Refuse S3 settings that could never work together."""
    if s3.sse is not None and s3.sse not in SSE_CHOICES:
        raise AccountError(f"s3 sse must be one of {', '.join(SSE_CHOICES)}, not {s3.sse!r}")
    if s3.sse_kms_key_id and s3.sse != SSE_KMS:
        raise AccountError("a KMS key id needs sse aws:kms")
    if bool(s3.access_key_id) != bool(s3.secret_access_key):
        raise AccountError("give both the S3 access key id and its secret, or neither")
    if s3.endpoint_url and not s3.endpoint_url.startswith(("http://", "https://")):
        raise AccountError("s3 endpoint must be an http:// or https:// URL")
    check_role(s3.role_arn, s3.external_id)


def check_role(role_arn: str | None, external_id: str | None) -> None:
    """Refuse a role ARN or an external id STS would not take."""
    if role_arn is not None and (
        not isinstance(role_arn, str)
        or len(role_arn) > MAX_ROLE_ARN
        or not ROLE_ARN_RE.fullmatch(role_arn)
    ):
        raise AccountError(
            "role ARN must look like arn:aws:iam::<12-digit account>:role/<path/name> "
            f"(at most {MAX_ROLE_ARN} characters), not {str(role_arn)[:100]!r}"
        )
    if external_id is not None:
        if not role_arn:
            raise AccountError("an external id goes with a role ARN")
        if not isinstance(external_id, str) or not EXTERNAL_ID_RE.fullmatch(external_id):
            # Not echoed: it is meant for the role's trust policy, not for logs.
            raise AccountError(
                "external id must be 2-1224 characters of letters, digits and + = , . @ : / - _"
            )
