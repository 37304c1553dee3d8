"""The answers of the API as typed, frozen records: times are aware UTC datetimes, numbers
are ints, and whatever a server leaves out or sends oddly reads as ``None`` rather than
failing. ``to_dict()`` gives a record back as the API writes it (times as
``YYYY-MM-DD HH:MM:SS`` text)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

__all__ = [
    "SUCCESS_MESSAGE",
    "TIME_FORMAT",
    "CallbackAttempt",
    "CallbackHistory",
    "Redelivery",
    "StatusPage",
    "StatusRecord",
    "format_time",
    "parse_time",
    "retry_cause",
]

# The reference API's words for a finished upload: what tells success without the state
# extra (the server writes the same text: vodpush.core.records.SUCCESS_MESSAGE).
SUCCESS_MESSAGE = "Successfully Uploaded to AWS"
# How the API writes a time (UTC).
TIME_FORMAT = "%Y-%m-%d %H:%M:%S"

# The API's own format, also with one-digit fields (the reference page shows "1:00:00").
_API_TIME = re.compile(r"(\d{4})-(\d{1,2})-(\d{1,2})[ T](\d{1,2}):(\d{1,2}):(\d{1,2})")
_LONGEST_TIME = 64  # an ISO 8601 time with offset and microseconds is 32 characters
# The message of a request waiting for its next attempt (vodpush.core.records
# .retrying_message): when, which attempt, then what went wrong.
_RETRYING = re.compile(r"Retrying at [^()]* UTC \(attempt \d+ of \d+\): (?P<cause>.*)", re.DOTALL)


def parse_time(value: Any) -> datetime | None:
    """A time of the API (``YYYY-MM-DD HH:MM:SS``, UTC; ISO 8601 too) as an aware UTC
    datetime; None for "" and for anything that is not a time."""
    if not isinstance(value, str) or len(value) > _LONGEST_TIME:
        return None
    text = value.strip()
    try:
        if found := _API_TIME.fullmatch(text):
            return datetime(*(int(part) for part in found.groups()), tzinfo=UTC)
        parsed = datetime.fromisoformat(text)
    except ValueError:  # "", "soon", month 13, ...
        return None
    if parsed.tzinfo is None:
        return parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


def format_time(value: datetime | None, absent: str = "") -> str:
    """A datetime as the API writes it (UTC, to the second; naive means UTC)."""
    if value is None:
        return absent
    if value.tzinfo is not None:
        value = value.astimezone(UTC)
    return value.strftime(TIME_FORMAT)


def retry_cause(message: str) -> str | None:
    """What went wrong last, from the message of a retrying request; None for another."""
    found = _RETRYING.fullmatch(message)
    return found["cause"] if found else None


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


def _as_mapping(value: Any) -> dict[str, Any]:
    """The reference page shows ``metadata`` as the string ``"{}"`` and PHP encodes an empty
    array as ``[]``: read both as an object."""
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except ValueError:
            return {}
    return dict(value) if isinstance(value, Mapping) else {}


_NOTHING: Mapping[str, Any] = MappingProxyType({})


@dataclass(frozen=True)
class StatusRecord:
    """One upload request as ``aws.status`` reports it (and as its callback's body).

    The documented fields always exist; the extras are ``None`` when a server does not send
    them, and fields this client does not know are kept in ``extra``. ``created``,
    ``last_updated`` and ``next_attempt_at`` are aware UTC datetimes (``None`` when absent
    or not a time); ``raw`` is the entry exactly as the server sent it (its time texts
    too).
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
    created: datetime | None
    last_updated: datetime | None
    status: int  # HTTP status of the S3 upload; 0 until there is one
    # Extras beyond the reference page.
    state: str | None = None  # queued, running, retrying, succeeded, failed, canceled
    # When a retrying request is tried next; None in every other state.
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
    raw: Mapping[str, Any] = field(
        default_factory=lambda: _NOTHING, hash=False, compare=False, repr=False
    )

    @classmethod
    def from_api(cls, data: Mapping[str, Any]) -> StatusRecord:
        """Build a record from one entry of ``aws.status`` (or a callback body)."""
        known = {f.name for f in fields(cls)} - {"extra", "raw"}
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
            created=parse_time(data.get("created")),
            last_updated=parse_time(data.get("last_updated")),
            status=_as_int(data.get("status"), 0) or 0,
            state=_opt_str(data.get("state")),
            next_attempt_at=parse_time(data.get("next_attempt_at")),
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
            raw=MappingProxyType(dict(data)),
        )

    def to_dict(self) -> dict[str, Any]:
        """The record as the API writes it, JSON-ready: every field (extras the server did
        not send are ``None``; ``options`` only when set), times as text (as the server
        sent them), then the fields this client does not know."""
        out = {
            f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("extra", "raw")
        }
        out["created"] = self._time_text("created", "")
        out["last_updated"] = self._time_text("last_updated", "")
        # "" when not retrying, as vodpush writes it; None from a server without extras.
        out["next_attempt_at"] = self._time_text(
            "next_attempt_at", "" if self.state is not None else None
        )
        if out["options"] is None:
            del out["options"]
        out.update(self.extra)
        return out

    def _time_text(self, name: str, absent: str | None) -> str | None:
        value = getattr(self, name)
        sent = self.raw.get(name)
        # The server's own text while it still says this time (not after a replace()).
        if isinstance(sent, str) and parse_time(sent) == value:
            return sent
        return absent if value is None else format_time(value)

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
    def retrying(self) -> bool:
        """Waiting for its next attempt (at ``next_attempt_at``) after a failure that may
        pass; ``last_error`` says what it was."""
        return self.state == "retrying"

    @property
    def finished(self) -> bool:
        return self.succeeded or self.failed or self.canceled

    @property
    def last_error(self) -> str | None:
        """What went wrong: the cause of the coming retry, or the failure; None when
        nothing did (so far)."""
        if self.retrying:
            return retry_cause(self.message) or self.message
        return self.message if self.failed else None


@dataclass(frozen=True)
class CallbackAttempt:
    """One POST of a callback, as ``aws.callbacks`` lists it."""

    at: datetime | None  # UTC
    ok: bool
    http_status: int | None  # the receiver's answer; None when none came
    error: str | None
    duration: float | None  # seconds

    @classmethod
    def from_api(cls, data: Mapping[str, Any]) -> CallbackAttempt:
        duration = data.get("duration")
        return cls(
            at=parse_time(data.get("at")),
            ok=data.get("ok") is True,
            http_status=_as_int(data.get("http_status")),
            error=_opt_str(data.get("error")),
            duration=float(duration)
            if isinstance(duration, int | float) and not isinstance(duration, bool)
            else None,
        )

    def to_dict(self) -> dict[str, Any]:
        return {**vars(self), "at": format_time(self.at)}


@dataclass(frozen=True)
class CallbackHistory:
    """A request's callback as ``aws.callbacks`` reports it: where it stands and its
    newest attempts (newest first; ``total`` counts them all)."""

    id: int
    state: str  # the request's
    callback: str
    callback_state: str  # none, pending, delivered, failed
    callback_attempts: int  # of the current delivery (a redelivery starts again at 0)
    next_attempt_at: datetime | None  # while pending
    webhook_id: str | None  # of the current delivery
    callback_error: str | None
    redeliveries: int
    last_redelivered: datetime | None  # None if never
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
            next_attempt_at=parse_time(data.get("next_attempt_at")),
            webhook_id=_opt_str(data.get("webhook_id")),
            callback_error=_opt_str(data.get("callback_error")),
            redeliveries=_as_int(data.get("redeliveries"), 0) or 0,
            last_redelivered=parse_time(data.get("last_redelivered")),
            total=_as_int(data.get("total"), 0) or 0,
            attempts=tuple(
                CallbackAttempt.from_api(a)
                for a in (attempts if isinstance(attempts, list) else [])
                if isinstance(a, Mapping)
            ),
        )

    def to_dict(self) -> dict[str, Any]:
        """As the API writes it (times as text, "" when there is none)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["next_attempt_at"] = format_time(self.next_attempt_at)
        out["last_redelivered"] = format_time(self.last_redelivered)
        out["attempts"] = [a.to_dict() for a in self.attempts]
        return out


@dataclass(frozen=True)
class Redelivery:
    """What ``aws.redeliver`` answered: the delivery now under way."""

    id: int
    callback_state: str  # "pending" (or, for a repeat of the same request, where it is now)
    webhook_id: str | None  # a new one: receivers see a new message
    next_attempt_at: datetime | None  # when it is due (now)

    @classmethod
    def from_api(cls, data: Mapping[str, Any]) -> Redelivery:
        return cls(
            id=_as_int(data.get("id"), 0) or 0,
            callback_state=_as_str(data.get("callback_state")),
            webhook_id=_opt_str(data.get("webhook_id")),
            next_attempt_at=parse_time(data.get("next_attempt_at")),
        )

    def to_dict(self) -> dict[str, Any]:
        return {**vars(self), "next_attempt_at": format_time(self.next_attempt_at)}


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
