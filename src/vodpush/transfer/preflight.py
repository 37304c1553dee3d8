"""Preflight against S3: would an upload to this bucket, with these settings, go through?

The S3 calls go through the worker's own client construction (``make_s3_client``, the role's
credentials of ``transfer.roles``), with short timeouts and no retries, in this order:

1. credentials: with a role, AssumeRole (its refusal names the role); with keys (or the
   service's credentials), ListBuckets: S3 authenticates before it authorizes, so
   InvalidAccessKeyId or SignatureDoesNotMatch condemn the keys and AccessDenied does not
   (STS's GetCallerIdentity may not exist beside an S3-compatible store).
2. bucket: HeadBucket. 404: it does not exist; 403 tells nothing (the credentials may lack
   s3:ListBucket, which an upload does not need), so the write below decides.
3. acl, only for an ACL sent as a header: GetBucketOwnershipControls (BucketOwnerEnforced:
   ACLs are disabled, S3 refuses any ACL header but bucket-owner-full-control) and, for a
   public ACL, GetPublicAccessBlock (BlockPublicAcls refuses it, IgnorePublicAcls voids it).
   When S3 refuses to show a setting, the verdict is "unknown", not a failure. The AWS
   account's own public access block (S3 Control) is not looked at.
4. writable: CreateMultipartUpload of the destination key, with the ACL and encryption the
   upload will send, then AbortMultipartUpload. Chosen over a PutObject of a marker and its
   DeleteObject: it leaves no object (no version, no delete marker in a versioned bucket,
   no ObjectCreated event for the customer's pipeline), never overwrites the key, needs no
   s3:DeleteObject, and checks the exact key (prefix-scoped policies) with the real options
   (s3:PutObjectAcl for an ACL, kms:GenerateDataKey for SSE-KMS). An abort that fails
   leaves an empty multipart upload (no parts, no cost); the check still passes, and says so.

Each call has its own timeouts (3 s to connect, 5 s to read) and no retry. ``S3Preflight``
bounds the whole in time (a thread of its own, waited for at most ``timeout`` seconds; a
late thread ends by its calls' timeouts) and in number (``concurrency`` at once per
process, a slot held until its thread ends; more are told to try again), so that the API's
threads are not held by a slow S3.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from botocore.client import BaseClient
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from vodpush.core.accounts import S3Settings, role_session_name
from vodpush.core.options import CANNED_ACLS
from vodpush.core.preflight import PUBLIC_ACLS, Check, PreflightReport, Verdict, sends_acl
from vodpush.transfer.errors import RoleUnavailable, classify
from vodpush.transfer.options import ObjectOptions
from vodpush.transfer.roles import MIN_SESSION_SECONDS, role_credentials
from vodpush.transfer.s3client import make_s3_client

__all__ = ["CHECK_KEY", "S3Preflight", "run_preflight"]

log = logging.getLogger(__name__)

# The key ``vodpush account check`` writes (and aborts) when none is named.
CHECK_KEY = ".vodpush-preflight/check"
CONNECT_TIMEOUT = 3.0
READ_TIMEOUT = 5.0
# What S3 answers for keys it does not accept (the credentials, not the permissions).
_CREDENTIAL_CODES = frozenset(
    {
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "InvalidToken",
        "ExpiredToken",
        "TokenRefreshRequired",
        "InvalidClientTokenId",
    }
)
_BUCKET_GONE = frozenset({"NoSuchBucket", "NotFound", "404"})
_ACLS_DISABLED = "AccessControlListNotSupported"


class _Stop(Exception):
    """A check failed: the preflight stops there."""

    def __init__(self, check: Check) -> None:
        super().__init__(check.detail)
        self.check = check


def run_preflight(
    s3: S3Settings,
    *,
    bucket: str,
    key: str,
    acl: str,
    session_name: str | None = None,
    deadline: float | None = None,
    connect_timeout: float = CONNECT_TIMEOUT,
    read_timeout: float = READ_TIMEOUT,
) -> PreflightReport:
    """The report of the checks (see the module doc), stopping at the first failure; no
    step starts after ``deadline`` (``time.monotonic()``)."""
    steps = _Steps(
        s3,
        bucket=bucket,
        key=key,
        acl=acl,
        session_name=session_name or role_session_name(None),
        deadline=deadline,
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
    )
    checks: list[Check] = []
    names = ("credentials", "bucket", "acl", "writable")
    for name in names:
        try:
            checks.append(steps.run(name))
        except _Stop as stop:
            checks.append(stop.check)
            if stop.check.name != name:  # found out by a later step (S3's answer to it)
                checks.append(Check(name, Verdict.SKIPPED, f"stopped: {stop.check.name} failed"))
            break
    done = {c.name for c in checks}
    checks += [Check(n, Verdict.SKIPPED, "not reached") for n in names if n not in done]
    return PreflightReport(bucket=bucket, key=key, acl=acl, checks=tuple(checks))


class _Steps:
    def __init__(
        self,
        s3: S3Settings,
        *,
        bucket: str,
        key: str,
        acl: str,
        session_name: str,
        deadline: float | None,
        connect_timeout: float,
        read_timeout: float,
    ) -> None:
        self.s3 = s3
        self.bucket = bucket
        self.key = key
        self.acl = acl
        self.session_name = session_name
        self.deadline = deadline
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._client: BaseClient | None = None
        self._role_credentials: Any = None

    def run(self, name: str) -> Check:
        if self.deadline is not None and time.monotonic() >= self.deadline:
            raise _Stop(Check(name, Verdict.FAILED, "the checks took too long; try again", True))
        step: Callable[[], Check] = getattr(self, f"_check_{name}")
        return step()

    @property
    def client(self) -> BaseClient:
        if self._client is None:
            self._client = make_s3_client(
                self.s3,
                max_pool_connections=2,
                max_attempts=1,  # a check answers now; the upload itself will retry
                connect_timeout=self.connect_timeout,
                read_timeout=self.read_timeout,
                session_name=self.session_name,
                credentials=self._role_credentials,
            )
        return self._client

    # -- the steps -------------------------------------------------------------------------

    def _check_credentials(self) -> Check:
        if not self.s3.role_arn:
            return self._check_keys()
        credentials = role_credentials(
            self.s3,
            session_name=self.session_name,
            duration=MIN_SESSION_SECONDS,  # thrown away after the checks
            connect_timeout=self.connect_timeout,
            read_timeout=self.read_timeout,
            max_attempts=1,
        )
        try:
            credentials.get_frozen_credentials()
        except RoleUnavailable as exc:
            raise _Stop(self._s3_failure("credentials", exc)) from exc
        self._role_credentials = credentials
        return Check(
            "credentials",
            Verdict.OK,
            f"role {self.s3.role_arn} assumed (session {self.session_name})",
        )

    def _check_keys(self) -> Check:
        """Whether S3 knows the keys: ListBuckets (one) needs no right to tell, since S3
        authenticates before it authorizes: AccessDenied means the keys are good."""
        who = "the account's keys" if self.s3.access_key_id else "the service's credentials"
        try:
            self.client.list_buckets(MaxBuckets=1)
        except ClientError as exc:
            if _code(exc) in _CREDENTIAL_CODES or classify(exc).transient:
                raise _Stop(self._s3_failure("credentials", exc)) from exc
            return Check(
                "credentials",
                Verdict.OK,
                f"S3 accepts {who} (ListBuckets: {_code(exc) or _status(exc)}; uploads do "
                "not need it)",
            )
        except BotoCoreError as exc:
            raise _Stop(self._s3_failure("credentials", exc)) from exc
        return Check("credentials", Verdict.OK, f"S3 accepts {who}")

    def _check_bucket(self) -> Check:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            status = _status(exc)
            if status == 404 or _code(exc) in _BUCKET_GONE:
                raise _Stop(self._no_bucket()) from exc
            if status == 403:
                return Check(
                    "bucket",
                    Verdict.UNKNOWN,
                    "HeadBucket was refused (403): the credentials may lack s3:ListBucket, "
                    "which uploads do not need; the write check decides",
                )
            if status == 301:
                region = _header(exc, "x-amz-bucket-region")
                where = f"region {region}" if region else "another region"
                raise _Stop(
                    Check(
                        "bucket",
                        Verdict.FAILED,
                        f"bucket {self.bucket!r} is in {where}, not the account's "
                        f"({self.s3.region or 'default'})",
                    )
                ) from exc
            raise _Stop(self._s3_failure("bucket", exc)) from exc
        except BotoCoreError as exc:
            raise _Stop(self._s3_failure("bucket", exc)) from exc
        return Check("bucket", Verdict.OK, f"bucket {self.bucket!r} exists")

    def _check_acl(self) -> Check:
        if not sends_acl(self.acl):
            return Check("acl", Verdict.SKIPPED, f"acl {self.acl} sends no ACL: nothing to check")
        unknown: list[str] = []
        ownership = self._look(
            "get_bucket_ownership_controls", absent="OwnershipControlsNotFoundError"
        )
        if ownership is None:
            unknown.append("Object Ownership")
        else:
            rules = ownership.get("OwnershipControls", {}).get("Rules", [])
            if any(rule.get("ObjectOwnership") == "BucketOwnerEnforced" for rule in rules):
                raise _Stop(self._acls_disabled())
        if self.acl in PUBLIC_ACLS:
            block = self._look(
                "get_public_access_block", absent="NoSuchPublicAccessBlockConfiguration"
            )
            if block is None:
                unknown.append("the public access block")
            else:
                config = block.get("PublicAccessBlockConfiguration", {})
                for setting in ("BlockPublicAcls", "IgnorePublicAcls"):
                    if config.get(setting):
                        why = " (the object would not be public)" if "Ignore" in setting else ""
                        raise _Stop(
                            Check(
                                "acl",
                                Verdict.FAILED,
                                f"{self.acl} is blocked: the bucket's public access block "
                                f"sets {setting}{why}; use acl private",
                            )
                        )
        if unknown:
            return Check(
                "acl",
                Verdict.UNKNOWN,
                f"S3 did not show {' and '.join(unknown)} (no permission to read "
                "it); the write check sends the ACL",
            )
        return Check("acl", Verdict.OK, f"acl {self.acl} is allowed by the bucket's settings")

    def _check_writable(self) -> Check:
        arguments = self._object_arguments()
        try:
            created = self.client.create_multipart_upload(
                Bucket=self.bucket, Key=self.key, **arguments
            )
        except ClientError as exc:
            code = _code(exc)
            if code == _ACLS_DISABLED:
                raise _Stop(self._acls_disabled()) from exc
            if code in _BUCKET_GONE:
                raise _Stop(self._no_bucket()) from exc
            if code in _CREDENTIAL_CODES:
                raise _Stop(self._s3_failure("credentials", exc)) from exc
            err = classify(exc)
            if err.transient:
                raise _Stop(self._s3_failure("writable", exc)) from exc
            raise _Stop(
                Check(
                    "writable",
                    Verdict.FAILED,
                    f"cannot write {self.key!r} to bucket {self.bucket!r}: {code}"
                    + _hint(code, self.acl),
                )
            ) from exc
        except BotoCoreError as exc:
            raise _Stop(self._s3_failure("writable", exc)) from exc
        upload_id = created["UploadId"]
        try:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=self.key, UploadId=upload_id)
        except (ClientError, BotoCoreError) as exc:
            log.warning(
                "preflight: abort of its multipart upload failed",
                extra={
                    "action": "preflight.abort_failed",
                    "bucket": self.bucket,
                    "upload_id": upload_id,
                    "error": classify(exc).message,
                },
            )
            return Check(
                "writable",
                Verdict.OK,
                f"bucket {self.bucket!r} takes {self.key!r}; aborting the check's multipart "
                f"upload failed ({classify(exc).code}): an empty one may be left (no parts)",
            )
        return Check(
            "writable",
            Verdict.OK,
            f"bucket {self.bucket!r} takes {self.key!r} (a multipart upload was started "
            "and aborted)",
        )

    # -- helpers ---------------------------------------------------------------------------

    def _object_arguments(self) -> dict[str, Any]:
        """The arguments the upload's CreateMultipartUpload sends (ACL, encryption,
        checksum), without metadata; an ACL that sends no header is sent as none."""
        acl = self.acl if self.acl in CANNED_ACLS else "private"
        options = ObjectOptions(
            acl=acl,
            sse=self.s3.sse,
            sse_kms_key_id=self.s3.sse_kms_key_id,
            checksums=self.s3.checksums,
        )
        arguments = options.s3_arguments(key=self.key, file_name=self.key)
        arguments.pop("Metadata", None)
        return arguments

    def _look(self, method: str, *, absent: str) -> Mapping[str, Any] | None:
        """A bucket setting: its answer, {} when the bucket has none, None when S3 does not
        show it (403, or a store without the call)."""
        try:
            return dict(getattr(self.client, method)(Bucket=self.bucket))
        except ClientError as exc:
            code = _code(exc)
            if code == absent:
                return {}
            if code in _BUCKET_GONE:
                raise _Stop(self._no_bucket()) from exc
            if code in _CREDENTIAL_CODES or classify(exc).transient:
                raise _Stop(self._s3_failure("acl", exc)) from exc
            return None  # AccessDenied, NotImplemented: cannot be told
        except BotoCoreError as exc:
            raise _Stop(self._s3_failure("acl", exc)) from exc

    def _no_bucket(self) -> Check:
        return Check("bucket", Verdict.FAILED, f"bucket {self.bucket!r} does not exist")

    def _acls_disabled(self) -> Check:
        return Check(
            "acl",
            Verdict.FAILED,
            f"ACLs are disabled on bucket {self.bucket!r} (Object Ownership: "
            f"BucketOwnerEnforced); use acl bucket-default or private",
        )

    def _s3_failure(self, name: str, exc: BaseException) -> Check:
        """A failure that is not about the bucket's settings: the credentials, or S3 not
        answering."""
        if isinstance(exc, RoleUnavailable):
            text = exc.message + ("; try again" if exc.transient else "")
            return Check("credentials", Verdict.FAILED, text, exc.transient)
        if isinstance(exc, NoCredentialsError):
            return Check(
                "credentials",
                Verdict.FAILED,
                "no S3 credentials: set keys on the account, or AWS_* for the service",
            )
        err = classify(exc)
        if isinstance(exc, ClientError) and err.code in _CREDENTIAL_CODES:
            return Check("credentials", Verdict.FAILED, f"credentials rejected: {err.code}")
        if isinstance(exc, ClientError):
            text = f"S3 error {err.code}"
        else:
            text = f"S3 could not be reached ({err.code})"
        if err.transient:
            text += "; try again"
        return Check(name, Verdict.FAILED, text, err.transient)


def _code(exc: ClientError) -> str:
    return str((exc.response.get("Error") or {}).get("Code") or "")


def _status(exc: ClientError) -> int | None:
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return int(status) if status is not None else None


def _header(exc: ClientError, name: str) -> str | None:
    headers = exc.response.get("ResponseMetadata", {}).get("HTTPHeaders") or {}
    value = headers.get(name)
    return str(value) if value else None


def _hint(code: str, acl: str) -> str:
    if code != "AccessDenied":
        return ""
    if sends_acl(acl):
        return " (the credentials need s3:PutObject and s3:PutObjectAcl on it)"
    return " (the credentials need s3:PutObject on it)"


class S3Preflight:
    """The preflight the API runs (a ``core.preflight.PreflightPort``): ``run_preflight`` on
    a thread of its own, waited for at most ``timeout`` seconds; at most ``concurrency``
    at once in this process (a slot is held until its thread ends, late or not)."""

    def __init__(self, *, timeout: float = 10.0, concurrency: int = 1) -> None:
        if timeout <= 0 or concurrency < 1:
            raise ValueError("timeout must be positive and concurrency at least 1")
        self.timeout = timeout
        self._slots = threading.BoundedSemaphore(concurrency)

    def __repr__(self) -> str:
        return f"S3Preflight(timeout={self.timeout})"

    def __call__(
        self,
        s3: S3Settings,
        *,
        bucket: str,
        key: str,
        acl: str,
        session_name: str | None = None,
    ) -> PreflightReport:
        if not self._slots.acquire(blocking=False):
            return _report(
                bucket, key, acl, "too many preflights are running; try again in a few seconds"
            )
        deadline = time.monotonic() + self.timeout
        answer: list[PreflightReport] = []
        done = threading.Event()

        def run() -> None:
            try:
                answer.append(
                    run_preflight(
                        s3,
                        bucket=bucket,
                        key=key,
                        acl=acl,
                        session_name=session_name,
                        deadline=deadline,
                    )
                )
            except Exception:
                log.exception("preflight crashed", extra={"action": "preflight.crashed"})
            finally:
                self._slots.release()
                done.set()

        threading.Thread(target=run, name="preflight", daemon=True).start()
        if not done.wait(self.timeout):
            report = _report(
                bucket, key, acl, f"S3 did not answer within {self.timeout:g} s; try again"
            )
        elif not answer:  # a bug, logged above
            report = _report(bucket, key, acl, "the checks failed unexpectedly; try again")
        else:
            report = answer[0]
        log.info(
            "preflight passed" if report.passed else "preflight failed",
            extra={
                "action": "preflight.passed" if report.passed else "preflight.failed",
                "bucket": bucket,
                "session": session_name,
                "reason": None if report.passed else report.message,
            },
        )
        return report


def _report(bucket: str, key: str, acl: str, why: str) -> PreflightReport:
    """A report of a preflight that could not run its checks (transient)."""
    return PreflightReport(
        bucket=bucket,
        key=key,
        acl=acl,
        checks=(Check("preflight", Verdict.FAILED, why, transient=True),),
    )
