"""The typed operations called directly, as a second caller (the CLI, a web page) would:
each field's refusal names the field with the API's exact message, upload and status on a
real SQLite database through the Service, and `vodpush request list` agreeing with aws.status
over HTTP."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import run_cli as run
from tests.wire import call
from vodpush.commands import COMMANDS, CommandContext
from vodpush.core.clock import utcnow
from vodpush.operations import (
    InvalidField,
    MissingFields,
    OperationContext,
    Queued,
    RateLimited,
    RequestRef,
    StatusQuery,
    Unauthorized,
    UploadArgs,
    callback_history,
    redeliver,
    status,
    upload,
)
from vodpush.operations.callbacks import redelivery_message_id
from vodpush.protocol.envelope import ApiError, Code
from vodpush.webhooks import sign

FILE = "sestore1/jb/videos/clip.mp4"
KEY_A = "A" * 43 + "="  # replay keys: the canonical base64 of a digest, as the API passes
KEY_B = "B" * 43 + "="


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    # The operations themselves: SQLite (the stores' own tests cover PostgreSQL).
    return f"sqlite:///{tmp_path / 'ops.db'}"


@pytest.fixture
def clip(sestore_root: Path) -> str:
    target = sestore_root / FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"x" * 1000)
    return FILE


def context(service: Any, ref: str) -> OperationContext:
    return OperationContext(
        account=service.accounts.find(ref), settings=service.settings, requests=service.requests
    )


@pytest.fixture
def ctx(service, account) -> OperationContext:
    return context(service, account.api_key)


def values(**overrides: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "path": FILE,
        "destination_path": "path/to/file.mp4",
        "bucket": "my-bucket",
        "acl": "private",
        "metadata": {"title": "Ünïcode / slashes"},
        "callback": "",
    }
    fields.update(overrides)
    return fields


# -- arguments: each field refused by name, with the message the API has always sent -------


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("path", 7, "invalid path: must be a string"),
        ("path", "", "invalid path: must not be empty"),
        ("path", "a\x00b", "invalid path: contains a NUL character"),
        (
            "destination_path",
            "/abs.mp4",
            "invalid destination_path: must not start with '/' (it is an S3 object key)",
        ),
        (
            "destination_path",
            "dir/",
            "invalid destination_path: must end with a file name, not '/'",
        ),
        (
            "destination_path",
            "a\nb",
            "invalid destination_path: must not contain control characters",
        ),
        (
            "destination_path",
            "é" * 600,
            "invalid destination_path: must be at most 1024 bytes in UTF-8",
        ),
        (
            "bucket",
            "a..b",
            "invalid bucket: must be 3-255 characters of letters, digits, '.', "
            "'_' or '-', starting and ending with a letter or digit",
        ),
        ("bucket", ["my-bucket"], "invalid bucket: must be a string"),
        (
            "acl",
            "public-read-write",
            "invalid acl: must be one of private, public-read, bucket-default",
        ),
        ("metadata", "title=x", "invalid metadata: must be an object of key/value pairs"),
        ("callback", 5, "invalid callback: must be a string"),
        (
            "callback",
            "ftp://example.invalid/x",
            "invalid callback: scheme ftp: is not allowed, use http or https",
        ),
    ],
)
def test_upload_args_name_the_refused_field(ctx, field, value, message):
    with pytest.raises(InvalidField) as refused:
        UploadArgs.from_values(values(**{field: value}), ctx)
    assert refused.value.field == field
    assert refused.value.message == message


def test_missing_fields_are_named_together(ctx):
    with pytest.raises(MissingFields) as refused:
        UploadArgs.from_values({"path": FILE, "bucket": None, "acl": "private"}, ctx)
    assert refused.value.names == ("destination_path", "bucket")
    assert refused.value.message == "missing required field(s): destination_path, bucket"


def test_the_adapter_answers_refusals_with_the_api_codes(service, account, ctx):
    command = CommandContext(
        account=ctx.account, signature=KEY_A, settings=service.settings, requests=service.requests
    )
    cases = [
        (
            {"acl": "nope"},
            Code.INVALID_FIELD,
            "invalid acl: must be one of private, public-read, bucket-default",
        ),
        ({"acl": None}, Code.MISSING_FIELDS, "missing required field(s): acl"),
    ]
    for overrides, code, message in cases:
        with pytest.raises(ApiError) as answered:
            COMMANDS["aws.upload"](command, values(**overrides))
        assert (answered.value.code, answered.value.message) == (code, message)
    with pytest.raises(ApiError) as answered:
        COMMANDS["aws.status"](command, {"limit": "0"})
    assert answered.value.code == Code.INVALID_FIELD
    assert answered.value.message == "invalid limit: must be at least 1"


def test_a_bucket_outside_the_list_is_refused_before_later_fields(service, make_account):
    created = service.accounts.create(cdn=159, username="kb")  # no bucket allowed
    service.accounts.allow_buckets(created["api_key"], ["media-*"])
    ctx = context(service, created["api_key"])
    # Refused as unauthorized even though the acl is invalid too: the order the API answers.
    with pytest.raises(Unauthorized) as refused:
        UploadArgs.from_values(values(bucket="other", acl="nope"), ctx)
    assert refused.value.message.startswith("unauthorized access: ")
    assert "other" in refused.value.message
    args = UploadArgs.from_values(values(bucket="media-1", path="sestore1/kb/x.mp4"), ctx)
    assert args.bucket == "media-1"
    # Arguments built without the builder are checked by the operation as well.
    with pytest.raises(Unauthorized):
        upload(ctx, dataclasses.replace(args, bucket="other"), replay_key=KEY_A)


def test_a_shared_username_reads_no_file(ctx, clip):
    shared = dataclasses.replace(
        ctx, account=dataclasses.replace(ctx.account, username_shared=True)
    )
    args = UploadArgs.from_values(values(), shared)
    with pytest.raises(Unauthorized) as refused:
        upload(shared, args, replay_key=KEY_A)
    assert "is also used by another account" in refused.value.message


# -- upload and status on the database ----------------------------------------------------


def test_upload_queues_once_per_replay_key_and_status_reads_back(ctx, clip):
    args = UploadArgs.from_values(values(), ctx)
    assert args.metadata == {"title": "Ünïcode / slashes"}
    first = upload(ctx, args, replay_key=KEY_A)
    assert first == Queued(id=first.id, replayed=False)
    assert upload(ctx, args, replay_key=KEY_A) == Queued(id=first.id, replayed=True)
    second = upload(ctx, args, replay_key=KEY_B)
    assert second.id > first.id and not second.replayed

    page = status(ctx, StatusQuery())
    assert [r["id"] for r in page.records()] == [second.id, first.id]  # newest first
    record = status(ctx, StatusQuery(id=first.id)).records()[0]
    assert record["path"] == FILE and record["bucket"] == "my-bucket"
    assert record["destination_path"] == "path/to/file.mp4" and record["acl"] == "private"
    assert record["metadata"] == {"title": "Ünïcode / slashes"}
    assert record["state"] == "queued" and record["message"] == "Queued"
    assert [r["id"] for r in status(ctx, StatusQuery(limit=1, offset=1)).records()] == [first.id]


def test_the_fields_hash_covers_every_field_that_defines_the_upload(ctx):
    """The idempotency hash: canonical (key order and spelling of one value do not matter),
    changed by every field and object option, blind to the key and the envelope."""
    base = values(tags={"a": "1", "b": "2"}, storage_class="GLACIER", idempotency_key="k")
    digest = UploadArgs.from_values(base, ctx).fields_hash()
    assert len(digest) == 64 and int(digest, 16) >= 0
    same = {
        **dict(reversed(list(base.items()))),
        "tags": {"b": 2, "a": "1"},  # a number is its text, as in metadata
        "idempotency_key": "another key",
        "timestamp": 1,
        "content_type": None,  # null: not set
    }
    assert UploadArgs.from_values(same, ctx).fields_hash() == digest
    for change in (
        {"path": "sestore1/jb/videos/other.mp4"},
        {"destination_path": "other.mp4"},
        {"bucket": "other-bucket"},
        {"acl": "bucket-default"},
        {"metadata": {"title": "other"}},
        {"callback": "http://127.0.0.1:9/hook"},
        {"tags": {"a": "1"}},
        {"storage_class": "STANDARD"},
        {"content_type": "video/mp4"},
        {"cache_control": "no-cache"},
        {"content_disposition": "inline"},
    ):
        assert UploadArgs.from_values({**base, **change}, ctx).fields_hash() != digest, change


def test_upload_refuses_a_missing_file_naming_path(ctx):
    args = UploadArgs.from_values(values(path="sestore1/jb/absent.mp4"), ctx)
    with pytest.raises(InvalidField) as refused:
        upload(ctx, args, replay_key=KEY_A)
    assert refused.value.field == "path"
    assert status(ctx, StatusQuery()).rows == []


def test_status_never_shows_another_accounts_request(service, ctx, make_account, clip):
    queued = upload(ctx, UploadArgs.from_values(values(), ctx), replay_key=KEY_A)
    other = make_account(cdn=160, username="lb")
    other_ctx = context(service, other.api_key)
    assert list(status(other_ctx, StatusQuery()).rows) == []
    assert list(status(other_ctx, StatusQuery(id=queued.id)).rows) == []


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"limit": 0}, "invalid limit: must be at least 1"),
        ({"limit": 1001}, "invalid limit: must be at most 1000"),
        ({"limit": True}, "invalid limit: must be an integer, not a boolean"),
        ({"offset": -1}, "invalid offset: must be at least 0"),
        ({"offset": "1e3"}, "invalid offset: must be an integer"),
        ({"id": 0}, "invalid id: must be at least 1"),
        ({"id": 2**63}, "invalid id: is out of range"),
    ],
)
def test_status_query_names_the_refused_field(settings, given, message):
    with pytest.raises(InvalidField) as refused:
        StatusQuery.from_values(given, settings)
    assert refused.value.message == message
    assert refused.value.field == next(iter(given))


def test_status_query_reads_digit_strings_and_defaults(ctx, settings):
    assert StatusQuery.from_values({}, settings) == StatusQuery(limit=25, offset=0, id=None)
    assert StatusQuery.from_values({"limit": " 5 ", "offset": "2", "id": 9.0}, settings) == (
        StatusQuery(limit=5, offset=2, id=9)
    )
    # A query built directly is checked by the operation.
    with pytest.raises(InvalidField, match="invalid limit: must be at least 1"):
        status(ctx, StatusQuery(limit=0))


# -- the operator CLI: the same operation, a second caller --------------------------------


def test_cli_request_list_shows_what_aws_status_shows(live_server, account, clip, cli_env, capsys):
    ids = []
    for name in ("one.mp4", "two.mp4"):
        answer = call(live_server.url, account, "aws.upload", **values(destination_path=name))
        assert answer["status"] == "success", answer
        ids.append(answer["data"]["id"])
    over_http = call(live_server.url, account, "aws.status")
    assert over_http["status"] == "success"

    code, out, err = run(capsys, "request", "list", account.api_key, "--json")
    assert code == 0, err
    assert json.loads(out) == over_http["data"]
    assert [r["id"] for r in json.loads(out)] == ids[::-1]

    code, out, _ = run(
        capsys, "request", "list", f"{account.cdn}/{account.username}", "--limit", "1", "--json"
    )
    assert code == 0 and [r["id"] for r in json.loads(out)] == [ids[1]]
    code, out, _ = run(capsys, "request", "list", str(account.id), "--id", str(ids[0]), "--json")
    assert code == 0 and [r["id"] for r in json.loads(out)] == [ids[0]]

    code, out, _ = run(capsys, "request", "list", account.api_key)
    assert code == 0
    assert "one.mp4" in out and "two.mp4" in out and "queued" in out
    assert account.api_secret not in out


def test_cli_request_list_refusals(account, cli_env, capsys):
    code, out, err = run(capsys, "request", "list", account.api_key, "--limit", "0")
    assert code == 1 and out == ""
    assert err.strip() == "error: invalid limit: must be at least 1"
    code, _, err = run(capsys, "request", "list", "999/nobody")
    assert code == 1 and err.strip() == "error: no such account: '999/nobody'"
    # An account with no request: an empty list, not an error.
    code, out, _ = run(capsys, "request", "list", account.api_key, "--json")
    assert code == 0 and json.loads(out) == []


# -- the callback's history and redelivery -------------------------------------------------


def _delivered(service: Any, ctx: OperationContext, clip: str) -> int:
    """A request whose upload succeeded and whose callback was delivered, as a worker
    records them."""
    args = UploadArgs.from_values(values(callback="http://127.0.0.1:9/hook"), ctx)
    request_id = upload(ctx, args, replay_key=KEY_A).id
    assert service.queue.claim("w", 30).id == request_id
    service.queue.succeed(
        request_id, "w", results={}, http_status=200, sha256="0" * 64, size=1, has_callback=True
    )
    due = service.queue.claim_callback(30)
    service.queue.record_callback(
        request_id, msg_id=due.msg_id, at=utcnow(), ok=True, http_status=204, error=None,
        duration=0.1, next_delay=None,
    )  # fmt: skip
    return request_id


def test_a_redelivery_id_is_derived_from_the_replay_key_else_fresh():
    first = redelivery_message_id(7, KEY_A)
    assert first == redelivery_message_id(7, KEY_A)  # the same signed request: the same
    assert first != redelivery_message_id(8, KEY_A) and first != redelivery_message_id(7, KEY_B)
    assert first.startswith("msg_") and len(first) == 36
    sign("secret", first, 1_700_000_000, b"{}")  # a valid webhook-id
    assert redelivery_message_id(7, None) != redelivery_message_id(7, None)


def test_the_operator_redelivers_without_a_replay_key(service, ctx, clip):
    request_id = _delivered(service, ctx, clip)
    done = redeliver(ctx, RequestRef(request_id))
    assert (done.callback_state, done.replayed) == ("pending", False)
    assert done.msg_id != redelivery_message_id(request_id, KEY_A)
    record = done.record()
    assert record["webhook_id"] == done.msg_id and len(record["next_attempt_at"]) == 19
    history = callback_history(ctx, RequestRef(request_id))
    assert (history.msg_id, history.redeliveries, history.total) == (done.msg_id, 1, 1)


def test_the_adapter_answers_too_many_redeliveries_with_code_1000(service, account, ctx, clip):
    request_id = _delivered(service, ctx, clip)
    limited = service.settings.model_copy(update={"callback_redeliveries_per_hour": 1})
    command = CommandContext(
        account=ctx.account, signature=KEY_B, settings=limited, requests=service.requests
    )
    message, data = COMMANDS["aws.redeliver"](command, {"id": str(request_id)})
    assert message == "Callback redelivery queued" and data["callback_state"] == "pending"
    # Delivered again (as a worker records it), then asked once more.
    due = service.queue.claim_callback(30)
    service.queue.record_callback(
        request_id, msg_id=due.msg_id, at=utcnow(), ok=True, http_status=204, error=None,
        duration=0.1, next_delay=None,
    )  # fmt: skip
    again = dataclasses.replace(command, signature=KEY_A)
    with pytest.raises(ApiError) as answered:
        COMMANDS["aws.redeliver"](again, {"id": request_id})
    assert answered.value.code == Code.BUSY and 3500 < answered.value.retry_after <= 3600
    assert "redelivered 1 times in the past hour, the most allowed (1)" in answered.value.message
    with pytest.raises(RateLimited):
        redeliver(dataclasses.replace(ctx, settings=limited), RequestRef(request_id))
    for payload, message in (
        ({}, "missing required field(s): id"),
        ({"id": 0}, "invalid id: must be at least 1"),
        ({"id": True}, "invalid id: must be an integer, not a boolean"),
        ({"id": 10**9}, "invalid id: no such request: 1000000000"),
    ):
        for name in ("aws.callbacks", "aws.redeliver"):
            with pytest.raises(ApiError) as answered:
                COMMANDS[name](command, payload)
            assert answered.value.message == message, (name, payload)
