"""A client that sends only the documented fields gets exactly the documented answer (the
envelope's and the records' keys, pinned here), whatever its language; a field vodpush
does not know is named back in a top-level `warnings` list instead of being dropped in
silence, safely (names are the client's text: cut, escaped, counted past ten)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.wire import STYLES, call
from vodpush.commands import COMMAND_FIELDS, COMMANDS
from vodpush.protocol.envelope import ENVELOPE_FIELDS, MAX_WARNINGS, unknown_field_warnings
from vodpush.protocol.payload import MAX_KEY_CHARS

FILE = "sestore1/jb/clip.mp4"
# docs/api.md and the reference page: the envelope of an answer, then each record.
SUCCESS_KEYS = ["status", "message", "handle_time", "data"]
FAILURE_KEYS = ["status", "code", "message", "handle_time"]
DOCUMENTED_RECORD_KEYS = [
    "id",
    "cdn_id",
    "path",
    "destination_path",
    "metadata",
    "acl",
    "callback",
    "message",
    "results",
    "created",
    "last_updated",
    "status",
]
# vodpush's extras, after the documented fields (docs/api.md, "Extras").
EXTRA_RECORD_KEYS = [
    "bucket",
    "state",
    "next_attempt_at",
    "attempts",
    "bytes_done",
    "bytes_total",
    "sha256",
    "error_code",
    "callback_state",
    "callback_attempts",
    "callback_error",
]
RESULT_KEYS = [
    "Bucket",
    "ETag",
    "Expiration",
    "Key",
    "Location",
    "ObjectURL",
    "RequestCharged",
    "SSEKMSKeyId",
    "ServerSideEncryption",
    "VersionId",
]


@pytest.fixture
def clip(account, sestore_root: Path) -> str:
    (sestore_root / "sestore1" / "jb" / "clip.mp4").write_bytes(b"x" * 100)
    return FILE


def upload_fields(**extra: Any) -> dict[str, Any]:
    return {
        "path": FILE,
        "destination_path": "shows/clip.mp4",
        "bucket": "my-bucket",
        "acl": "private",
        "metadata": {"title": "Café"},
        "callback": "",
        **extra,
    }


@pytest.mark.parametrize("style", sorted(STYLES))
def test_documented_requests_get_exactly_the_documented_answer(
    live_server, account, clip, style
) -> None:
    url = live_server.url
    queued = call(url, account, "aws.upload", style=style, **upload_fields())
    assert list(queued) == SUCCESS_KEYS, queued
    assert list(queued["data"]) == ["id"]
    for fields in ({}, {"limit": 25, "offset": 0}, {"limit": "5"}, {"id": queued["data"]["id"]}):
        listed = call(url, account, "aws.status", style=style, **fields)
        assert list(listed) == SUCCESS_KEYS, (fields, listed)
        (record,) = listed["data"]
        assert list(record) == DOCUMENTED_RECORD_KEYS + EXTRA_RECORD_KEYS
        assert list(record["results"]) == RESULT_KEYS
    refused = call(url, account, "aws.status", style=style, limit=0)
    assert list(refused) == FAILURE_KEYS, refused
    refused = call(url, account, "aws.upload", style=style, **upload_fields(acl="public"))
    assert list(refused) == FAILURE_KEYS, refused


def test_unknown_fields_are_named_back_in_warnings(live_server, account, clip) -> None:
    url = live_server.url
    queued = call(url, account, "aws.upload", **upload_fields(storage_clas="GLACIER"))
    assert queued["status"] == "success"
    assert list(queued) == [*SUCCESS_KEYS, "warnings"]
    assert queued["warnings"] == ["unknown field 'storage_clas' ignored"]
    listed = call(url, account, "aws.status", stat="failed", limit=5, ofset=2)
    assert list(listed) == [*SUCCESS_KEYS, "warnings"]
    assert listed["warnings"] == [
        "unknown field 'stat' ignored",
        "unknown field 'ofset' ignored",
    ]
    assert [r["id"] for r in listed["data"]] == [queued["data"]["id"]]  # nothing else changed
    # A known field with a warning beside it: both members, total first.
    both = call(url, account, "aws.status", state="queued", colour="blue")
    assert list(both) == [*SUCCESS_KEYS, "total", "warnings"]
    assert both["total"] == 1 and both["warnings"] == ["unknown field 'colour' ignored"]
    # A field of another command is unknown to this one.
    other = call(url, account, "aws.status", acl="private")
    assert other["warnings"] == ["unknown field 'acl' ignored"]


def test_a_misspelt_required_field_is_named_beside_the_refusal(live_server, account, clip):
    fields = upload_fields(destination_pth="shows/clip.mp4")
    del fields["destination_path"]
    answer = call(live_server.url, account, "aws.upload", **fields)
    assert answer["status"] == "failure" and answer["code"] == "0006"
    assert answer["message"] == "missing required field(s): destination_path"
    assert answer["warnings"] == ["unknown field 'destination_pth' ignored"]
    assert list(answer) == [*FAILURE_KEYS, "warnings"]


def test_hostile_field_names_are_cut_escaped_and_counted(live_server, account, clip) -> None:
    # (Longer keys, and keys with control characters, are refused whole before any field
    # is read: protocol.payload.)
    hostile = {
        "x" * MAX_KEY_CHARS: 1,
        "\u202eevil\u2066": 1,
        "it's": 1,
        '"><script>': 1,
        "": 1,
        "\U0001f3ac": 1,
    }
    hostile.update({f"extra{n}": n for n in range(30)})
    answer = call(live_server.url, account, "aws.status", **hostile)
    assert answer["status"] == "success", answer
    warnings = answer["warnings"]
    assert len(warnings) == MAX_WARNINGS + 1
    assert warnings[-1] == f"{len(hostile) - MAX_WARNINGS} more unknown fields ignored"
    assert warnings[0] == f"unknown field '{'x' * 64}...' ignored"
    assert warnings[1] == "unknown field '\\u202eevil\\u2066' ignored"
    assert warnings[2] == 'unknown field "it\'s" ignored'
    assert warnings[3] == "unknown field '\"><script>' ignored"
    assert warnings[4] == "unknown field '' ignored"
    assert warnings[5] == "unknown field '\U0001f3ac' ignored"
    assert all(len(w) < 120 and w.isprintable() for w in warnings)


def test_no_warnings_before_the_request_is_authenticated(live_server, account) -> None:
    answer = call(live_server.url, account, "aws.status", secret="f" * 64, nosuch=1)
    assert answer["code"] == "0003" and "warnings" not in answer
    answer = call(live_server.url, account, "aws.nope", nosuch=1)
    assert answer["code"] == "0000" and "warnings" not in answer


def test_every_command_names_its_fields() -> None:
    assert set(COMMAND_FIELDS) == set(COMMANDS)
    for command, names in COMMAND_FIELDS.items():
        assert not names & ENVELOPE_FIELDS, command


def test_warnings_name_only_what_no_one_reads() -> None:
    payload = {
        "command": "aws.status",
        "api_key": "k",
        "timestamp": 1,
        "cdn": 158,
        "limit": 5,
        "signature": "s",
    }
    assert unknown_field_warnings(payload, COMMAND_FIELDS["aws.status"]) == []
    assert unknown_field_warnings({**payload, "b": 1, "a": 2}, {"limit"}) == [
        "unknown field 'b' ignored",
        "unknown field 'a' ignored",
    ]
    many = {f"f{n}": n for n in range(MAX_WARNINGS + 1)}
    assert unknown_field_warnings(many, ())[-1] == "1 more unknown fields ignored"
