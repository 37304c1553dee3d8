"""The errors of the client (every one a :class:`ClientError`), and its warning."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vodpush_client.records import StatusRecord

__all__ = [
    "ApiError",
    "ApiWarning",
    "ClientError",
    "FiltersUnsupported",
    "RequestNotFound",
    "TransportError",
    "WaitTimeout",
]


class ClientError(Exception):
    """Base class of every error this client raises."""


class ApiError(ClientError):
    """The API answered ``status: failure``; ``code`` is its four-digit code (``"0003"``)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{message} (code {code})")
        self.code = code
        self.message = message


class TransportError(ClientError):
    """No usable answer: the connection failed, timed out, or the HTTP response was not a
    200 carrying a JSON envelope. ``status_code`` is set when an HTTP response arrived."""

    def __init__(self, message: str, *, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


class FiltersUnsupported(ClientError):
    """The server answered without ``total``: it ignored the aws.status filters (or
    after_id) sent, so the records are not what was asked for. A ScaleEngine server, or a
    vodpush older than the filters."""

    def __init__(self, url: str, names: Iterable[str]) -> None:
        super().__init__(
            f"{url} ignored {', '.join(names)}: it does not support aws.status filters"
        )


class RequestNotFound(ClientError, LookupError):
    """``get(id)`` found no request with that id in this account."""

    def __init__(self, request_id: int) -> None:
        super().__init__(f"request {request_id} not found")
        self.request_id = request_id


class WaitTimeout(ClientError, TimeoutError):
    """``wait(id, timeout=...)`` ran out of time before the request finished; ``record``
    is the last one seen (the request goes on: waiting again picks it up)."""

    def __init__(self, record: StatusRecord, timeout: float) -> None:
        super().__init__(
            f"request {record.id} not finished after {timeout:g} s: "
            f"{record.state or 'unknown'} ({record.message})"
        )
        self.record = record
        self.request_id = record.id
        self.timeout = timeout


class ApiWarning(UserWarning):
    """The server named fields of a request that it ignored (its ``warnings``). Also
    kept in ``last_warnings`` of the client and ``StatusPage.warnings``."""
