"""How the engine fails: ``UploadError`` and ``classify``, which decides what is transient.

Only errors known to pass on their own are transient (retried); everything else is
permanent. ``str()`` of an UploadError is fit for the customer's request status.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

from botocore.exceptions import (
    BotoCoreError,
    ChecksumError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    CredentialRetrievalError,
    EndpointConnectionError,
    FlexibleChecksumError,
    IncompleteReadError,
    NoCredentialsError,
    PartialCredentialsError,
    ProxyConnectionError,
    ReadTimeoutError,
    ResponseStreamingError,
)

__all__ = [
    "INTEGRITY_ERROR",
    "INTERRUPTED",
    "ROLE_UNAVAILABLE",
    "SOURCE_CHANGED",
    "STALE_CHECKPOINT",
    "RoleUnavailable",
    "UploadError",
    "UploadInterrupted",
    "classify",
    "s3_call",
]

# Codes of our own, beside S3's.
SOURCE_CHANGED = "SourceChanged"
INTEGRITY_ERROR = "IntegrityError"
INTERRUPTED = "Interrupted"
# The role of the account's settings could not be assumed (transfer.roles).
ROLE_UNAVAILABLE = "AssumeRoleFailed"
# S3 lost (or never had) what the checkpoint names: a fresh multipart upload will work.
STALE_CHECKPOINT = ("NoSuchUpload", "InvalidPart")


class UploadError(Exception):
    """An upload failed; ``str()`` is a message fit for the request's status."""

    def __init__(
        self,
        message: str,
        *,
        transient: bool,
        http_status: int | None = None,
        code: str | None = None,
        detail: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.transient = transient
        self.http_status = http_status
        self.code = code
        # For the operator's log only: ``message`` is shown to the customer and must not
        # tell them the operator's endpoints or addresses.
        self.detail = detail

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.message!r}, transient={self.transient}, "
            f"http_status={self.http_status}, code={self.code!r})"
        )


class UploadInterrupted(UploadError):
    """``should_stop`` asked to stop; completed parts are kept for the next attempt."""

    def __init__(self, message: str = "upload interrupted; it will resume") -> None:
        super().__init__(message, transient=True, code=INTERRUPTED)


class RoleUnavailable(BotoCoreError):
    """Credentials of an assumed role could not be had (AssumeRole failed, or STS was not
    reached) when a request needed them. Raised from inside a botocore call, where botocore
    asks the credentials for a refresh: a BotoCoreError, so that every place that handles
    the client's errors handles it too; ``classify`` turns it into its UploadError."""

    fmt = "{message}"

    def __init__(
        self, *, message: str, transient: bool, code: str, detail: str | None = None
    ) -> None:
        super().__init__(message=message)
        self.message = message
        self.transient = transient
        self.code = code
        self.detail = detail


_TRANSIENT_CODES = frozenset(
    {
        "BadDigest",  # body corrupted in transit: sending it again fixes it
        "BandwidthLimitExceeded",
        "IncompleteBody",
        "InternalError",
        "OperationAborted",
        "PriorRequestNotComplete",
        "RequestLimitExceeded",
        "RequestTimeout",
        "RequestTimeoutException",
        "ServiceUnavailable",
        "SlowDown",
        "TooManyRequestsException",
        "XAmzContentSHA256Mismatch",
    }
)
_TRANSIENT_BOTOCORE = (
    EndpointConnectionError,
    ConnectTimeoutError,
    ProxyConnectionError,
    ConnectionClosedError,
    ReadTimeoutError,
    ResponseStreamingError,
    IncompleteReadError,
    ChecksumError,
    FlexibleChecksumError,
    CredentialRetrievalError,  # instance metadata / SSO endpoints hiccup too
)
_TRANSIENT_ERRNOS = frozenset(
    {errno.EIO, errno.EAGAIN, errno.EINTR, errno.ETIMEDOUT, getattr(errno, "ESTALE", -1)}
)


# What the customer is told of a connection error: botocore's own texts name the endpoint
# URL, which for the operator's default S3 settings is the operator's business.
_CONNECTION_PHRASES: dict[type[BaseException], str] = {
    EndpointConnectionError: "could not connect to the S3 endpoint",
    ConnectTimeoutError: "connecting to the S3 endpoint timed out",
    ProxyConnectionError: "could not connect through the proxy to S3",
    ConnectionClosedError: "S3 closed the connection",
    ReadTimeoutError: "S3 did not answer in time",
    ResponseStreamingError: "the answer of S3 was cut off",
    IncompleteReadError: "the answer of S3 was cut off",
    ChecksumError: "a checksum of the answer of S3 did not match",
    FlexibleChecksumError: "a checksum of the answer of S3 did not match",
    CredentialRetrievalError: "S3 credentials could not be fetched",
}


def classify(exc: BaseException) -> UploadError:
    """The UploadError for ``exc``: transient only for errors known to pass on their own."""
    if isinstance(exc, UploadError):
        return exc
    if isinstance(exc, ClientError):
        return _classify_client_error(exc)
    if isinstance(exc, RoleUnavailable):
        return UploadError(exc.message, transient=exc.transient, code=exc.code, detail=exc.detail)
    if isinstance(exc, _TRANSIENT_BOTOCORE):
        return UploadError(
            f"S3 connection error: {_CONNECTION_PHRASES.get(type(exc), 'the connection failed')}",
            transient=True,
            code=type(exc).__name__,
            detail=str(exc),
        )
    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        return UploadError(
            f"S3 credentials missing: {exc} (set them on the account or in the environment)",
            transient=False,
            code=type(exc).__name__,
        )
    if isinstance(exc, BotoCoreError):
        return UploadError(f"S3 client error: {exc}", transient=False, code=type(exc).__name__)
    if isinstance(exc, ConnectionError | TimeoutError):
        return UploadError(f"network error: {exc}", transient=True, code=type(exc).__name__)
    if isinstance(exc, OSError):
        return _classify_os_error(exc)
    return UploadError(f"unexpected error: {type(exc).__name__}: {exc}", transient=False)


def _classify_client_error(exc: ClientError) -> UploadError:
    error = exc.response.get("Error") or {}
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    code = str(error.get("Code") or "")
    message = str(error.get("Message") or "")
    if code.isdigit():  # HEAD responses have no body: botocore uses the status as the code
        status = status or int(code)
        code = ""
    if not code and status:
        try:
            code = HTTPStatus(status).phrase.replace(" ", "")
        except ValueError:
            code = f"HTTP{status}"
        message = message if message and not message.isdigit() else ""
    code = code or "Unknown"
    transient = (
        code in _TRANSIENT_CODES
        or "Throttl" in code
        or (status is not None and (status >= 500 or status in (408, 429)))
    )
    text = f"S3 error {code}" + (f" ({status})" if status else "")
    if message:
        text += f": {message}"
    return UploadError(text, transient=transient, http_status=status, code=code)


def _classify_os_error(exc: OSError) -> UploadError:
    name = exc.filename if exc.filename is not None else "?"
    reason = exc.strerror or str(exc)
    if isinstance(exc, FileNotFoundError):
        return UploadError(f"source file missing: {name}", transient=False, code="SourceMissing")
    if isinstance(exc, PermissionError):
        return UploadError(
            f"source file not readable (permission denied): {name}",
            transient=False,
            code="SourceUnreadable",
        )
    if isinstance(exc, IsADirectoryError | NotADirectoryError):
        return UploadError(
            f"source is not a regular file: {name}", transient=False, code="SourceNotFile"
        )
    if exc.errno in _TRANSIENT_ERRNOS:
        return UploadError(
            f"I/O error reading source file {name}: {reason}", transient=True, code="SourceIO"
        )
    return UploadError(
        f"cannot read source file {name}: {reason}", transient=False, code="SourceUnreadable"
    )


def s3_call(method: Callable[..., dict[str, Any]], **kwargs: Any) -> dict[str, Any]:
    """``method(**kwargs)``, with botocore's errors turned into UploadError."""
    try:
        return method(**kwargs)
    except (ClientError, BotoCoreError) as exc:
        raise classify(exc) from exc
