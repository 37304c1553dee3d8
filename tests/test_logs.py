"""The log format (vodpush.logs on structlog), request ids, the VODPUSH_* spelling check and
the exit codes: pure functions, no process (the processes are in tests/test_startup.py)."""

from __future__ import annotations

import json
import logging
import re
import sys
from typing import Any

import pytest

from vodpush import logs
from vodpush.api.request_ids import MAX_ID_CHARS, request_id
from vodpush.cli.main import cli
from vodpush.cli.startup import ExitCode, option_variables, unknown_variables
from vodpush.config import setting_variables

TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00$")


def record(
    name: str = "vodpush.test",
    msg: str = "hello",
    args: Any = (),
    level: int = logging.INFO,
    exc_info: Any = None,
    **extra: Any,
) -> logging.LogRecord:
    made = logging.LogRecord(name, level, __file__, 1, msg, args, exc_info)
    made.__dict__.update(extra)
    return made


def as_json(rec: logging.LogRecord) -> dict[str, Any]:
    line = logs.formatter("json").format(rec)
    assert "\n" not in line and "\x1b" not in line
    line.encode("utf-8")  # writable as UTF-8
    return json.loads(line)


def test_json_line_has_the_stable_keys_first_then_the_extras() -> None:
    entry = as_json(record(action="api.refused", account_id=7, reason="no"))
    assert list(entry)[:5] == ["time", "level", "logger", "message", "action"]
    assert TIME.match(entry["time"])
    assert entry | {"time": None} == {
        "time": None,
        "level": "info",
        "logger": "vodpush.test",
        "message": "hello",
        "action": "api.refused",
        "account_id": 7,
        "reason": "no",
    }


def test_uvicorn_color_message_is_dropped() -> None:
    rec = record(
        "uvicorn.error",
        "Started server process [%d]",
        (42,),
        color_message="Started server process [\x1b[36m%d\x1b[0m]",
    )
    entry = as_json(rec)
    assert entry["message"] == "Started server process [42]"
    assert "color_message" not in entry


def test_uvicorn_access_line_becomes_fields() -> None:
    args = ("127.0.0.1:5555", "POST", "/stable/", "1.1", 200)
    entry = as_json(record("uvicorn.access", '%s - "%s %s HTTP/%s" %d', args))
    assert entry["message"] == '127.0.0.1:5555 - "POST /stable/ HTTP/1.1" 200'
    assert entry["action"] == "http.access"
    assert (entry["method"], entry["path"], entry["status"]) == ("POST", "/stable/", 200)
    assert "positional_args" not in entry


def test_a_traceback_is_one_json_field() -> None:
    try:
        raise ZeroDivisionError("boom")
    except ZeroDivisionError:
        exc_info = sys.exc_info()
    entry = as_json(record(level=logging.ERROR, exc_info=exc_info, action="x"))
    assert entry["level"] == "error"
    assert "ZeroDivisionError: boom" in entry["exception"]


def test_a_lone_surrogate_from_a_client_is_escaped_not_a_crash() -> None:
    value = "a\udcffb"
    entry = as_json(record(action="api.refused", command=logs.echo(value)))
    assert entry["command"] == value  # escaped as \udcff in the line, read back the same
    line = logs.formatter("console").format(record(command=value, msg="x\udcff"))
    line.encode("utf-8")


def test_context_fields_join_every_line() -> None:
    with logs.bound(http_request_id="abc123", client_address="192.0.2.7"):
        entry = as_json(record(action="api.accepted"))
    assert (entry["http_request_id"], entry["client_address"]) == ("abc123", "192.0.2.7")
    assert "http_request_id" not in as_json(record())


def test_console_line_is_one_plain_line_without_escape_codes() -> None:
    rec = record(
        msg="refused\nforged line \x1b[31m",
        action="api.refused",
        reason="bad\n\x1b[2Jvalue",
        color_message="\x1b[36mx",
    )
    line = logs.formatter("console").format(rec)
    assert "\n" not in line and "\x1b" not in line and "color_message" not in line
    assert "hello" not in line and "refused" in line and "action='api.refused'" in line
    assert TIME.match(line.split(" ")[0])


def test_console_traceback_has_no_locals() -> None:
    secret = "hunter2-in-a-local"  # noqa: F841 - a local a rich traceback would show
    try:
        raise ValueError("boom")
    except ValueError:
        exc_info = sys.exc_info()
    text = logs.formatter("console").format(record(level=logging.ERROR, exc_info=exc_info))
    assert "ValueError: boom" in text and "hunter2-in-a-local" not in text
    assert "\x1b" not in text


def test_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="json, console"):
        logs.formatter("xml")


def test_echo_bounds_client_values() -> None:
    assert logs.echo("x" * 500).endswith("... (500 characters)")
    assert logs.echo(10**40) == "an integer of 133 bits"
    assert logs.echo([1, 2]) == "[1, 2]"


# -- request ids ----------------------------------------------------------------------------


@pytest.mark.parametrize("sent", [b"abc-123", b"req:4f2a/7=", b"a" * MAX_ID_CHARS])
def test_a_client_request_id_that_is_a_short_token_is_kept(sent: bytes) -> None:
    assert request_id([(b"X-Request-ID", sent)]) == sent.decode()


@pytest.mark.parametrize(
    "headers",
    [
        [],
        [(b"x-request-id", b"")],
        [(b"x-request-id", b"a" * (MAX_ID_CHARS + 1))],
        [(b"x-request-id", b"two words")],
        [(b"x-request-id", b"line\r\nbreak")],
        [(b"x-request-id", "caf\u00e9".encode())],
        [(b"x-request-id", b"\x1b[31m")],
        [(b"x-request-id", b"one"), (b"x-request-id", b"two")],
    ],
)
def test_any_other_request_id_is_replaced_by_a_new_one(headers: list[tuple[bytes, bytes]]) -> None:
    made = request_id(headers)
    assert re.fullmatch(r"[0-9a-f]{16}", made)
    assert made != request_id(headers)


# -- the environment ------------------------------------------------------------------------


def test_misspelt_variables_are_named_with_the_closest_known_one() -> None:
    known = setting_variables() | option_variables(cli)
    environ = {
        "VODPUSH_DATABSE_URL": "x",
        "VODPUSH_DATABASE_URL": "sqlite://",
        "vodpush_log_levle": "debug",
        "VODPUSH_XYZZY": "1",
        "VODPUSH_API_SECRET": "client's",
        "VODPUSH_CONFIG": "f.toml",
        "PATH": "/bin",
    }
    assert unknown_variables(environ, known) == [
        ("VODPUSH_DATABSE_URL", "VODPUSH_DATABASE_URL"),
        ("VODPUSH_XYZZY", None),
        ("vodpush_log_levle", "VODPUSH_LOG_LEVEL"),
    ]


def test_every_option_variable_is_known() -> None:
    known = option_variables(cli)
    assert {"VODPUSH_URL", "VODPUSH_API_SECRET", "VODPUSH_S3_SECRET_ACCESS_KEY"} <= known
    assert {"VODPUSH_LOG_FORMAT", "VODPUSH_ACCESS_LOG"} <= setting_variables()


def test_exit_codes_are_distinct() -> None:
    assert [int(code) for code in ExitCode] == [0, 1, 2, 3, 4, 5]
