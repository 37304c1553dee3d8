"""Structured logs on stderr, one line an event, through structlog.

Every record of the standard library's ``logging`` (ours, written as
``log.info("...", extra={"action": ..., ...})``, and uvicorn's, alembic's...) goes through
structlog's ProcessorFormatter and one chain of processors, so all lines look alike:

- ``json`` (the default): one object a line; keys ``time`` (ISO 8601 UTC, milliseconds),
  ``level``, ``logger``, ``message``, ``action`` when the line has one, then the extras and
  the request's context (``http_request_id``, ``client_address``);
- ``console``: the same fields as one plain line for people.

Neither ever holds an ANSI escape: uvicorn's ``color_message`` is dropped, and control
characters are escaped. A client's text holding a lone surrogate is escaped, not a crash.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

# How much of a client-supplied value a log line echoes.
ECHO_CHARS = 200
FORMATS = ("json", "console")

# The keys every line starts with, in this order.
_FIRST_KEYS = ("time", "level", "logger", "message", "action")
# Extras that are not for a log line: uvicorn's ANSI-coloured copy of its message.
_DROPPED_EXTRAS = ("color_message",)
# Every control character but none (JSON escapes them itself; the console format must).
_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))}
_CONTROL_BUT_NEWLINE = {c: e for c, e in _CONTROL.items() if c != ord("\n")}


def echo(value: Any, limit: int = ECHO_CHARS) -> Any:
    """A client-supplied value as a log field: short strings, numbers and None as they are,
    anything else (long text, lists, objects) cut to ``limit`` characters of its repr."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**18:
        return f"an integer of {value.bit_length()} bits"  # str() of a huge int is costly
    if value is None or isinstance(value, bool | int | float):
        return value
    text = value if isinstance(value, str) else repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters)"


@contextmanager
def bound(**fields: Any) -> Iterator[None]:
    """Add ``fields`` to every line logged in this context (this task or thread, and the
    threads anyio runs for it): the HTTP request id and client of a request."""
    with structlog.contextvars.bound_contextvars(**fields):
        yield


# -- processors ----------------------------------------------------------------------------


def _record(event_dict: EventDict) -> logging.LogRecord | None:
    record = event_dict.get("_record")
    return record if isinstance(record, logging.LogRecord) else None


def _add_time(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    record = _record(event_dict)
    created = (
        datetime.fromtimestamp(record.created, UTC) if record is not None else datetime.now(UTC)
    )
    event_dict["time"] = created.isoformat(timespec="milliseconds")
    return event_dict


def _drop_extras(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    for key in _DROPPED_EXTRAS:
        event_dict.pop(key, None)
    event_dict.pop("taskName", None)  # asyncio's, on Python 3.12+: not an extra of ours
    return event_dict


def _uvicorn_access(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    """uvicorn's access line ('%s - "%s %s HTTP/%s" %d') as fields."""
    args = event_dict.pop("positional_args", None)
    record = _record(event_dict)
    access = record is not None and record.name == "uvicorn.access"
    if access and isinstance(args, tuple) and len(args) == 5:
        peer, method, path, version, status = args
        event_dict.setdefault("action", "http.access")
        event_dict.setdefault("peer", peer)
        event_dict.update(method=method, path=path, http_version=version, status=status)
    return event_dict


def _stack(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    """A record's stack_info (text already) under the key ``stack``."""
    stack = event_dict.pop("stack_info", None)
    if isinstance(stack, str):
        event_dict["stack"] = stack
    return event_dict


def _ordered(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    ordered = {key: event_dict.pop(key) for key in _FIRST_KEYS if key in event_dict}
    ordered.update(event_dict)
    return ordered


def _escape_message(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    """Console: a message is one line, whatever a library put in it."""
    message = event_dict.get("message")
    if isinstance(message, str):
        event_dict["message"] = message.translate(_CONTROL)
    return event_dict


def _json_dumps(entry: Any, **kwargs: Any) -> str:
    line = json.dumps(entry, ensure_ascii=False, **kwargs)
    if not line.isascii():
        try:
            line.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate from a client: escape it
            line = json.dumps(entry, ensure_ascii=True, **kwargs)
    return line


class _ConsoleLine:
    """structlog's ConsoleRenderer without colours, tracebacks as plain text (never with
    their locals: they may hold secrets), and every control character but the newlines of
    a traceback escaped."""

    def __init__(self) -> None:
        self._render = structlog.dev.ConsoleRenderer(
            colors=False,
            exception_formatter=structlog.dev.plain_traceback,
            timestamp_key="time",
            event_key="message",
            repr_native_str=True,  # values quoted and escaped: a client cannot forge a line
            sort_keys=False,
            pad_event_to=0,
        )

    def __call__(self, logger: WrappedLogger, name: str, event_dict: EventDict) -> str:
        line = str(self._render(logger, name, event_dict)).translate(_CONTROL_BUT_NEWLINE)
        return line.encode("utf-8", "backslashreplace").decode("utf-8")


def _ascii_safe(line: str) -> str:
    return line.encode("ascii", "backslashreplace").decode("ascii")


def _chain(fmt: str, stream: TextIO) -> tuple[list[Processor], list[Processor]]:
    """(the processors every record goes through first, the ones that render it)."""
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.ExtraAdder(),
        _drop_extras,
        _uvicorn_access,
        _add_time,
    ]
    render: list[Processor] = [
        structlog.stdlib.ProcessorFormatter.remove_processors_meta,
        structlog.processors.EventRenamer("message"),
        _stack,
    ]
    if fmt == "console":
        render += [_escape_message, _ordered, _ConsoleLine()]
    else:
        render += [
            structlog.processors.format_exc_info,  # the traceback as the text "exception"
            _ordered,
            structlog.processors.JSONRenderer(serializer=_json_dumps),
        ]
    encoding = (getattr(stream, "encoding", None) or "").lower().replace("-", "")
    if encoding not in ("utf8", "utf8mb4"):  # an ASCII terminal: escape the rest
        render.append(lambda _logger, _name, line: _ascii_safe(line))
    return shared, render


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is when a line is written (a test's capture)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:
        pass


def formatter(fmt: str = "json", stream: TextIO | None = None) -> logging.Formatter:
    """The formatter of ``fmt`` ("json" or "console") for lines written to ``stream``."""
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    shared, render = _chain(fmt, stream or sys.stderr)
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=render,
        pass_foreign_args=True,  # uvicorn's access line, as fields
        keep_exc_info=False,
        keep_stack_info=False,
    )


def configure(level: str = "info", fmt: str = "json") -> None:
    """Send every log line of this process to stderr in ``fmt`` from ``level`` up."""
    handler = _StderrHandler()
    handler.setFormatter(formatter(fmt, sys.stderr))
    handler._vodpush = True  # type: ignore[attr-defined]
    root = logging.getLogger()
    # Replace only a handler of ours: a test's log capture stays.
    root.handlers[:] = [h for h in root.handlers if not getattr(h, "_vodpush", False)]
    root.addHandler(handler)
    root.setLevel(level.upper())
    # uvicorn's loggers have no handler of their own here (server_config: log_config=None):
    # they reach ours through the root. Its access lines come only with VODPUSH_ACCESS_LOG.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    logging.getLogger("botocore").setLevel(logging.WARNING)
    # Alembic's chatter ("Context impl SQLiteImpl."); the migrations applied are logged by
    # the command that applied them (action db.migrated).
    logging.getLogger("alembic").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    shared, _ = _chain(fmt, sys.stderr)
    # structlog's own loggers, should any code use them, end in the same handler.
    structlog.configure(
        processors=[
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
