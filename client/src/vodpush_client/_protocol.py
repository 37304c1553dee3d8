"""What the sync and the async client share, without any I/O: the requests each command
sends, how an answer is read, when a failed attempt may be repeated, how listings page and
how long ``wait()`` pauses. ``Client`` and ``AsyncClient`` only add the sending.

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

import math
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Generic, Self, TypeVar

import httpx

from vodpush_client._version import __version__
from vodpush_client.config import client_arguments
from vodpush_client.errors import (
    ApiError,
    ApiWarning,
    ClientError,
    FiltersUnsupported,
    RequestNotFound,
    TransportError,
    WaitTimeout,
)
from vodpush_client.records import (
    TIME_FORMAT,
    CallbackHistory,
    Redelivery,
    StatusPage,
    StatusRecord,
    _as_int,
    _as_str,
)
from vodpush_client.signing import sign_request

DEFAULT_TIMEOUT = 10.0
DEFAULT_RETRIES = 2
DEFAULT_WAIT_INTERVAL = 1.0  # seconds between two polls of wait()
# An upload is only resent while its timestamp is well inside the server's replay window
# (±300 s by default): past the window the server no longer recognises the signature, and the
# resend would be refused with 0002 although the first one may have been queued.
UPLOAD_RESEND_HORIZON = 60.0
# HTTP statuses a proxy or an overloaded server answers before any command ran.
_RETRYABLE_HTTP = frozenset({429, 502, 503, 504})
_BUSY_CODE = "1000"
MAX_BACKOFF = 5.0  # seconds
USER_AGENT = f"vodpush-client/{__version__}"

T = TypeVar("T")


class Retryable(Exception):
    """Carries the error to raise if no retry is left."""

    def __init__(self, error: ClientError, *, unprocessed: bool = False) -> None:
        super().__init__(str(error))
        self.error = error
        # The server surely did not run the command (no connection, or "busy").
        self.unprocessed = unprocessed


@dataclass(frozen=True)
class Call(Generic[T]):
    """One command to send: its fields, how it may be retried, and how its successful
    envelope becomes the method's result."""

    command: str
    fields: Mapping[str, Any]
    parse: Callable[[dict[str, Any]], T]
    # Every retry sends the same signed bytes (the server deduplicates by signature).
    resend_same_body: bool = False
    # Once too old to resend, sign it afresh (an upload the server deduplicates by key).
    resign_when_old: bool = False
    # Without it, tried again only when the server surely did not run it.
    repeatable: bool = True


# -- the fields of the commands -----------------------------------------------------------


def endpoint(url: str) -> str:
    """A bare server URL means its ``/stable/`` endpoint; any other path is used as given."""
    parsed = httpx.URL(url)
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError(f"url must be an http(s) URL, got {url!r}")
    if parsed.path in ("", "/"):
        parsed = parsed.copy_with(path="/stable/")
    return str(parsed)


def _time_field(value: datetime | str | int, name: str) -> str | int:
    """A time for created_from/created_to: a datetime (naive means UTC; to the second),
    'YYYY-MM-DD HH:MM:SS' (UTC) as it is, or unix seconds."""
    if isinstance(value, datetime):
        if value.tzinfo is not None:
            value = value.astimezone(UTC).replace(tzinfo=None)
        return value.strftime(TIME_FORMAT)
    if isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    raise TypeError(f"{name} must be a datetime, a str or an int, not {type(value).__name__}")


def filter_fields(
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


def upload_call(
    path: str,
    destination_path: str,
    bucket: str,
    acl: str,
    metadata: Mapping[str, Any] | None,
    callback: str,
    *,
    idempotency_key: str | None,
    content_type: str | None,
    storage_class: str | None,
    tags: Mapping[str, Any] | None,
    cache_control: str | None,
    content_disposition: str | None,
    preflight: bool,
) -> Call[int]:
    fields: dict[str, Any] = {
        "path": path,
        "destination_path": destination_path,
        "bucket": bucket,
        "acl": acl,
        "callback": callback,
    }
    if metadata is not None:
        fields["metadata"] = dict(metadata)
    optional = {
        "content_type": content_type,
        "storage_class": storage_class,
        "tags": dict(tags) if tags is not None else None,
        "cache_control": cache_control,
        "content_disposition": content_disposition,
        "idempotency_key": idempotency_key,
    }
    fields.update({name: value for name, value in optional.items() if value is not None})
    if preflight:  # only when asked: a server without it would warn of the field
        fields["preflight"] = True

    def parse(envelope: dict[str, Any]) -> int:
        data = envelope.get("data")
        request_id = _as_int(data.get("id")) if isinstance(data, Mapping) else None
        if request_id is None:
            raise TransportError(f"aws.upload answered without an id: {data!r}")
        return request_id

    return Call(
        "aws.upload",
        fields,
        parse,
        resend_same_body=True,
        resign_when_old=idempotency_key is not None,
    )


def status_call(
    url: str,
    limit: int,
    offset: int,
    id: int | None,
    filters: Mapping[str, Any],
) -> Call[StatusPage]:
    """``filters`` as filter_fields gives them; with any, an answer without ``total``
    (a server that ignored them) raises FiltersUnsupported."""
    fields: dict[str, Any] = {"limit": limit, "offset": offset}
    if id is not None:
        fields["id"] = id
    fields.update(filters)

    def parse(envelope: dict[str, Any]) -> StatusPage:
        data = envelope.get("data")
        if not isinstance(data, list):
            raise TransportError(f"aws.status answered {type(data).__name__}, not a list")
        total = _as_int(envelope.get("total"))
        if filters and total is None:
            raise FiltersUnsupported(url, filters)
        return StatusPage(
            (StatusRecord.from_api(entry) for entry in data if isinstance(entry, Mapping)),
            total=total,
            warnings=answer_warnings(envelope),
        )

    return Call("aws.status", fields, parse)


def found(page: Iterable[StatusRecord], id: int) -> StatusRecord:
    """Request ``id`` of a page of ``status(id=id)``; RequestNotFound when it is not there."""
    for record in page:
        if record.id == id:
            return record
    raise RequestNotFound(id)


def _object(command: str, make: Callable[[Mapping[str, Any]], T]) -> Callable[[dict], T]:
    def parse(envelope: dict[str, Any]) -> T:
        data = envelope.get("data")
        if not isinstance(data, Mapping):
            raise TransportError(f"{command} answered {type(data).__name__}, not an object")
        return make(data)

    return parse


def change_call(command: str, id: int) -> Call[StatusRecord]:
    """aws.cancel or aws.retry of request ``id``."""
    parse = _object(command, StatusRecord.from_api)
    return Call(command, {"id": id}, parse, repeatable=False)


def callbacks_call(id: int) -> Call[CallbackHistory]:
    return Call("aws.callbacks", {"id": id}, _object("aws.callbacks", CallbackHistory.from_api))


def redeliver_call(id: int) -> Call[Redelivery]:
    parse = _object("aws.redeliver", Redelivery.from_api)
    return Call("aws.redeliver", {"id": id}, parse, resend_same_body=True)


# -- reading an answer --------------------------------------------------------------------


def answer_warnings(envelope: Mapping[str, Any]) -> list[str]:
    """The ``warnings`` of an answer: the fields the server ignored (strings only)."""
    sent = envelope.get("warnings")
    return [str(w) for w in sent if isinstance(w, str)] if isinstance(sent, list) else []


def unreachable(url: str, exc: httpx.TransportError) -> Exception:
    """The error to raise for a request that got no HTTP answer: a Retryable when another
    attempt may work."""
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
        # No connection: the request never reached the server.
        return Retryable(TransportError(f"cannot reach {url}: {exc}"), unprocessed=True)
    if isinstance(exc, httpx.TimeoutException):
        return Retryable(TransportError(f"timed out talking to {url}: {exc}"))
    if isinstance(exc, httpx.NetworkError | httpx.RemoteProtocolError):
        # Refused, reset or cut off: may well work on the next try.
        return Retryable(TransportError(f"cannot reach {url}: {exc}"))
    # A bad proxy setting or URL: trying again cannot help.
    return TransportError(f"cannot talk to {url}: {exc}")


def read_envelope(url: str, response: httpx.Response) -> dict[str, Any]:
    """The envelope of a successful answer; raises ApiError, TransportError or Retryable."""
    if response.status_code != 200:
        error = TransportError(
            f"HTTP {response.status_code} from {url}: {_snippet(response)}",
            status_code=response.status_code,
        )
        if response.status_code in _RETRYABLE_HTTP or response.status_code >= 500:
            raise Retryable(error)
        raise error
    try:
        envelope = response.json()
    except ValueError:
        envelope = None
    if not isinstance(envelope, dict) or envelope.get("status") not in ("success", "failure"):
        raise TransportError(
            f"{url} did not answer with an API envelope: {_snippet(response)}",
            status_code=200,
        )
    if envelope["status"] == "failure":
        error = ApiError(_as_str(envelope.get("code")) or "????", _as_str(envelope.get("message")))
        if error.code == _BUSY_CODE and _soon(envelope.get("retry_after")):
            # refused before doing anything: safe to repeat
            raise Retryable(error, unprocessed=True)
        raise error
    return envelope


def _soon(retry_after: Any) -> bool:
    """Whether a busy answer is worth the quick retries here: no ``retry_after`` given,
    or one within the longest backoff (a limit of an hour, such as aws.redeliver's, is not
    waited out in a call)."""
    if isinstance(retry_after, bool) or not isinstance(retry_after, int | float):
        return True
    return retry_after <= MAX_BACKOFF


def _snippet(response: httpx.Response) -> str:
    text = response.text.strip().replace("\n", " ")
    try:
        message = response.json().get("message")
    except (ValueError, AttributeError):
        message = None
    if isinstance(message, str) and message:
        return message
    return text[:200] or "(empty body)"


# -- the client's state -------------------------------------------------------------------


class ClientBase:
    """Credentials, settings and the signing of both clients."""

    def __init__(
        self,
        url: str,
        cdn: int,
        api_key: str,
        api_secret: str,
        *,
        timeout: float,
        retries: int,
        backoff: float,
        clock: Callable[[], float],
    ) -> None:
        if not api_key or not api_secret:
            raise ValueError("api_key and api_secret are required")
        if retries < 0 or backoff < 0 or not timeout > 0:
            raise ValueError("retries and backoff must be >= 0, timeout > 0")
        self.url = endpoint(url)
        self.cdn = int(cdn)
        self.api_key = api_key
        self._secret = api_secret
        self._retries = retries
        self._backoff = backoff
        self._clock = clock
        # The `warnings` of the last answer: fields the server ignored.
        self.last_warnings: list[str] = []

    @classmethod
    def from_env(cls, **kwargs: Any) -> Self:
        """A client configured like boto3, from the environment: ``VODPUSH_URL``,
        ``VODPUSH_CDN``, ``VODPUSH_API_KEY``, ``VODPUSH_API_SECRET`` and, optionally,
        ``VODPUSH_TIMEOUT`` (keyword arguments win: ``url``, ``cdn``, ``api_key``,
        ``api_secret``, ``timeout``, and the other options of the client). ValueError
        names what is missing or wrong."""
        return cls(**client_arguments(kwargs))

    def __repr__(self) -> str:
        # Never show the secret.
        return f"{type(self).__name__}(url={self.url!r}, cdn={self.cdn}, api_key={self.api_key!r})"

    @staticmethod
    def _http_options(timeout: float) -> dict[str, Any]:
        return {
            "timeout": httpx.Timeout(timeout),
            "headers": {"User-Agent": USER_AGENT},
            "follow_redirects": False,
        }

    def _sign(self, command: str, fields: Mapping[str, Any]) -> tuple[str, float]:
        signed_at = self._clock()
        payload = {
            "command": command,
            "api_key": self.api_key,
            "timestamp": int(signed_at),
            "cdn": self.cdn,
            **fields,
        }
        return sign_request(payload, self._secret), signed_at

    def _accept(self, response: httpx.Response) -> dict[str, Any]:
        """The envelope of a successful answer; its warnings kept and raised as ApiWarning."""
        envelope = read_envelope(self.url, response)
        self.last_warnings = answer_warnings(envelope)
        for warning in self.last_warnings:
            warnings.warn(f"{self.url}: {warning}", ApiWarning, stacklevel=5)
        return envelope


class Attempts:
    """The attempts of one call: the body to send, and after a failure whether and when
    the next one may go."""

    def __init__(self, client: ClientBase, call: Call[Any]) -> None:
        self._client = client
        self._call = call
        self._count = 0
        self._too_old = False
        self.body, self._signed_at = client._sign(call.command, call.fields)

    def backoff(self, failure: Retryable) -> float:
        """Seconds to wait before the next attempt; raises the failure's error when no
        attempt may follow."""
        client, call = self._client, self._call
        self._count += 1
        self._too_old = call.resend_same_body and (
            client._clock() - self._signed_at > UPLOAD_RESEND_HORIZON
        )
        if (
            self._count > client._retries
            or (self._too_old and not call.resign_when_old)
            or not (call.repeatable or failure.unprocessed)
        ):
            raise failure.error from failure.__cause__
        return min(client._backoff * 2 ** (self._count - 1), MAX_BACKOFF)

    def next_body(self) -> str:
        """The body of the next attempt, after the backoff: the same signed bytes, or
        signed afresh (read-only commands, so a slow retry never carries a stale timestamp;
        an upload with an idempotency key grown too old to resend)."""
        if not self._call.resend_same_body or self._too_old:
            self.body, self._signed_at = self._client._sign(self._call.command, self._call.fields)
        return self.body


# -- paging and waiting -------------------------------------------------------------------


class Pager:
    """iter_status without I/O: which page to ask for next, and which of its records to
    yield. Pages continue below the last id yielded (``after_id``); a server without
    after_id is paged by offset instead, yielding only ids below the last, so that
    requests queued meanwhile neither repeat nor push others out."""

    def __init__(self, page_size: int, filters: Mapping[str, Any]) -> None:
        if page_size < 1:
            raise ValueError("page_size must be at least 1")
        self._size = page_size
        self._filters = dict(filters)
        self._after_id: int | None = None
        self._yielded = 0
        self._by_offset: int | None = None  # the next offset, once paging by offset
        self._done = False

    def query(self) -> dict[str, Any] | None:
        """The arguments of the next ``status()`` call; None when the listing is done."""
        if self._done:
            return None
        if self._by_offset is not None:
            return {"limit": self._size, "offset": self._by_offset}
        return {"limit": self._size, "after_id": self._after_id, **self._filters}

    def unsupported(self, error: FiltersUnsupported) -> None:
        """The server ignored after_id: go on by offset from the records yielded so far,
        unless filters were asked for (they cannot be); else raise ``error``."""
        if self._after_id is None or any(v is not None for v in self._filters.values()):
            raise error
        self._by_offset = self._yielded

    def take(self, page: list[StatusRecord]) -> list[StatusRecord]:
        """The records of ``page`` to yield, in order."""
        new = []
        for record in page:
            if self._after_id is None or record.id < self._after_id:
                self._after_id = record.id
                new.append(record)
        self._yielded += len(new)
        if self._by_offset is not None:
            self._by_offset += len(page)
        if len(page) < self._size:
            self._done = True
        return new


class Waiter:
    """wait() without I/O: how long to pause between polls, and when it is over."""

    def __init__(
        self,
        interval: float,
        timeout: float | None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not (math.isfinite(interval) and interval > 0):
            raise ValueError("interval must be a number of seconds above 0")
        if timeout is not None and not timeout >= 0:
            raise ValueError("timeout must be None or a number of seconds >= 0")
        self._interval = interval
        self._timeout = math.inf if timeout is None else timeout
        self._clock = clock
        self._deadline = clock() + self._timeout

    def pause(self, record: StatusRecord) -> float:
        """Seconds to sleep before polling again, never past the deadline; WaitTimeout
        once it has passed."""
        left = self._deadline - self._clock()
        if left <= 0:
            raise WaitTimeout(record, self._timeout)
        return min(self._interval, left)
