"""Credentials of an assumed IAM role, refreshed before they expire.

An account's S3 settings may name a role (``role_arn``, and the ``external_id`` its trust
policy asks for). Its S3 client then signs with temporary credentials from STS AssumeRole,
called with the account's own keys, or boto3's default credentials when it has none. The
credentials are botocore's ``DeferredRefreshableCredentials``: nothing is asked of STS until
the first request, and botocore asks again ahead of expiry (the advisory window: one
request tries, the others go on with the current credentials; the mandatory window: every
request waits for new ones), so an upload longer than a session keeps going.

A refresh that fails raises ``RoleUnavailable`` (a BotoCoreError) from inside the S3 call
that needed the credentials: ``classify`` makes it transient when STS was not reached or
throttled, permanent (naming the role) when STS refused. Nothing here logs or shows the
external id or a secret.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

import boto3
from botocore.client import BaseClient
from botocore.config import Config
from botocore.credentials import DeferredRefreshableCredentials
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from vodpush.core.accounts import S3Settings
from vodpush.transfer.errors import RoleUnavailable, classify

__all__ = [
    "DEFAULT_SESSION_SECONDS",
    "MAX_SESSION_SECONDS",
    "MIN_SESSION_SECONDS",
    "RoleCredentials",
    "role_credentials",
]

# STS's bounds on DurationSeconds (a role's own MaxSessionDuration may be lower: STS then
# refuses with ValidationError, a permanent failure naming the role).
MIN_SESSION_SECONDS = 900
MAX_SESSION_SECONDS = 43_200
DEFAULT_SESSION_SECONDS = 3600
# botocore's own refresh windows (15 and 10 minutes before expiry), kept for sessions of an
# hour or more; a shorter session gets windows in proportion, so it is not refreshed on
# every request.
_ADVISORY_SECONDS = 15 * 60
_MANDATORY_SECONDS = 10 * 60
# Credentials that live less than this after STS hands them out are not used.
_MIN_FRESH_SECONDS = 30

TimeFetcher = Callable[[], dt.datetime]


def _utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class RoleCredentials(DeferredRefreshableCredentials):
    """An assumed role's credentials: fetched on first use, refreshed ahead of expiry."""

    def __init__(
        self,
        refresh: Callable[[], dict[str, Any]],
        *,
        duration: int,
        time_fetcher: TimeFetcher = _utc_now,
    ) -> None:
        super().__init__(refresh, "vodpush-assume-role", time_fetcher)
        # RefreshableCredentials takes these as constructor arguments; the deferred kind
        # does not pass them on.
        self._advisory_refresh_timeout = min(_ADVISORY_SECONDS, duration // 4)
        self._mandatory_refresh_timeout = min(_MANDATORY_SECONDS, duration // 6)

    def __repr__(self) -> str:
        return f"RoleCredentials(method={self.method!r})"


def role_credentials(
    s3: S3Settings,
    *,
    session_name: str,
    duration: int = DEFAULT_SESSION_SECONDS,
    connect_timeout: float = 10,
    read_timeout: float = 10,
    max_attempts: int = 3,
    time_fetcher: TimeFetcher = _utc_now,
) -> RoleCredentials:
    """Credentials of ``s3.role_arn``, assumed with ``s3``'s keys (or boto3's defaults).

    STS is asked at ``s3.endpoint_url`` when the account names one (S3-compatible stores
    and test servers serve STS beside S3), else where boto3's conventions say
    (``AWS_ENDPOINT_URL_STS``, ``AWS_ENDPOINT_URL``, AWS)."""
    if not s3.role_arn:
        raise ValueError("these S3 settings name no role")
    if not MIN_SESSION_SECONDS <= duration <= MAX_SESSION_SECONDS:
        raise ValueError(
            f"role session duration must be {MIN_SESSION_SECONDS}-{MAX_SESSION_SECONDS} s"
        )
    sts = _sts_client(
        s3, connect_timeout=connect_timeout, read_timeout=read_timeout, max_attempts=max_attempts
    )
    return RoleCredentials(
        _Refresher(sts, s3, session_name=session_name, duration=duration, now=time_fetcher),
        duration=duration,
        time_fetcher=time_fetcher,
    )


class _Refresher:
    """One AssumeRole call, its answer as botocore's refresh metadata, its failure as
    RoleUnavailable."""

    def __init__(
        self,
        sts: BaseClient,
        s3: S3Settings,
        *,
        session_name: str,
        duration: int,
        now: TimeFetcher,
    ) -> None:
        self._sts = sts
        self._role_arn = str(s3.role_arn)
        self._params: dict[str, Any] = {
            "RoleArn": self._role_arn,
            "RoleSessionName": session_name,
            "DurationSeconds": duration,
        }
        if s3.external_id:
            self._params["ExternalId"] = s3.external_id
        self._now = now

    def __repr__(self) -> str:  # never the external id
        return f"_Refresher(role_arn={self._role_arn!r})"

    def __call__(self) -> dict[str, Any]:
        try:
            answer = self._sts.assume_role(**self._params)
        except ClientError as exc:
            raise self._refused(exc) from exc
        except BotoCoreError as exc:
            raise self._unreached(exc) from exc
        credentials = answer["Credentials"]
        expiration = credentials["Expiration"]
        if isinstance(expiration, str):
            expiration = dt.datetime.fromisoformat(expiration)
        if expiration <= self._now() + dt.timedelta(seconds=_MIN_FRESH_SECONDS):
            # botocore would raise a bare RuntimeError for credentials that are expired
            # already: most likely this host's clock is off, which passes once fixed.
            raise RoleUnavailable(
                message=f"could not assume role {self._role_arn}: STS returned credentials "
                "that expire at once (is the clock of this host right?)",
                transient=True,
                code="ExpiredToken",
                detail=f"expiration {expiration.isoformat()}",
            )
        return {
            "access_key": credentials["AccessKeyId"],
            "secret_key": credentials["SecretAccessKey"],
            "token": credentials["SessionToken"],
            "expiry_time": expiration.isoformat(),
        }

    def _refused(self, exc: ClientError) -> RoleUnavailable:
        err = classify(exc)
        error = exc.response.get("Error") or {}
        code = err.code or "Unknown"
        aws_message = str(error.get("Message") or "")
        if err.transient:
            text = f"could not assume role {self._role_arn}: STS error {code}"
        elif code == "AccessDenied":
            # STS's own text names the principal of the operator's credentials: kept for
            # the operator's log.
            text = (
                f"could not assume role {self._role_arn}: AccessDenied (the role's trust "
                "policy does not let this service assume it, or the external id differs)"
            )
        else:
            text = f"could not assume role {self._role_arn}: {code}" + (
                f": {aws_message}" if aws_message and code != "Unknown" else ""
            )
        return RoleUnavailable(
            message=text, transient=err.transient, code=code, detail=aws_message or None
        )

    def _unreached(self, exc: BotoCoreError) -> RoleUnavailable:
        if isinstance(exc, NoCredentialsError):
            return RoleUnavailable(
                message=f"could not assume role {self._role_arn}: there are no credentials "
                "to assume it with (set keys on the account, or AWS_* for the service)",
                transient=False,
                code=type(exc).__name__,
            )
        err = classify(exc)
        # botocore's own text may name the endpoint: kept for the operator's log.
        what = "STS could not be reached" if err.transient else "the STS call failed"
        return RoleUnavailable(
            message=f"could not assume role {self._role_arn}: {what} ({type(exc).__name__})",
            transient=err.transient,
            code=type(exc).__name__,
            detail=str(exc),
        )


def _sts_client(
    s3: S3Settings, *, connect_timeout: float, read_timeout: float, max_attempts: int
) -> BaseClient:
    config = Config(
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        retries={"mode": "standard", "max_attempts": max_attempts},
    )
    if s3.access_key_id:
        session = boto3.session.Session(
            aws_access_key_id=s3.access_key_id,
            aws_secret_access_key=s3.secret_access_key,
            region_name=s3.region,
        )
    else:
        # A new session reads the operator's credentials (AWS_*, ~/.aws, an instance role)
        # as they are now.
        session = boto3.session.Session(region_name=s3.region)
    return session.client("sts", endpoint_url=s3.endpoint_url, config=config)
