"""vodpush_client, the client distribution, on httpx.MockTransport: its pinned public API,
the async client (the sync one's methods and retries, awaited), wait() and its progress
callback, typed records, configuration from the environment, and the one signing code the
server shares with it. The wheel installed alone runs in tests/test_client_dist.py."""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import json
import time
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs

import httpx
import pytest

import vodpush_client
import vodpush_client.signing
import vodpush_client.webhooks
from tests.test_client import SECRET, Clock, fail, ok, record
from vodpush import webhooks as server_webhooks
from vodpush.cli.main import cli
from vodpush.cli.startup import option_variables
from vodpush.core import records as server_records
from vodpush.protocol import signing as server_signing
from vodpush_client import (
    ApiError,
    ApiWarning,
    AsyncClient,
    CallbackHistory,
    Client,
    FiltersUnsupported,
    RequestNotFound,
    StatusRecord,
    TransportError,
    WaitTimeout,
)
from vodpush_client.config import VARIABLES

ENVELOPE = ("command", "api_key", "timestamp", "cdn", "signature")


def test_public_api_is_pinned() -> None:
    # Adding a name is a minor release of vodpush-client; removing or renaming one breaks
    # its users: change this list only on purpose.
    assert sorted(vodpush_client.__all__) == sorted(
        [
            "DEFAULT_TIMEOUT",
            "ApiError",
            "ApiWarning",
            "AsyncClient",
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
            "WaitTimeout",
            "WebhookVerificationError",
            "disposition_header",
            "standard_webhooks_secret",
            "verify_callback",
        ]
    )
    for name in vodpush_client.__all__:
        assert getattr(vodpush_client, name) is not None
    assert vodpush_client.__version__ == "0.1.0"


def public_methods(cls: type) -> dict[str, Any]:
    return {
        name: member
        for name, member in inspect.getmembers(cls, inspect.isfunction)
        if not name.startswith("_") and name not in ("close", "aclose")
    }


def test_the_async_client_has_every_method_of_the_sync_one_with_the_same_parameters() -> None:
    sync, async_ = public_methods(Client), public_methods(AsyncClient)
    assert set(sync) == set(async_)
    assert {"upload", "status", "get", "iter_status", "cancel", "retry", "callbacks"} < set(sync)
    assert {"redeliver", "wait"} < set(sync)
    for name, method in sync.items():
        expected = inspect.signature(method).parameters
        got = inspect.signature(async_[name]).parameters
        assert [(p.name, p.kind, p.default) for p in got.values()] == [
            (p.name, p.kind, p.default) for p in expected.values()
        ], name
        if name == "iter_status":
            assert inspect.isasyncgenfunction(async_[name])
        else:
            assert inspect.iscoroutinefunction(async_[name]), name
    init = inspect.signature(AsyncClient.__init__).parameters
    assert list(init) == list(inspect.signature(Client.__init__).parameters)


# -- the one signing code ---------------------------------------------------------------------


def test_the_server_signs_and_verifies_with_the_client_distributions_code() -> None:
    # Signing code lives once: the server imports it, it does not copy it.
    assert server_signing.sign_request is vodpush_client.signing.sign_request
    assert server_signing.php_json_encode is vodpush_client.signing.php_json_encode
    assert server_signing.compute_signature is vodpush_client.signing.compute_signature
    assert (
        server_webhooks.verify is vodpush_client.webhooks.verify is vodpush_client.verify_callback
    )
    assert server_webhooks.signature is vodpush_client.webhooks.signature
    assert server_webhooks.standard_webhooks_secret is vodpush_client.standard_webhooks_secret
    # ... and what one side writes the other reads.
    text = vodpush_client.signing.sign_request({"command": "aws.status", "path": "a/é"}, SECRET)
    signed = server_signing.split_signed_request(text)
    assert signed.signed_text is not None
    assert server_signing.verify(signed, SECRET) and not server_signing.verify(signed, "other")
    body = b'{"id": 7}'
    headers = server_webhooks.sign(SECRET, "msg_1", time.time(), body)
    vodpush_client.verify_callback(SECRET, headers, body)


def test_the_records_read_what_the_server_writes() -> None:
    # The client cannot import the server: these are its own copies of the server's words.
    assert vodpush_client.records.SUCCESS_MESSAGE == server_records.SUCCESS_MESSAGE
    at = datetime(2031, 6, 1, 12, 0, 10)
    message = server_records.retrying_message(
        at=at, attempt=2, max_attempts=16, cause="S3 said SlowDown: (slow)"
    )
    retrying = StatusRecord.from_api(
        record(state="retrying", message=message, next_attempt_at=server_records.format_time(at))
    )
    assert retrying.retrying and retrying.last_error == "S3 said SlowDown: (slow)"
    assert retrying.next_attempt_at == at.replace(tzinfo=UTC)


# -- records ----------------------------------------------------------------------------------


def test_times_are_aware_utc_datetimes_and_the_servers_text_stays_reachable() -> None:
    data = record(created="2018-01-01 1:00:00", last_updated="2026-01-01T02:00:00+02:00")
    parsed = StatusRecord.from_api(data)
    assert parsed.created == datetime(2018, 1, 1, 1, 0, 0, tzinfo=UTC)
    assert parsed.last_updated == datetime(2026, 1, 1, 0, 0, 0, tzinfo=UTC)
    assert parsed.next_attempt_at is None  # "" while not retrying
    assert parsed.raw["created"] == "2018-01-01 1:00:00"
    assert parsed.to_dict() == data  # exactly as the server wrote it
    later = dataclasses.replace(parsed, created=datetime(2019, 1, 1, tzinfo=UTC))
    assert later.to_dict()["created"] == "2019-01-01 00:00:00"  # the new value, not raw
    for odd in ("0000-00-00 00:00:00", "soon", "2031-13-01 00:00:00", 5, None, "9" * 10_000):
        assert StatusRecord.from_api(record(created=odd)).created is None


def test_callback_times_are_datetimes_and_written_back_as_the_api_writes_them() -> None:
    data = {
        "id": 7, "state": "succeeded", "callback": "https://example.com/h",
        "callback_state": "pending", "callback_attempts": 0,
        "next_attempt_at": "2026-01-01 00:10:00", "webhook_id": "msg_2", "callback_error": None,
        "redeliveries": 0, "last_redelivered": "", "total": 1,
        "attempts": [{"at": "2026-01-01 00:00:02", "ok": False, "http_status": 500,
                      "error": "HTTP 500", "duration": 0.5}],
    }  # fmt: skip
    history = CallbackHistory.from_api(data)
    assert history.next_attempt_at == datetime(2026, 1, 1, 0, 10, tzinfo=UTC)
    assert history.last_redelivered is None
    assert history.attempts[0].at == datetime(2026, 1, 1, 0, 0, 2, tzinfo=UTC)
    assert history.to_dict() == data


# -- configuration ----------------------------------------------------------------------------


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    values = {
        "VODPUSH_URL": "http://api.test",
        "VODPUSH_CDN": "158",
        "VODPUSH_API_KEY": "KEY",
        "VODPUSH_API_SECRET": SECRET,
        "VODPUSH_TIMEOUT": "2.5",
    }
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    return values


@pytest.mark.parametrize("cls", [Client, AsyncClient])
def test_from_env_reads_the_variables_and_arguments_win(cls: Any, env: dict[str, str]) -> None:
    api = cls.from_env()
    assert (api.url, api.cdn, api.api_key) == ("http://api.test/stable/", 158, "KEY")
    assert api._http.timeout.read == 2.5
    assert SECRET not in repr(api)
    other = cls.from_env(cdn=159, timeout=30, retries=0)
    assert (other.cdn, other._http.timeout.read, other._retries) == (159, 30.0, 0)


def test_from_env_names_what_is_missing_or_wrong(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("VODPUSH_API_SECRET")
    monkeypatch.setenv("VODPUSH_URL", "  ")
    with pytest.raises(ValueError, match=r"set VODPUSH_URL, VODPUSH_API_SECRET \(or pass"):
        Client.from_env()
    monkeypatch.setenv("VODPUSH_URL", "http://api.test")
    monkeypatch.setenv("VODPUSH_API_SECRET", SECRET)
    for variable, value in [("VODPUSH_CDN", "abc"), ("VODPUSH_CDN", "0"),
                            ("VODPUSH_TIMEOUT", "nan"), ("VODPUSH_TIMEOUT", "-1")]:  # fmt: skip
        monkeypatch.setenv(variable, value)
        with pytest.raises(ValueError, match=f"{variable} must be") as caught:
            Client.from_env()
        assert SECRET not in str(caught.value)
        monkeypatch.setenv(variable, env[variable])
    monkeypatch.delenv("VODPUSH_TIMEOUT")
    assert Client.from_env()._http.timeout.read == vodpush_client.DEFAULT_TIMEOUT


def test_the_command_line_reads_every_variable_the_client_does() -> None:
    # So `vodpush serve` does not call them unknown, and one environment serves both.
    assert set(VARIABLES.values()) <= option_variables(cli)


# -- the async client -------------------------------------------------------------------------


def payload(request: httpx.Request) -> dict[str, Any]:
    (text,) = parse_qs(request.content.decode())["json"]
    return server_signing.split_signed_request(text).payload


def async_client(handler: Any, clock: Clock | None = None) -> AsyncClient:
    clock = clock or Clock()

    async def sleep(seconds: float) -> None:
        clock.sleep(seconds)

    return AsyncClient(
        "http://api.test",
        158,
        "KEY",
        SECRET,
        transport=httpx.MockTransport(handler),
        sleep=sleep,
        clock=clock,
    )


def test_async_upload_is_retried_only_with_the_identical_signed_body() -> None:
    bodies: list[bytes] = []

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(request.content)
        if len(bodies) == 1:
            raise httpx.ReadTimeout("no answer")  # the server may have queued it
        return ok({"id": 42})

    async def run() -> int:
        async with async_client(handler) as api:
            return await api.upload("sestore1/jb/a.mp4", "a.mp4", "b", "private", tags={"k": "v"})

    assert asyncio.run(run()) == 42
    assert len(bodies) == 2 and bodies[0] == bodies[1]
    (text,) = parse_qs(bodies[0].decode())["json"]
    sent = json.loads(text)
    assert (sent["command"], sent["tags"], sent["cdn"]) == ("aws.upload", {"k": "v"}, 158)


def test_async_reads_are_signed_afresh_and_refusals_are_api_errors() -> None:
    stamps: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        stamps.append(payload(request)["timestamp"])
        if len(stamps) == 1:
            return httpx.Response(503, text="busy proxy")
        if len(stamps) == 2:
            return ok([record()])
        return fail("0007", "invalid id: no such request")

    async def run() -> None:
        api = async_client(handler)
        try:
            (first,) = await api.status(limit=1, id=7)
            assert first.id == 7 and first.created == datetime(2026, 1, 1, tzinfo=UTC)
            with pytest.raises(ApiError) as refused:
                await api.cancel(7)
            assert refused.value.code == "0007"
        finally:
            await api.aclose()

    asyncio.run(run())
    assert len(stamps) == 3 and stamps[0] < stamps[1]  # the retry is a new signature
    with pytest.raises(TransportError, match="HTTP 404"):
        asyncio.run(async_client(lambda r: httpx.Response(404)).callbacks(7))


def test_async_iter_status_pages_by_keyset_and_falls_back_to_offsets() -> None:
    ids = list(range(5, 0, -1))
    asked: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        fields = {k: v for k, v in payload(request).items() if k not in ENVELOPE}
        asked.append(fields)
        # An old server: it knows neither after_id nor total, so it pages by offset.
        page = ids[fields["offset"] : fields["offset"] + fields["limit"]]
        return ok([record(id=i) for i in page])

    async def listed() -> list[int]:
        return [r.id async for r in async_client(handler).iter_status(page_size=2)]

    assert asyncio.run(listed()) == [5, 4, 3, 2, 1]
    assert asked[1] == {"limit": 2, "offset": 0, "after_id": 4}  # refused: no total
    assert [a["offset"] for a in asked[2:]] == [2, 4]

    async def filtered() -> list[int]:
        return [r.id async for r in async_client(handler).iter_status(state="failed")]

    with pytest.raises(FiltersUnsupported, match=r"does not support aws\.status filters"):
        asyncio.run(filtered())


# -- wait() -----------------------------------------------------------------------------------


def scripted(states: list[dict[str, Any]]) -> tuple[Any, list[dict[str, Any]]]:
    """A transport handler answering aws.status with these records, one per call."""
    asked: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        asked.append(payload(request))
        fields = states.pop(0) if len(states) > 1 else states[0]
        return ok([record(**fields)])

    return handler, asked


PROGRESS = [
    {"state": "queued", "message": "Queued"},
    {"state": "running", "message": "Uploading", "bytes_done": 0, "bytes_total": 100},
    {"state": "running", "message": "Uploading", "bytes_done": 60, "bytes_total": 100},
    {"state": "succeeded", "message": "Successfully Uploaded to AWS", "status": 200,
     "bytes_done": 100, "bytes_total": 100},
]  # fmt: skip


def test_wait_polls_until_finished_and_shows_every_record_to_progress() -> None:
    handler, asked = scripted(list(PROGRESS))
    clock = Clock()
    api = Client("http://api.test", 158, "KEY", SECRET, transport=httpx.MockTransport(handler),
                 sleep=clock.sleep, clock=clock)  # fmt: skip
    seen: list[StatusRecord] = []
    final = api.wait(7, interval=0.5, progress=seen.append)
    assert final.succeeded and final is seen[-1]
    assert [(r.state, r.bytes_done) for r in seen] == [
        ("queued", 0), ("running", 0), ("running", 60), ("succeeded", 100)
    ]  # fmt: skip
    assert clock.sleeps == [0.5, 0.5, 0.5]
    assert all(a["command"] == "aws.status" and a["id"] == 7 for a in asked)


def test_wait_ends_on_failure_and_cancel_without_raising() -> None:
    for end in ({"state": "failed", "status": 404, "message": "Upload failed: gone"},
                {"state": "canceled", "message": "Canceled by the customer"}):  # fmt: skip
        handler, _ = scripted([PROGRESS[0], end])
        api = Client("http://api.test", 158, "KEY", SECRET,
                     transport=httpx.MockTransport(handler), sleep=lambda s: None)  # fmt: skip
        final = api.wait(7)
        assert final.finished and not final.succeeded and final.state == end["state"]


def test_wait_times_out_with_the_last_record_and_knows_an_unknown_id() -> None:
    handler, _ = scripted([PROGRESS[1]])
    api = Client("http://api.test", 158, "KEY", SECRET, transport=httpx.MockTransport(handler))
    started = time.monotonic()
    with pytest.raises(WaitTimeout) as caught:
        api.wait(7, interval=0.02, timeout=0.1)
    assert 0.1 <= time.monotonic() - started < 2
    assert caught.value.record.state == "running" and caught.value.request_id == 7
    assert isinstance(caught.value, TimeoutError)
    assert "request 7 not finished after 0.1 s: running (Uploading)" in str(caught.value)
    with pytest.raises(ValueError, match="interval"):
        api.wait(7, interval=0)
    empty = Client("http://api.test", 158, "KEY", SECRET,
                   transport=httpx.MockTransport(lambda r: ok([])))  # fmt: skip
    with pytest.raises(RequestNotFound):
        empty.wait(99)


def test_async_wait_awaits_a_coroutine_progress_and_warnings_are_kept() -> None:
    states = list(PROGRESS)

    def handler(request: httpx.Request) -> httpx.Response:
        fields = states.pop(0)
        body = {"status": "success", "message": "ok", "data": [record(**fields)],
                "warnings": ["unknown field: colour"]}  # fmt: skip
        return httpx.Response(200, json=body)

    shown: list[tuple[str | None, datetime | None]] = []

    async def progress(r: StatusRecord) -> None:
        await asyncio.sleep(0)
        shown.append((r.state, r.last_updated))

    async def run() -> StatusRecord:
        async with async_client(handler) as api:
            with pytest.warns(ApiWarning, match="colour"):
                final = await api.wait(7, interval=0.01, timeout=60, progress=progress)
            assert api.last_warnings == ["unknown field: colour"]
            return final

    final = asyncio.run(run())
    assert final.succeeded and [s for s, _ in shown] == ["queued", "running", "running",
                                                         "succeeded"]  # fmt: skip
    assert shown[0][1] == datetime(2026, 1, 1, 0, 0, 1, tzinfo=UTC)
    assert final.last_updated - final.created == timedelta(seconds=1)
