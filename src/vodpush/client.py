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

Retries are limited to what cannot do harm: ``aws.status`` and ``aws.callbacks`` only read,
so they are retried on connection trouble, timeouts and HTTP 5xx. ``aws.upload`` and
``aws.redeliver`` are retried only by resending the *same signed body*: the server recognises
a signature it has already accepted and answers as it did the first time, so a lost answer
never queues a second upload or a second redelivery. The body is never re-signed, since a
fresh signature would be a new request. ``aws.cancel`` and ``aws.retry`` are tried again
only when the server surely did nothing (no connection could be made, or it answered
"busy", code 1000): a second cancel of a request the first one canceled would be refused,
hiding that the first worked.
"""

from __future__ import annotations

import json
import os
import time
import unicodedata
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from importlib import metadata as _dist
from typing import Any
from urllib.parse import quote

import httpx

from vodpush.core.records import SUCCESS_MESSAGE, format_time, parse_time, retry_cause
from vodpush.protocol.signing import sign_request
from vodpush.webhooks import WebhookVerificationError
from vodpush.webhooks import verify as verify_callback

__all__ = [
    "DEFAULT_TIMEOUT",
    "ApiError",
    "ApiWarning",
    "CallbackAttempt",
    "CallbackHistory",
    "Client",
    "ClientError",
    "FiltersUnsupported",
    "Redelivery",
    "RequestNotFound",
    "StatusPage",
    "StatusRecord",
    "TransportError",
    "WebhookVerificationError",
    "disposition_header",
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
_MAX_BACKOFF = 5.0  # seconds


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


class ApiWarning(UserWarning):
    """The server named fields of a request that it ignored (its ``warnings``). Also
    kept in ``Client.last_warnings`` and ``StatusPage.warnings``."""


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
    # The object options the request set (content_type, storage_class, tags, ...); None
    # when it set none (the server then sends no "options").
    options: dict[str, Any] | None = field(default=None, hash=False)
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
            options=dict(options) if isinstance(options := data.get("options"), Mapping) else None,
            extra={k: v for k, v in data.items() if k not in known},
        )

    def to_dict(self) -> dict[str, Any]:
        """The record as a JSON-ready dict: every field (extras the server did not send are
        ``None``; ``options`` only when set, as the server sends it), then the fields this
        client does not know."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        if out["options"] is None:
            del out["options"]
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
    def canceled(self) -> bool:
        return self.state == "canceled"

    @property
    def finished(self) -> bool:
        return self.succeeded or self.failed or self.canceled


@dataclass(frozen=True)
class CallbackAttempt:
    """One POST of a callback, as ``aws.callbacks`` lists it."""

    at: str  # "YYYY-MM-DD HH:MM:SS", UTC
    ok: bool
    http_status: int | None  # the receiver's answer; None when none came
    error: str | None
    duration: float | None  # seconds

    @classmethod
    def from_api(cls, data: Mapping[str, Any]) -> CallbackAttempt:
        duration = data.get("duration")
        return cls(
            at=_as_str(data.get("at")),
            ok=data.get("ok") is True,
            http_status=_as_int(data.get("http_status")),
            error=_opt_str(data.get("error")),
            duration=float(duration)
            if isinstance(duration, int | float) and not isinstance(duration, bool)
            else None,
        )


@dataclass(frozen=True)
class CallbackHistory:
    """A request's callback as ``aws.callbacks`` reports it: where it stands and its
    newest attempts (newest first; ``total`` counts them all)."""

    id: int
    state: str  # the request's
    callback: str
    callback_state: str  # none, pending, delivered, failed
    callback_attempts: int  # of the current delivery (a redelivery starts again at 0)
    next_attempt_at: str  # while pending, else ""
    webhook_id: str | None  # of the current delivery
    callback_error: str | None
    redeliveries: int
    last_redelivered: str  # "" if never
    total: int
    attempts: tuple[CallbackAttempt, ...] = field(default=(), hash=False)

    @classmethod
    def from_api(cls, data: Mapping[str, Any]) -> CallbackHistory:
        attempts = data.get("attempts")
        return cls(
            id=_as_int(data.get("id"), 0) or 0,
            state=_as_str(data.get("state")),
            callback=_as_str(data.get("callback")),
            callback_state=_as_str(data.get("callback_state")),
            callback_attempts=_as_int(data.get("callback_attempts"), 0) or 0,
            next_attempt_at=_as_str(data.get("next_attempt_at")),
            webhook_id=_opt_str(data.get("webhook_id")),
            callback_error=_opt_str(data.get("callback_error")),
            redeliveries=_as_int(data.get("redeliveries"), 0) or 0,
            last_redelivered=_as_str(data.get("last_redelivered")),
            total=_as_int(data.get("total"), 0) or 0,
            attempts=tuple(
                CallbackAttempt.from_api(a)
                for a in (attempts if isinstance(attempts, list) else [])
                if isinstance(a, Mapping)
            ),
        )

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["attempts"] = [dict(vars(a)) for a in self.attempts]
        return out


@dataclass(frozen=True)
class Redelivery:
    """What ``aws.redeliver`` answered: the delivery now under way."""

    id: int
    callback_state: str  # "pending" (or, for a repeat of the same request, where it is now)
    webhook_id: str | None  # a new one: receivers see a new message
    next_attempt_at: str

    @classmethod
    def from_api(cls, data: Mapping[str, Any]) -> Redelivery:
        return cls(
            id=_as_int(data.get("id"), 0) or 0,
            callback_state=_as_str(data.get("callback_state")),
            webhook_id=_opt_str(data.get("webhook_id")),
            next_attempt_at=_as_str(data.get("next_attempt_at")),
        )


# -- object options -----------------------------------------------------------------------


def disposition_header(filename: str, *, inline: bool = False) -> str:
    """A Content-Disposition value (for ``upload(content_disposition=...)``) naming
    ``filename``, which may hold any Unicode text: as RFC 6266 says, an ASCII
    ``filename="..."`` for old browsers and, when the name is not plain ASCII, the exact name
    as ``filename*=UTF-8''<percent-encoded>``, which browsers prefer."""
    kind = "inline" if inline else "attachment"

    def plain(char: str) -> bool:
        return " " <= char <= "~" and char not in '"\\'

    if all(plain(char) for char in filename):
        return f'{kind}; filename="{filename}"'

    def folded(char: str) -> str:
        # Accents dropped (é -> e); anything else that cannot be sent becomes "_".
        ascii_ = unicodedata.normalize("NFKD", char).encode("ascii", "ignore").decode("ascii")
        return ascii_ if ascii_ and all(plain(c) for c in ascii_) else "_"

    fallback = "".join(char if plain(char) else folded(char) for char in filename)
    return f"{kind}; filename=\"{fallback}\"; filename*=UTF-8''{quote(filename, safe='')}"


class StatusPage(list[StatusRecord]):
    """One page of ``aws.status``: a list of records, and what the answer said beside
    them. ``total`` is how many requests the filters match in all (None when no filter
    and no ``after_id`` was sent: the reference API has no total); ``warnings`` the
    fields the server ignored."""

    def __init__(
        self,
        records: Iterable[StatusRecord] = (),
        *,
        total: int | None = None,
        warnings: Iterable[str] = (),
    ) -> None:
        super().__init__(records)
        self.total = total
        self.warnings = list(warnings)

    def __repr__(self) -> str:
        return f"StatusPage({list.__repr__(self)}, total={self.total!r})"


# The time format of the records' `created`, and of created_from/created_to.
_TIME_FORMAT = "%Y-%m-%d %H:%M:%S"


def _time_field(value: datetime | str | int, name: str) -> str | int:
    """A time for created_from/created_to: a datetime (naive means UTC; to the second),
    'YYYY-MM-DD HH:MM:SS' (UTC) as it is, or unix seconds."""
    if isinstance(value, datetime):
        if value.tzinfo is not None:
            value = value.astimezone(UTC).replace(tzinfo=None)
        return value.strftime(_TIME_FORMAT)
    if isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    raise TypeError(f"{name} must be a datetime, a str or an int, not {type(value).__name__}")


def _filter_fields(
    *,
    state: str | Iterable[str] | None,
    created_from: datetime | str | int | None,
    created_to: datetime | str | int | None,
    bucket: str | None,
    path_prefix: str | None,
    after_id: int | None,
) -> dict[str, Any]:
    """The aws.status fields of the filters given (None: not sent)."""
    sent: dict[str, Any] = {}
    if state is not None:
        sent["state"] = state if isinstance(state, str) else list(state)
    if created_from is not None:
        sent["created_from"] = _time_field(created_from, "created_from")
    if created_to is not None:
        sent["created_to"] = _time_field(created_to, "created_to")
    if bucket is not None:
        sent["bucket"] = bucket
    if path_prefix is not None:
        sent["path_prefix"] = path_prefix
    if after_id is not None:
        sent["after_id"] = after_id
    return sent


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
        # The `warnings` of the last answer: fields the server ignored.
        self.last_warnings: list[str] = []

    @classmethod
    def from_env(cls, **kwargs: Any) -> Client:
        """A client configured like boto3, from the environment: ``VODPUSH_URL``,
        ``VODPUSH_CDN``, ``VODPUSH_API_KEY``, ``VODPUSH_API_SECRET`` (keyword arguments
        win: ``url``, ``cdn``, ``api_key``, ``api_secret``, and the options of ``Client``).
        ValueError names what is missing."""
        values: dict[str, Any] = {}
        missing = []
        for name in ("url", "cdn", "api_key", "api_secret"):
            variable = f"VODPUSH_{name.upper()}"
            value = kwargs.pop(name, None) or os.environ.get(variable)
            if not value:
                missing.append(variable)
            values[name] = value
        if missing:
            raise ValueError(f"set {', '.join(missing)} (or pass them to Client.from_env)")
        try:
            values["cdn"] = int(values["cdn"])
        except ValueError:
            raise ValueError(f"VODPUSH_CDN must be a number, not {values['cdn']!r}") from None
        return cls(**values, **kwargs)

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
        *,
        idempotency_key: str | None = None,
        content_type: str | None = None,
        storage_class: str | None = None,
        tags: Mapping[str, Any] | None = None,
        cache_control: str | None = None,
        content_disposition: str | None = None,
        preflight: bool = False,
    ) -> int:
        """Queue ``path`` (``sestore<N>/<user>/...``) for upload to ``bucket`` as
        ``destination_path``; returns the request id. ``acl`` is ``private``,
        ``public-read`` or ``bucket-default``; the keyword options are sent only when given
        (see the API documentation of aws.upload).

        With an ``idempotency_key`` the same upload submitted again within 24 h answers the
        first request's id, so a retry may be signed afresh: this client then keeps
        retrying a lost answer past the 60 s in which it otherwise only resends the same
        signed body.

        With ``preflight`` the server first checks the bucket would take the upload
        (ApiError code 0008 naming the cause if not; nothing is queued then)."""
        fields_: dict[str, Any] = {
            "path": path,
            "destination_path": destination_path,
            "bucket": bucket,
            "acl": acl,
            "callback": callback,
        }
        if metadata is not None:
            fields_["metadata"] = dict(metadata)
        optional = {
            "content_type": content_type,
            "storage_class": storage_class,
            "tags": dict(tags) if tags is not None else None,
            "cache_control": cache_control,
            "content_disposition": content_disposition,
            "idempotency_key": idempotency_key,
        }
        fields_.update({name: value for name, value in optional.items() if value is not None})
        if preflight:  # only when asked: a server without it would warn of the field
            fields_["preflight"] = True
        data = self._call(
            "aws.upload",
            fields_,
            resend_same_body=True,
            resign_when_old=idempotency_key is not None,
        )
        request_id = _as_int(data.get("id")) if isinstance(data, Mapping) else None
        if request_id is None:
            raise TransportError(f"aws.upload answered without an id: {data!r}")
        return request_id

    def status(
        self,
        limit: int = 25,
        offset: int = 0,
        id: int | None = None,
        *,
        state: str | Iterable[str] | None = None,
        created_from: datetime | str | int | None = None,
        created_to: datetime | str | int | None = None,
        bucket: str | None = None,
        path_prefix: str | None = None,
        after_id: int | None = None,
    ) -> StatusPage:
        """One page of the account's requests, newest first (or just request ``id``).

        The filters (all of them together): ``state``, one or a list of queued, running,
        retrying, succeeded, failed, canceled; ``created_from`` and ``created_to``, both
        inclusive, to the second (datetimes, naive meaning UTC; 'YYYY-MM-DD HH:MM:SS' UTC;
        or unix seconds); ``bucket``; ``path_prefix``, the start of the source path,
        exactly. ``after_id`` continues a listing below the last id of a page (keyset
        paging; ``offset`` must then be 0). With any of these the page has its ``total``;
        a server that ignores them raises FiltersUnsupported.
        """
        extended = _filter_fields(
            state=state,
            created_from=created_from,
            created_to=created_to,
            bucket=bucket,
            path_prefix=path_prefix,
            after_id=after_id,
        )
        fields_: dict[str, Any] = {"limit": limit, "offset": offset}
        if id is not None:
            fields_["id"] = id
        fields_.update(extended)
        answer = self._call_envelope("aws.status", fields_, resend_same_body=False)
        data = answer.get("data")
        if not isinstance(data, list):
            raise TransportError(f"aws.status answered {type(data).__name__}, not a list")
        total = _as_int(answer.get("total"))
        if extended and total is None:
            raise FiltersUnsupported(self.url, extended)
        return StatusPage(
            (StatusRecord.from_api(entry) for entry in data if isinstance(entry, Mapping)),
            total=total,
            warnings=self.last_warnings,
        )

    def cancel(self, id: int) -> StatusRecord:
        """``aws.cancel``: stop request ``id`` (queued, running or retrying); its record,
        now ``canceled``. :class:`ApiError` (code 0007) when the account has no such
        request, or it has finished or is finishing."""
        return self._change("aws.cancel", id)

    def retry(self, id: int) -> StatusRecord:
        """``aws.retry``: queue request ``id`` (failed or canceled) again; its record, now
        ``queued`` with its attempts from 0. :class:`ApiError` (code 0007) when the
        account has no such request, or it is not failed or canceled."""
        return self._change("aws.retry", id)

    def _change(self, command: str, id: int) -> StatusRecord:
        data = self._call(command, {"id": id}, resend_same_body=False, repeatable=False)
        if not isinstance(data, Mapping):
            raise TransportError(f"{command} answered {type(data).__name__}, not a record")
        return StatusRecord.from_api(data)

    def get(self, id: int) -> StatusRecord:
        """Request ``id``; :class:`RequestNotFound` when the account has no such request."""
        for record in self.status(limit=1, id=id):
            if record.id == id:
                return record
        raise RequestNotFound(id)

    def callbacks(self, id: int) -> CallbackHistory:
        """The callback of request ``id``: its state and its newest delivery attempts
        (``aws.callbacks``). An id the account does not have is an :class:`ApiError`
        (code 0007, "no such request")."""
        data = self._call("aws.callbacks", {"id": id}, resend_same_body=False)
        if not isinstance(data, Mapping):
            raise TransportError(f"aws.callbacks answered {type(data).__name__}, not an object")
        return CallbackHistory.from_api(data)

    def redeliver(self, id: int) -> Redelivery:
        """Send the callback of finished request ``id`` again, as a new message (a new
        webhook-id) due now (``aws.redeliver``). Refused with an :class:`ApiError`: 0007 for
        a request that is not finished, has no callback or a delivery pending; 1000 past
        the server's redeliveries per hour."""
        data = self._call("aws.redeliver", {"id": id}, resend_same_body=True)
        if not isinstance(data, Mapping):
            raise TransportError(f"aws.redeliver answered {type(data).__name__}, not an object")
        return Redelivery.from_api(data)

    def iter_status(
        self,
        page_size: int = 100,
        *,
        state: str | Iterable[str] | None = None,
        created_from: datetime | str | int | None = None,
        created_to: datetime | str | int | None = None,
        bucket: str | None = None,
        path_prefix: str | None = None,
    ) -> Iterator[StatusRecord]:
        """Every request of the account that the filters match (see ``status``), newest
        first, fetched ``page_size`` at a time.

        Each page continues below the last id of the one before (``after_id``), so
        requests queued meanwhile neither repeat nor push others out, and a page deep in
        the list costs what the first does. A server without ``after_id`` is paged by
        offset instead (then filters cannot be asked for).
        """
        if page_size < 1:
            raise ValueError("page_size must be at least 1")
        filters: dict[str, Any] = {
            "state": state,
            "created_from": created_from,
            "created_to": created_to,
            "bucket": bucket,
            "path_prefix": path_prefix,
        }
        after_id: int | None = None
        yielded = 0
        while True:
            try:
                page = self.status(limit=page_size, after_id=after_id, **filters)
            except FiltersUnsupported:
                if after_id is None or any(v is not None for v in filters.values()):
                    raise
                yield from self._iter_by_offset(page_size, offset=yielded, below=after_id)
                return
            for record in page:
                if after_id is None or record.id < after_id:
                    after_id = record.id
                    yielded += 1
                    yield record
            if len(page) < page_size:
                return

    def _iter_by_offset(self, page_size: int, *, offset: int, below: int) -> Iterator[StatusRecord]:
        """The requests below id ``below``, from ``offset`` on, by offset paging (a server
        without after_id). Requests queued meanwhile push older ones to later offsets; a
        record is yielded only if its id is below the last one yielded, so none comes
        twice."""
        last_id = below
        while True:
            page = self.status(limit=page_size, offset=offset)
            for record in page:
                if record.id < last_id:
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

    def _call(
        self,
        command: str,
        fields_: Mapping[str, Any],
        *,
        resend_same_body: bool,
        resign_when_old: bool = False,
        repeatable: bool = True,
    ) -> Any:
        """Send one command, retrying where safe; the ``data`` of a success.

        With ``resend_same_body`` the body is signed once and every retry sends those exact
        bytes (the server deduplicates by signature) while it is young enough; past that,
        ``resign_when_old`` (an upload with an idempotency key, which the server
        deduplicates by key) signs it afresh, else the retries end. Otherwise (read-only
        commands) each attempt is signed afresh, so a slow retry never carries a stale
        timestamp. Without ``repeatable`` a failed attempt is tried again only if the
        server surely did not run it.
        """
        return self._call_envelope(
            command,
            fields_,
            resend_same_body=resend_same_body,
            resign_when_old=resign_when_old,
            repeatable=repeatable,
        ).get("data")

    def _call_envelope(
        self,
        command: str,
        fields_: Mapping[str, Any],
        *,
        resend_same_body: bool,
        resign_when_old: bool = False,
        repeatable: bool = True,
    ) -> dict[str, Any]:
        """``_call``, returning the whole envelope of the success."""
        body, signed_at = self._sign(command, fields_)
        attempt = 0
        while True:
            try:
                return self._send(body)
            except _Retryable as exc:
                attempt += 1
                too_old = resend_same_body and (self._clock() - signed_at > _UPLOAD_RESEND_HORIZON)
                if (
                    attempt > self._retries
                    or (too_old and not resign_when_old)
                    or not (repeatable or exc.unprocessed)
                ):
                    raise exc.error from exc.__cause__
                self._sleep(min(self._backoff * 2 ** (attempt - 1), _MAX_BACKOFF))
                if not resend_same_body or too_old:
                    body, signed_at = self._sign(command, fields_)

    def _send(self, body: str) -> dict[str, Any]:
        try:
            response = self._http.post(self.url, data={"json": body})
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            # No connection: the request never reached the server.
            error = TransportError(f"cannot reach {self.url}: {exc}")
            raise _Retryable(error, unprocessed=True) from exc
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
        self._note_warnings(envelope.get("warnings"))
        if envelope["status"] == "failure":
            error = ApiError(
                _as_str(envelope.get("code")) or "????", _as_str(envelope.get("message"))
            )
            if error.code == _BUSY_CODE and _soon(envelope.get("retry_after")):
                # refused before doing anything: safe to repeat
                raise _Retryable(error, unprocessed=True)
            raise error
        return envelope

    def _note_warnings(self, sent: Any) -> None:
        """Keep the answer's warnings (strings only), and raise them as ApiWarning."""
        self.last_warnings = (
            [str(w) for w in sent if isinstance(w, str)] if isinstance(sent, list) else []
        )
        for warning in self.last_warnings:
            warnings.warn(f"{self.url}: {warning}", ApiWarning, stacklevel=5)


def _soon(retry_after: Any) -> bool:
    """Whether a busy answer is worth the quick retries here: no ``retry_after`` given,
    or one within the longest backoff (a limit of an hour, such as aws.redeliver's, is not
    waited out in a call)."""
    if isinstance(retry_after, bool) or not isinstance(retry_after, int | float):
        return True
    return retry_after <= _MAX_BACKOFF


class _Retryable(Exception):
    """Carries the error to raise if no retry is left."""

    def __init__(self, error: ClientError, *, unprocessed: bool = False) -> None:
        super().__init__(str(error))
        self.error = error
        # The server surely did not run the command (no connection, or "busy").
        self.unprocessed = unprocessed


def _snippet(response: httpx.Response) -> str:
    text = response.text.strip().replace("\n", " ")
    try:
        message = response.json().get("message")
    except (ValueError, AttributeError):
        message = None
    if isinstance(message, str) and message:
        return message
    return text[:200] or "(empty body)"
