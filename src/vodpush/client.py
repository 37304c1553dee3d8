"""A Python client for the vodpush (ScaleEngine-compatible) API.

::

    from vodpush.client import Client

    with Client("https://vodpush.example.com/stable/", 158, API_KEY, API_SECRET) as c:
        request_id = c.upload("sestore1/jb/show.mp4", "shows/show.mp4", "my-bucket", "private")
        print(c.get(request_id).message)

Requests are signed exactly as the PHP reference client signs them (see
:mod:`vodpush.protocol.signing`) and sent as a urlencoded ``json`` form field. Failures the API
reports come back as :class:`ApiError` (with the API's ``code``); everything that keeps an
answer from arriving is a :class:`TransportError`.

Retries are limited to what cannot do harm: ``aws.status`` only reads, so it is retried on
connection trouble, timeouts and HTTP 5xx. ``aws.upload`` is retried only by resending the
*same signed body*: the server recognises a signature it has already accepted and answers the
first request's id again, so a lost answer never queues a second upload. The body is never
re-signed, since a fresh signature would be a new request.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from datetime import datetime
from importlib import metadata as _dist
from typing import Any

import httpx

from vodpush.core.records import SUCCESS_MESSAGE, format_time, parse_time, retry_cause
from vodpush.protocol.signing import sign_request
from vodpush.webhooks import WebhookVerificationError
from vodpush.webhooks import verify as verify_callback

__all__ = [
    "DEFAULT_TIMEOUT",
    "ApiError",
    "Client",
    "ClientError",
    "RequestNotFound",
    "StatusRecord",
    "TransportError",
    "WebhookVerificationError",
    "verify_callback",
]

DEFAULT_TIMEOUT = 10.0
DEFAULT_RETRIES = 2
# An upload is only resent while its timestamp is well inside the server's replay window
# (±300 s by default): past the window the server no longer recognises the signature, and the
# resend would be refused with 0002 although the first one may have been queued.
_UPLOAD_RESEND_HORIZON = 60.0
# HTTP statuses a proxy or an overloaded server answers before any command ran.
_RETRYABLE_HTTP = frozenset({429, 502, 503, 504})
_BUSY_CODE = "1000"


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


class RequestNotFound(ClientError, LookupError):
    """``get(id)`` found no request with that id in this account."""

    def __init__(self, request_id: int) -> None:
        super().__init__(f"request {request_id} not found")
        self.request_id = request_id


# -- records ------------------------------------------------------------------------------


def _as_int(value: Any, default: int | None = None) -> int | None:
    """Integers may come as numbers or digit strings; anything else counts as absent."""
    if isinstance(value, bool):
        return default
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return default


def _as_str(value: Any) -> str:
    return "" if value is None else str(value)


def _opt_str(value: Any) -> str | None:
    return None if value is None else str(value)


def _as_time(value: Any) -> datetime | None:
    """``YYYY-MM-DD HH:MM:SS`` (UTC) as an aware datetime; None when absent or ``""``."""
    return parse_time(value) if isinstance(value, str) else None


def _as_mapping(value: Any) -> dict[str, Any]:
    """The reference page shows ``metadata`` as the string ``"{}"`` and PHP encodes an empty
    array as ``[]``: read both as an object."""
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except ValueError:
            return {}
    return dict(value) if isinstance(value, Mapping) else {}


@dataclass(frozen=True)
class StatusRecord:
    """One upload request as ``aws.status`` reports it.

    The documented fields always exist; the extras are ``None`` when a server does not send
    them, and fields this client does not know are kept in ``extra``.
    """

    id: int
    cdn_id: int
    path: str
    destination_path: str
    metadata: dict[str, Any] = field(hash=False)
    acl: str
    callback: str
    message: str
    results: dict[str, Any] = field(hash=False)
    created: str  # "YYYY-MM-DD HH:MM:SS", UTC
    last_updated: str
    status: int  # HTTP status of the S3 upload; 0 until there is one
    # Extras beyond the reference page.
    state: str | None = None  # queued, running, retrying, succeeded, failed, canceled
    # When a retrying request is tried next (UTC, aware); None in every other state.
    next_attempt_at: datetime | None = None
    bucket: str | None = None
    attempts: int | None = None
    bytes_done: int | None = None
    bytes_total: int | None = None
    sha256: str | None = None
    error_code: str | None = None
    callback_state: str | None = None
    callback_attempts: int | None = None
    callback_error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    @classmethod
    def from_api(cls, data: Mapping[str, Any]) -> StatusRecord:
        """Build a record from one entry of ``aws.status`` (or a callback body)."""
        known = {f.name for f in fields(cls)} - {"extra"}
        return cls(
            id=_as_int(data.get("id"), 0) or 0,
            cdn_id=_as_int(data.get("cdn_id"), 0) or 0,
            path=_as_str(data.get("path")),
            destination_path=_as_str(data.get("destination_path")),
            metadata=_as_mapping(data.get("metadata")),
            acl=_as_str(data.get("acl")),
            callback=_as_str(data.get("callback")),
            message=_as_str(data.get("message")),
            results=_as_mapping(data.get("results")),
            created=_as_str(data.get("created")),
            last_updated=_as_str(data.get("last_updated")),
            status=_as_int(data.get("status"), 0) or 0,
            state=_opt_str(data.get("state")),
            next_attempt_at=_as_time(data.get("next_attempt_at")),
            bucket=_opt_str(data.get("bucket")),
            attempts=_as_int(data.get("attempts")),
            bytes_done=_as_int(data.get("bytes_done")),
            bytes_total=_as_int(data.get("bytes_total")),
            sha256=_opt_str(data.get("sha256")),
            error_code=_opt_str(data.get("error_code")),
            callback_state=_opt_str(data.get("callback_state")),
            callback_attempts=_as_int(data.get("callback_attempts")),
            callback_error=_opt_str(data.get("callback_error")),
            extra={k: v for k, v in data.items() if k not in known},
        )

    def to_dict(self) -> dict[str, Any]:
        """The record as a JSON-ready dict: every field (extras the server did not send are
        ``None``), then the fields this client does not know."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        # As vodpush writes it: the time, or "" when not retrying (None: a server without
        # the extras).
        if self.next_attempt_at is not None:
            out["next_attempt_at"] = format_time(self.next_attempt_at.replace(tzinfo=None))
        elif self.state is not None:
            out["next_attempt_at"] = ""
        out.update(self.extra)
        return out

    @property
    def retrying(self) -> bool:
        """Waiting for its next attempt (at ``next_attempt_at``) after a failure that may
        pass; ``last_error`` says what it was."""
        return self.state == "retrying"

    @property
    def last_error(self) -> str | None:
        """What went wrong: the cause of the coming retry, or the failure; None when
        nothing did (so far)."""
        if self.retrying:
            return retry_cause(self.message) or self.message
        return self.message if self.failed else None

    @property
    def succeeded(self) -> bool:
        if self.state is not None:
            return self.state == "succeeded"
        return self.message == SUCCESS_MESSAGE

    @property
    def failed(self) -> bool:
        if self.state is not None:
            return self.state == "failed"
        # Without the state extra, an error status from S3 is the only sure sign.
        return self.status >= 300

    @property
    def finished(self) -> bool:
        return self.succeeded or self.failed


# -- the client ---------------------------------------------------------------------------


def _endpoint(url: str) -> str:
    """A bare server URL means its ``/stable/`` endpoint; any other path is used as given."""
    parsed = httpx.URL(url)
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError(f"url must be an http(s) URL, got {url!r}")
    if parsed.path in ("", "/"):
        parsed = parsed.copy_with(path="/stable/")
    return str(parsed)


def _user_agent() -> str:
    try:
        return f"vodpush-client/{_dist.version('vodpush')}"
    except _dist.PackageNotFoundError:
        return "vodpush-client"


class Client:
    """A signed-request client for one account (``cdn``, ``api_key``, ``api_secret``).

    ``timeout`` (seconds) bounds each step of an HTTP attempt: connecting, sending, and each
    wait for response bytes. ``retries`` is how many times a failed attempt is repeated when
    that is safe, after ``backoff``, ``2*backoff``, ... seconds (at most 5 s).
    ``transport`` replaces the network (an ``httpx.MockTransport`` in tests).
    """

    def __init__(
        self,
        url: str,
        cdn: int,
        api_key: str,
        api_secret: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        retries: int = DEFAULT_RETRIES,
        backoff: float = 0.25,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not api_key or not api_secret:
            raise ValueError("api_key and api_secret are required")
        if retries < 0 or backoff < 0 or timeout <= 0:
            raise ValueError("retries and backoff must be >= 0, timeout > 0")
        self.url = _endpoint(url)
        self.cdn = int(cdn)
        self.api_key = api_key
        self._secret = api_secret
        self._retries = retries
        self._backoff = backoff
        self._sleep = sleep
        self._clock = clock
        self._http = httpx.Client(
            timeout=httpx.Timeout(timeout),
            transport=transport,
            headers={"User-Agent": _user_agent()},
            follow_redirects=False,
        )

    def __repr__(self) -> str:
        # Never show the secret.
        return f"Client(url={self.url!r}, cdn={self.cdn}, api_key={self.api_key!r})"

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- commands -------------------------------------------------------------------------

    def upload(
        self,
        path: str,
        destination_path: str,
        bucket: str,
        acl: str,
        metadata: Mapping[str, Any] | None = None,
        callback: str = "",
    ) -> int:
        """Queue ``path`` (``sestore<N>/<user>/...``) for upload to ``bucket`` as
        ``destination_path``; returns the request id."""
        fields_: dict[str, Any] = {
            "path": path,
            "destination_path": destination_path,
            "bucket": bucket,
            "acl": acl,
            "callback": callback,
        }
        if metadata is not None:
            fields_["metadata"] = dict(metadata)
        data = self._call("aws.upload", fields_, resend_same_body=True)
        request_id = _as_int(data.get("id")) if isinstance(data, Mapping) else None
        if request_id is None:
            raise TransportError(f"aws.upload answered without an id: {data!r}")
        return request_id

    def status(self, limit: int = 25, offset: int = 0, id: int | None = None) -> list[StatusRecord]:
        """One page of the account's requests, newest first (or just request ``id``)."""
        fields_: dict[str, Any] = {"limit": limit, "offset": offset}
        if id is not None:
            fields_["id"] = id
        data = self._call("aws.status", fields_, resend_same_body=False)
        if not isinstance(data, list):
            raise TransportError(f"aws.status answered {type(data).__name__}, not a list")
        return [StatusRecord.from_api(entry) for entry in data if isinstance(entry, Mapping)]

    def get(self, id: int) -> StatusRecord:
        """Request ``id``; :class:`RequestNotFound` when the account has no such request."""
        for record in self.status(limit=1, id=id):
            if record.id == id:
                return record
        raise RequestNotFound(id)

    def iter_status(self, page_size: int = 100) -> Iterator[StatusRecord]:
        """Every request of the account, newest first, fetched ``page_size`` at a time.

        Requests queued while paging push older ones to later offsets; a record is yielded
        only if its id is below the last one yielded, so none comes twice.
        """
        if page_size < 1:
            raise ValueError("page_size must be at least 1")
        offset = 0
        last_id: int | None = None
        while True:
            page = self.status(limit=page_size, offset=offset)
            for record in page:
                if last_id is None or record.id < last_id:
                    last_id = record.id
                    yield record
            if len(page) < page_size:
                return
            offset += len(page)

    # -- the wire -------------------------------------------------------------------------

    def _sign(self, command: str, fields_: Mapping[str, Any]) -> tuple[str, float]:
        signed_at = self._clock()
        payload = {
            "command": command,
            "api_key": self.api_key,
            "timestamp": int(signed_at),
            "cdn": self.cdn,
            **fields_,
        }
        return sign_request(payload, self._secret), signed_at

    def _call(self, command: str, fields_: Mapping[str, Any], *, resend_same_body: bool) -> Any:
        """Send one command, retrying where safe; the ``data`` of a success.

        With ``resend_same_body`` the body is signed once and every retry sends those exact
        bytes (the server deduplicates by signature). Otherwise (read-only commands) each
        attempt is signed afresh, so a slow retry never carries a stale timestamp.
        """
        body, signed_at = self._sign(command, fields_)
        attempt = 0
        while True:
            try:
                return self._send(body)
            except _Retryable as exc:
                attempt += 1
                too_old = resend_same_body and (self._clock() - signed_at > _UPLOAD_RESEND_HORIZON)
                if attempt > self._retries or too_old:
                    raise exc.error from exc.__cause__
                self._sleep(min(self._backoff * 2 ** (attempt - 1), 5.0))
                if not resend_same_body:
                    body, signed_at = self._sign(command, fields_)

    def _send(self, body: str) -> Any:
        try:
            response = self._http.post(self.url, data={"json": body})
        except httpx.TimeoutException as exc:
            raise _Retryable(TransportError(f"timed out talking to {self.url}: {exc}")) from exc
        except (httpx.NetworkError, httpx.RemoteProtocolError) as exc:
            # Refused, reset or cut off: may well work on the next try.
            raise _Retryable(TransportError(f"cannot reach {self.url}: {exc}")) from exc
        except httpx.TransportError as exc:
            # A bad proxy setting or URL: trying again cannot help.
            raise TransportError(f"cannot talk to {self.url}: {exc}") from exc
        if response.status_code != 200:
            error = TransportError(
                f"HTTP {response.status_code} from {self.url}: {_snippet(response)}",
                status_code=response.status_code,
            )
            if response.status_code in _RETRYABLE_HTTP or response.status_code >= 500:
                raise _Retryable(error)
            raise error
        try:
            envelope = response.json()
        except ValueError:
            envelope = None
        if not isinstance(envelope, dict) or envelope.get("status") not in ("success", "failure"):
            raise TransportError(
                f"{self.url} did not answer with an API envelope: {_snippet(response)}",
                status_code=200,
            )
        if envelope["status"] == "failure":
            error = ApiError(
                _as_str(envelope.get("code")) or "????", _as_str(envelope.get("message"))
            )
            if error.code == _BUSY_CODE:  # refused before doing anything: safe to repeat
                raise _Retryable(error)
            raise error
        return envelope.get("data")


class _Retryable(Exception):
    """Carries the error to raise if no retry is left."""

    def __init__(self, error: ClientError) -> None:
        super().__init__(str(error))
        self.error = error


def _snippet(response: httpx.Response) -> str:
    text = response.text.strip().replace("\n", " ")
    try:
        message = response.json().get("message")
    except (ValueError, AttributeError):
        message = None
    if isinstance(message, str) and message:
        return message
    return text[:200] or "(empty body)"
