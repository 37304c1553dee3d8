"""vodpush.client and `vodpush client`: unit tests on httpx.MockTransport, then the real
thing against a live server (and, for `wait`, a worker uploading to a moto S3 server)."""

from __future__ import annotations

import io
import itertools
import json
import os
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import httpx
import pytest
from rich.console import Console

import vodpush.client as client_module
import vodpush_client
from tests.conftest import MiB, s3_client
from tests.test_worker import run_worker
from vodpush.callbacks.payload import build_delivery
from vodpush.cli import main
from vodpush.client import (
    ApiError,
    Client,
    FiltersUnsupported,
    RequestNotFound,
    StatusRecord,
    TransportError,
    WebhookVerificationError,
    disposition_header,
    verify_callback,
)
from vodpush.client_cli import follow
from vodpush.protocol.signing import split_signed_request, verify
from vodpush.webhooks import sign

SECRET = "s3cr3t" * 8
ENVELOPE = ("command", "api_key", "timestamp", "cdn", "signature")


# -- helpers ------------------------------------------------------------------------------


def ok(data: Any) -> httpx.Response:
    return httpx.Response(
        200, json={"status": "success", "message": "ok", "handle_time": 0.001, "data": data}
    )


def fail(code: str, message: str) -> httpx.Response:
    return httpx.Response(
        200, json={"status": "failure", "code": code, "message": message, "handle_time": 0.001}
    )


def json_field(request: httpx.Request) -> str:
    assert request.headers["content-type"] == "application/x-www-form-urlencoded"
    (value,) = parse_qs(request.content.decode())["json"]
    return value


class Clock:
    """A controllable time.time for signing, advanced by the fake sleep."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds + 1  # each retry is signed at a later second


def mock_client(handler: Callable[[httpx.Request], httpx.Response], **kwargs: Any) -> Client:
    clock = kwargs.pop("clock", None) or Clock()
    return Client(
        "http://api.test",
        158,
        "KEY",
        SECRET,
        transport=httpx.MockTransport(handler),
        sleep=clock.sleep,
        clock=clock,
        **kwargs,
    )


def record(**overrides: Any) -> dict[str, Any]:
    """An aws.status entry as vodpush sends it."""
    base = {
        "id": 7,
        "cdn_id": 158,
        "path": "sestore1/jb/a.mp4",
        "destination_path": "shows/a.mp4",
        "metadata": {"title": "Café / Crème"},
        "acl": "private",
        "callback": "",
        "message": "Queued",
        "results": {"Bucket": "", "ETag": ""},
        "created": "2026-01-01 00:00:00",
        "last_updated": "2026-01-01 00:00:01",
        "status": 0,
        "bucket": "b",
        "state": "queued",
        "next_attempt_at": "",
        "attempts": 0,
        "bytes_done": 0,
        "bytes_total": None,
        "sha256": None,
        "error_code": None,
        "callback_state": None,
        "callback_attempts": 0,
        "callback_error": None,
    }
    return {**base, **overrides}


# -- signing and the wire -----------------------------------------------------------------


def test_requests_are_signed_like_php_and_sent_as_urlencoded_json_field() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return ok({"id": 41})

    api = mock_client(handler)
    request_id = api.upload(
        "sestore1/jb/a.mp4", "shows/café.mp4", "b", "private", metadata={"path": "a/b"}
    )
    assert request_id == 41
    (request,) = seen
    assert request.method == "POST" and str(request.url) == "http://api.test/stable/"
    text = json_field(request)
    # PHP json_encode: '/' escaped, non-ASCII as \u escapes, signature the last member.
    assert "shows\\/caf\\u00e9.mp4" in text
    assert list(json.loads(text))[-1] == "signature"
    signed = split_signed_request(text)
    assert verify(signed, SECRET)
    assert not verify(signed, SECRET + "x")
    assert signed.payload == {
        "command": "aws.upload",
        "api_key": "KEY",
        "timestamp": 1_700_000_000,
        "cdn": 158,
        "path": "sestore1/jb/a.mp4",
        "destination_path": "shows/café.mp4",
        "bucket": "b",
        "acl": "private",
        "callback": "",
        "metadata": {"path": "a/b"},
    }


def test_status_sends_limit_offset_and_id_and_returns_records() -> None:
    payloads: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        payloads.append(split_signed_request(json_field(request)).payload)
        return ok([record()])

    api = mock_client(handler)
    (one,) = api.status(limit=5, offset=10)
    assert isinstance(one, StatusRecord) and one.id == 7
    assert api.get(7).metadata == {"title": "Café / Crème"}
    assert payloads[0]["command"] == "aws.status"
    assert (payloads[0]["limit"], payloads[0]["offset"], "id" in payloads[0]) == (5, 10, False)
    assert payloads[1]["id"] == 7


def test_url_without_path_means_stable_endpoint() -> None:
    def make(url: str) -> str:
        return Client(url, 1, "k", "s").url

    assert make("http://127.0.0.1:8080") == "http://127.0.0.1:8080/stable/"
    assert make("https://h/") == "https://h/stable/"
    assert make("https://h/dev/") == "https://h/dev/"
    with pytest.raises(ValueError):
        make("ftp://h/")
    with pytest.raises(ValueError):
        Client("http://h", 1, "k", "")


def test_repr_hides_the_secret() -> None:
    assert SECRET not in repr(mock_client(lambda r: ok([])))


# -- errors and retries -------------------------------------------------------------------


def test_api_failure_raises_api_error_with_code_and_is_not_retried() -> None:
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return fail("0003", "HMAC-SHA256 signature does not match")

    with pytest.raises(ApiError) as caught:
        mock_client(handler).status()
    assert caught.value.code == "0003"
    assert caught.value.message == "HMAC-SHA256 signature does not match"
    assert str(caught.value) == "HMAC-SHA256 signature does not match (code 0003)"
    assert len(calls) == 1


def test_status_retries_connect_errors_and_5xx_signing_each_attempt_afresh() -> None:
    bodies: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(json_field(request))
        if len(bodies) == 1:
            raise httpx.ConnectError("connection refused")
        if len(bodies) == 2:
            return httpx.Response(503, text="busy")
        return ok([record()])

    clock = Clock()
    assert [r.id for r in mock_client(handler, clock=clock).status()] == [7]
    assert clock.sleeps == [0.25, 0.5]
    # A read-only command may be re-signed: each attempt carries a fresh timestamp.
    timestamps = [split_signed_request(b).payload["timestamp"] for b in bodies]
    assert timestamps == sorted(set(timestamps)) and len(timestamps) == 3


def test_status_gives_up_after_the_retries() -> None:
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(502, text="<html>bad gateway</html>")

    with pytest.raises(TransportError) as caught:
        mock_client(handler, retries=3).status()
    assert caught.value.status_code == 502
    assert "HTTP 502" in str(caught.value)
    assert len(calls) == 4


def test_upload_is_retried_only_with_the_identical_signed_body() -> None:
    bodies: list[bytes] = []

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(request.content)
        if len(bodies) == 1:
            raise httpx.ReadTimeout("no answer")  # the server may have queued it
        if len(bodies) == 2:
            return httpx.Response(502)
        return ok({"id": 5})

    clock = Clock()
    assert mock_client(handler, clock=clock).upload("p", "d", "b", "private") == 5
    assert len(bodies) == 3
    # Same bytes, same signature, although the clock moved on: the server deduplicates it.
    assert bodies[0] == bodies[1] == bodies[2]
    assert clock.now > 1_700_000_000 + 1


def test_upload_is_not_resent_once_its_timestamp_grows_old() -> None:
    calls = []
    clock = Clock()

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        clock.now += 61  # the first attempt hung until near the end of its time
        raise httpx.ReadTimeout("no answer")

    with pytest.raises(TransportError, match="timed out"):
        mock_client(handler, clock=clock).upload("p", "d", "b", "private")
    assert len(calls) == 1


def test_upload_sends_the_object_options_and_key_only_when_given() -> None:
    seen: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(split_signed_request(json_field(request)).payload)
        return ok({"id": 1})

    api = mock_client(handler)
    api.upload("p", "d", "b", "bucket-default")
    api.upload(
        "p",
        "d",
        "b",
        "private",
        idempotency_key="k-1",
        content_type="video/mp4",
        storage_class="GLACIER",
        tags={"show": "x", "n": 2},
        cache_control="max-age=60",
        content_disposition="inline",
    )
    plain, full = seen
    assert set(plain) == {"command", "api_key", "timestamp", "cdn", "path",
                          "destination_path", "bucket", "acl", "callback"}  # fmt: skip
    assert plain["acl"] == "bucket-default"
    assert {k: full[k] for k in set(full) - set(plain)} == {
        "idempotency_key": "k-1",
        "content_type": "video/mp4",
        "storage_class": "GLACIER",
        "tags": {"show": "x", "n": 2},
        "cache_control": "max-age=60",
        "content_disposition": "inline",
    }


def test_an_upload_with_an_idempotency_key_is_signed_afresh_once_its_body_grows_old() -> None:
    """Past the 60 s in which the same body is resent, the key keeps a retry safe: the next
    attempt carries a new timestamp and signature, and the same key and fields."""
    bodies: list[str] = []
    clock = Clock()

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(json_field(request))
        if len(bodies) == 1:
            clock.now += 61  # the first attempt hung until near the end of its time
            raise httpx.ReadTimeout("no answer")
        return ok({"id": 9})

    api = mock_client(handler, clock=clock)
    assert api.upload("p", "d", "b", "private", idempotency_key="k") == 9
    first, second = (split_signed_request(body).payload for body in bodies)
    assert second["timestamp"] > first["timestamp"] + 60
    assert {**second, "timestamp": 0} == {**first, "timestamp": 0}


def test_disposition_header_names_any_file_as_rfc_6266_says() -> None:
    assert disposition_header("clip.mp4") == 'attachment; filename="clip.mp4"'
    assert disposition_header("a b.mp4", inline=True) == 'inline; filename="a b.mp4"'
    assert disposition_header("Café Crème.mp4") == (
        "attachment; filename=\"Cafe Creme.mp4\"; filename*=UTF-8''Caf%C3%A9%20Cr%C3%A8me.mp4"
    )
    assert disposition_header('say "hi"\\.mp4') == (
        "attachment; filename=\"say _hi__.mp4\"; filename*=UTF-8''say%20%22hi%22%5C.mp4"
    )
    assert disposition_header("東京.mp4") == (
        "attachment; filename=\"__.mp4\"; filename*=UTF-8''%E6%9D%B1%E4%BA%AC.mp4"
    )


def test_errors_that_a_retry_cannot_fix_are_not_retried() -> None:
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        raise httpx.ProxyError("proxy refused the tunnel")

    with pytest.raises(TransportError, match="proxy refused"):
        mock_client(handler).status()
    assert len(calls) == 1


def test_busy_code_1000_is_retried() -> None:
    answers = [fail("1000", "too busy"), ok({"id": 3})]
    assert mock_client(lambda r: answers.pop(0)).upload("p", "d", "b", "private") == 3


def test_busy_code_1000_with_a_long_retry_after_is_not_retried() -> None:
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        answer = fail("1000", "redelivered 5 times in the past hour")
        return httpx.Response(200, json={**json.loads(answer.content), "retry_after": 1800})

    with pytest.raises(ApiError) as refused:
        mock_client(handler).redeliver(7)
    assert refused.value.code == "1000" and len(calls) == 1
    short = [httpx.Response(200, json={**json.loads(fail("1000", "busy").content),
                                       "retry_after": 0.1}), ok({"id": 3})]  # fmt: skip
    assert mock_client(lambda r: short.pop(0)).upload("p", "d", "b", "private") == 3


def test_http_4xx_is_a_transport_error_and_not_retried() -> None:
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(
            400, json={"status": "failure", "code": "0006", "message": "the json field is empty"}
        )

    with pytest.raises(TransportError) as caught:
        mock_client(handler).status()
    assert caught.value.status_code == 400
    assert "the json field is empty" in str(caught.value)
    assert len(calls) == 1


@pytest.mark.parametrize("body", [b"<html>proxy</html>", b'{"unexpected": true}', b"[]"])
def test_a_200_without_envelope_is_a_transport_error(body: bytes) -> None:
    with pytest.raises(TransportError, match="did not answer with an API envelope"):
        mock_client(lambda r: httpx.Response(200, content=body)).status()


def test_unexpected_data_shapes_are_transport_errors() -> None:
    with pytest.raises(TransportError, match="without an id"):
        mock_client(lambda r: ok([])).upload("p", "d", "b", "private")
    with pytest.raises(TransportError, match="not a list"):
        mock_client(lambda r: ok({"id": 1})).status()


@pytest.mark.integration  # opens its own sockets
def test_a_server_that_never_answers_times_out() -> None:
    # A real socket that accepts and stays silent: the timeout must end the call.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]
    try:
        api = Client(f"http://127.0.0.1:{port}", 1, "k", "s", timeout=0.3, retries=1, backoff=0)
        started = time.monotonic()
        with pytest.raises(TransportError, match="timed out"):
            api.status()
        assert time.monotonic() - started < 3
    finally:
        listener.close()


def test_callbacks_reads_the_history_and_tolerates_odd_values() -> None:
    sent: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(json.loads(json_field(request)))
        return ok(
            {
                "id": "7",
                "state": "succeeded",
                "callback": "https://hooks.example/x",
                "callback_state": "delivered",
                "callback_attempts": 1,
                "next_attempt_at": "",
                "webhook_id": "msg_2",
                "callback_error": None,
                "redeliveries": 1,
                "last_redelivered": "2026-01-01 00:10:00",
                "total": 3,
                "attempts": [
                    {"at": "2026-01-01 00:10:01", "ok": True, "http_status": 204,
                     "error": None, "duration": 0.012},
                    {"at": "2026-01-01 00:00:02", "ok": False, "http_status": None,
                     "error": "timed out after 10 s", "duration": True},
                    "not an attempt",
                ],
                "future_field": 1,
            }
        )  # fmt: skip

    history = mock_client(handler).callbacks(7)
    assert sent[0]["command"] == "aws.callbacks" and sent[0]["id"] == 7
    assert (history.id, history.callback_state, history.webhook_id, history.total) == (
        7,
        "delivered",
        "msg_2",
        3,
    )
    assert [(a.ok, a.http_status, a.error, a.duration) for a in history.attempts] == [
        (True, 204, None, 0.012),
        (False, None, "timed out after 10 s", None),
    ]
    as_dict = history.to_dict()
    assert as_dict["attempts"][0] == {
        "at": "2026-01-01 00:10:01",
        "ok": True,
        "http_status": 204,
        "error": None,
        "duration": 0.012,
    }
    assert json.loads(json.dumps(as_dict))["redeliveries"] == 1
    with pytest.raises(TransportError, match="not an object"):
        mock_client(lambda r: ok([])).callbacks(7)


def test_redeliver_is_retried_only_with_the_identical_signed_body() -> None:
    bodies: list[bytes] = []

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(request.content)
        if len(bodies) == 1:
            raise httpx.ReadTimeout("no answer")  # the server may have made it
        data = {"id": 7, "callback_state": "pending", "webhook_id": "msg_r"}
        return ok({**data, "next_attempt_at": "2026-01-01 00:00:00"})

    done = mock_client(handler).redeliver(7)
    assert len(bodies) == 2 and bodies[0] == bodies[1]  # the server recognises the repeat
    (text,) = parse_qs(bodies[0].decode())["json"]
    assert json.loads(text)["command"] == "aws.redeliver"
    assert (done.id, done.callback_state, done.webhook_id) == (7, "pending", "msg_r")
    refused = mock_client(lambda r: fail("0007", "invalid id: no such request"))
    with pytest.raises(ApiError) as error:
        refused.redeliver(7)
    assert (error.value.code, error.value.message) == ("0007", "invalid id: no such request")


def test_get_of_an_unknown_id_raises_request_not_found() -> None:
    with pytest.raises(RequestNotFound) as caught:
        mock_client(lambda r: ok([])).get(99)
    assert caught.value.request_id == 99
    assert isinstance(caught.value, LookupError)


# -- records ------------------------------------------------------------------------------


def test_status_record_reads_every_field_and_round_trips() -> None:
    data = record(results={"Bucket": "b", "ETag": '"e"'}, unknown_future_field=[1])
    parsed = StatusRecord.from_api(data)
    assert parsed.results == {"Bucket": "b", "ETag": '"e"'}
    assert parsed.state == "queued" and parsed.bytes_total is None
    assert parsed.extra == {"unknown_future_field": [1]}
    assert parsed.to_dict() == data
    with pytest.raises(AttributeError):
        parsed.id = 8  # type: ignore[misc]
    assert hash(parsed) == hash(StatusRecord.from_api(data))


def test_status_record_reads_the_options_only_when_sent() -> None:
    options = {"storage_class": "GLACIER", "tags": {"a": "b"}}
    parsed = StatusRecord.from_api(record(options=options))
    assert parsed.options == options and parsed.extra == {}
    assert parsed.to_dict() == record(options=options)
    bare = StatusRecord.from_api(record())
    assert bare.options is None and "options" not in bare.to_dict()


def test_status_record_tolerates_a_reference_server_record() -> None:
    # The shape on the reference page: no extras, metadata as a string, status null.
    data = {
        "id": "1",
        "cdn_id": 158,
        "path": "sestore1/jb/path/to/file.mp4",
        "destination_path": "path/to/file.mp4",
        "metadata": "{}",
        "acl": "private",
        "callback": "",
        "message": "Successfully Uploaded to AWS",
        "results": {"ServerSideEncryption": "AES256"},
        "created": "2018-01-01 00:00:00",
        "last_updated": "2018-01-01 1:00:00",
        "status": None,
    }
    parsed = StatusRecord.from_api(data)
    assert (parsed.id, parsed.metadata, parsed.status, parsed.state) == (1, {}, 0, None)
    assert parsed.succeeded and parsed.finished and not parsed.failed
    assert parsed.to_dict()["state"] is None
    assert StatusRecord.from_api({**data, "metadata": []}).metadata == {}
    assert StatusRecord.from_api({"id": 2}).path == ""


@pytest.mark.parametrize(
    ("fields", "succeeded", "failed"),
    [
        ({"state": "queued"}, False, False),
        ({"state": "running", "message": "Uploading"}, False, False),
        ({"state": "succeeded", "status": 200}, True, False),
        ({"state": "failed", "status": 404}, False, True),
        ({"state": "queued", "status": 503, "message": "Retrying in 1 s"}, False, False),
    ],
)
def test_status_record_outcome(fields: dict[str, Any], succeeded: bool, failed: bool) -> None:
    parsed = StatusRecord.from_api(record(**fields))
    assert (parsed.succeeded, parsed.failed, parsed.finished) == (
        succeeded,
        failed,
        succeeded or failed,
    )


def test_iter_status_pages_by_keyset_and_sends_the_filters() -> None:
    ids = list(range(7, 0, -1))  # newest first, as the server lists them
    pages: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        payload = split_signed_request(json_field(request)).payload
        pages.append({k: v for k, v in payload.items() if k not in ENVELOPE})
        if len(pages) == 2:
            ids[:0] = [9, 8]  # two new requests arrive: they change nothing below the cursor
        below = [i for i in ids if payload.get("after_id") is None or i < payload["after_id"]]
        answer = {"data": [record(id=i) for i in below[: payload["limit"]]]}
        if set(payload) - {*ENVELOPE, "limit", "offset", "id"}:  # beyond the reference API
            answer["total"] = len(ids)
        return httpx.Response(200, json={"status": "success", "message": "ok", **answer})

    api = mock_client(handler)
    seen = [r.id for r in api.iter_status(page_size=3, state=["failed"], bucket="b")]
    assert seen == [7, 6, 5, 4, 3, 2, 1]
    filters = {"state": ["failed"], "bucket": "b"}
    assert pages == [
        {"limit": 3, "offset": 0, **filters},
        {"limit": 3, "offset": 0, **filters, "after_id": 5},
        {"limit": 3, "offset": 0, **filters, "after_id": 2},
    ]
    with pytest.raises(ValueError):
        next(mock_client(handler).iter_status(page_size=0))


def test_iter_status_pages_by_offset_on_a_server_without_after_id() -> None:
    ids = list(range(7, 0, -1))
    pages: list[tuple[int, int, int | None]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        payload = split_signed_request(json_field(request)).payload
        limit, offset = payload["limit"], payload["offset"]
        pages.append((limit, offset, payload.get("after_id")))
        if len(pages) == 3:
            ids[:0] = [9, 8]  # two new requests push every older one two places down
        return ok([record(id=i) for i in ids[offset : offset + limit]])  # no total

    seen = [r.id for r in mock_client(handler).iter_status(page_size=3)]
    assert seen == [7, 6, 5, 4, 3, 2, 1]
    # The keyset page comes back without total: offsets from there on.
    assert pages == [(3, 0, None), (3, 0, 5), (3, 3, None), (3, 6, None), (3, 9, None)]
    # Filters cannot be asked of such a server: refused, never answered unfiltered.
    with pytest.raises(FiltersUnsupported) as refused:
        list(mock_client(handler).iter_status(state="failed"))
    assert "ignored state" in str(refused.value)


# -- callbacks ----------------------------------------------------------------------------


def test_verify_callback_accepts_a_signed_body_and_refuses_a_changed_one() -> None:
    body = json.dumps(record(state="succeeded")).encode()
    headers = sign(SECRET, "msg_1", time.time(), body)
    verify_callback(SECRET, headers, body)
    assert StatusRecord.from_api(json.loads(body)).succeeded
    with pytest.raises(WebhookVerificationError):
        verify_callback(SECRET, headers, body + b" ")
    with pytest.raises(WebhookVerificationError):
        verify_callback("other", headers, body)


@pytest.mark.integration  # opens its own sockets
def test_the_readme_receiver_verifies_a_real_callback() -> None:
    # The receiver of the README, with the server's own callback signer on the other end.
    received: list[StatusRecord] = []

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            try:
                verify_callback(SECRET, self.headers, body)
            except WebhookVerificationError:
                return self.send_error(400)
            received.append(StatusRecord.from_api(json.loads(body)))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/hook"
    try:
        entry = record(state="succeeded", message="Successfully Uploaded to AWS", status=200)
        delivery = build_delivery(entry, SECRET, "msg_1", time.time())
        sent = httpx.post(url, content=delivery.body, headers=dict(delivery.headers))
        assert sent.status_code == 204
        forged = httpx.post(
            url, content=delivery.body.replace(b"jb", b"xx"), headers=dict(delivery.headers)
        )
        assert forged.status_code == 400
    finally:
        server.shutdown()
        server.server_close()
    assert [r.to_dict() for r in received] == [entry]


def test_the_old_import_path_is_the_client_distributions_api() -> None:
    # vodpush.client stays importable: the same names, the same objects as vodpush_client
    # (whose list is pinned in tests/test_client_package.py).
    assert client_module.__all__ == vodpush_client.__all__
    for name in vodpush_client.__all__:
        assert getattr(client_module, name) is getattr(vodpush_client, name)


# -- against a live server ----------------------------------------------------------------


def put_file(sestore_root: Path, rel: str, data: bytes) -> str:
    path = sestore_root / "sestore1" / "jb" / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return f"sestore1/jb/{rel}"


def live_client(server: Any, creds: Any, **kwargs: Any) -> Client:
    return Client(server.url, creds.cdn, creds.api_key, creds.api_secret, **kwargs)


METADATA = {"title": "Café / Crème", "path": "a/b/c", "emoji": "🎬"}


def test_upload_status_and_get_over_http(live_server, account, sestore_root) -> None:
    path = put_file(sestore_root, "dir/vidéo.mp4", b"x" * 10)
    with live_client(live_server, account) as api:
        request_id = api.upload(
            path,
            "shows/2026/vidéo.mp4",
            "my-bucket",
            "public-read",
            metadata=METADATA,
            callback="www.example.com/hook",
        )
        got = api.get(request_id)
        (listed,) = api.status()
    assert got == listed
    assert got.id == request_id and got.cdn_id == account.cdn
    assert got.metadata == METADATA
    assert (got.path, got.destination_path, got.acl) == (
        path,
        "shows/2026/vidéo.mp4",
        "public-read",
    )
    assert got.callback == "www.example.com/hook"
    assert (got.message, got.state, got.status, got.bucket) == ("Queued", "queued", 0, "my-bucket")
    assert set(got.results) >= {"Bucket", "ETag", "ObjectURL", "VersionId"}
    assert got.extra == {}  # the client knows every field the server sends


def test_iter_status_and_limits_over_http(live_server, account, sestore_root) -> None:
    path = put_file(sestore_root, "a.mp4", b"a")
    with live_client(live_server, account) as api:
        ids = [api.upload(path, f"k{i}.mp4", "my-bucket", "private") for i in range(5)]
        assert [r.id for r in api.iter_status(page_size=2)] == ids[::-1]
        assert [r.id for r in api.status(limit=2, offset=1)] == ids[3:1:-1]
        with pytest.raises(RequestNotFound):
            api.get(ids[-1] + 100)


def test_api_errors_over_http(live_server, account, sestore_root) -> None:
    path = put_file(sestore_root, "a.mp4", b"a")
    wrong = Client(live_server.url, account.cdn, account.api_key, "f" * 64)
    with pytest.raises(ApiError) as caught:
        wrong.status()
    assert caught.value.code == "0003"
    with pytest.raises(ApiError) as caught:
        Client(live_server.url, account.cdn, "nobody", "x").status()
    assert caught.value.code == "0001"
    with pytest.raises(ApiError) as caught:
        live_client(live_server, account).upload(path, "k.mp4", "my-bucket", "public")
    assert caught.value.code == "0007" and "acl" in caught.value.message


def test_upload_options_and_idempotency_key_over_http(live_server, account, sestore_root) -> None:
    path = put_file(sestore_root, "o.mp4", b"o")
    options = {
        "content_type": "video/mp4",
        "storage_class": "GLACIER",
        "tags": {"show": "Café", "season": "2"},
        "cache_control": "max-age=60",
        "content_disposition": disposition_header("café.mp4"),
    }
    args = (path, "o.mp4", "my-bucket", "bucket-default")
    with live_client(live_server, account) as api:
        request_id = api.upload(*args, idempotency_key="order-7", **options)
        got = api.get(request_id)
        with pytest.raises(ApiError) as caught:
            api.upload(*args, idempotency_key="order-7", **{**options, "storage_class": "STANDARD"})
    assert caught.value.code == "0007"
    assert caught.value.message.startswith("invalid idempotency_key: ")
    # Signed seconds earlier (another signature): the key gives the first id back.
    with live_client(live_server, account, clock=lambda: time.time() - 5) as api:
        assert api.upload(*args, idempotency_key="order-7", **options) == request_id
        assert [r.id for r in api.status()] == [request_id]
    assert got.acl == "bucket-default"
    assert got.options == options
    assert got.extra == {}


def test_cli_upload_with_object_options(client_env, sestore_root, capsys) -> None:
    path = put_file(sestore_root, "c/opt.mp4", b"c")
    argv = ["client", "upload", path, "shows/opt.mp4", "--bucket", "my-bucket"]
    argv += ["--acl", "bucket-default", "--storage-class", "STANDARD_IA"]
    argv += ["--tag", "show=Café Crème", "--tag", "season=2", "--content-type", "video/mp4"]
    argv += ["--cache-control", "max-age=60", "--download-name", "Café.mp4"]
    argv += ["--idempotency-key", "cli-1"]
    assert main(argv) == 0
    request_id = int(capsys.readouterr().out.strip())
    assert main(["client", "status", "--json", "--id", str(request_id)]) == 0
    (entry,) = json.loads(capsys.readouterr().out)
    assert entry["acl"] == "bucket-default"
    assert entry["options"] == {
        "content_type": "video/mp4",
        "storage_class": "STANDARD_IA",
        "tags": {"show": "Café Crème", "season": "2"},
        "cache_control": "max-age=60",
        "content_disposition": disposition_header("Café.mp4"),
    }
    # The key with other fields: the API's refusal, as one error line.
    assert main([*argv[:-2], "--idempotency-key", "cli-1", "--tag", "x=y"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: invalid idempotency_key: ") and "(code 0007)" in err
    # Choices and shapes the CLI checks itself.
    base = ["client", "upload", "p", "d", "--bucket", "b", "--acl", "private"]
    assert main([*base, "--storage-class", "glacier"]) == 2
    assert "'glacier' is not one of" in capsys.readouterr().err
    assert main([*base, "--tag", "novalue"]) == 2
    assert "'--tag'" in capsys.readouterr().err
    assert main([*base, "--download-name", "a", "--content-disposition", "inline"]) == 2
    assert "not both" in capsys.readouterr().err


class LoseFirstAnswer(httpx.HTTPTransport):
    """Delivers the first request to the server, then drops its answer (a read timeout)."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[bytes] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.sent.append(request.read())
        response = super().handle_request(request)
        if len(self.sent) == 1:
            response.read()
            response.close()
            raise httpx.ReadTimeout("answer lost", request=request)
        return response


def test_a_lost_upload_answer_is_resent_and_queues_once(live_server, account, sestore_root):
    path = put_file(sestore_root, "a.mp4", b"a")
    transport = LoseFirstAnswer()
    # Every reading of the clock is 2 s later: a re-signed resend would differ (and queue a
    # second upload); the identical resend is recognised by the server.
    ticks = itertools.count()

    def clock() -> float:
        return time.time() + 2 * next(ticks)

    with live_client(live_server, account, transport=transport, backoff=0, clock=clock) as api:
        request_id = api.upload(path, "once.mp4", "my-bucket", "private")
        assert [r.id for r in api.status()] == [request_id]
    assert len(transport.sent) == 3  # upload, its resend, status
    assert transport.sent[0] == transport.sent[1]


# -- the CLI ------------------------------------------------------------------------------


@pytest.fixture
def client_env(monkeypatch, live_server, account) -> Any:
    monkeypatch.setenv("VODPUSH_URL", live_server.url + "/stable/")
    monkeypatch.setenv("VODPUSH_CDN", str(account.cdn))
    monkeypatch.setenv("VODPUSH_API_KEY", account.api_key)
    monkeypatch.setenv("VODPUSH_API_SECRET", account.api_secret)
    return account


def test_cli_upload_and_status(client_env, sestore_root, capsys, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # rich folds long cells on narrow terminals
    path = put_file(sestore_root, "c/clip.mp4", b"c")
    argv = ["client", "upload", path, "shows/clip.mp4", "--bucket", "my-bucket"]
    argv += ["--acl", "private", "--metadata", "title=Café / Crème", "--metadata", "path=a/b"]
    assert main(argv) == 0
    request_id = int(capsys.readouterr().out.strip())

    assert main(["client", "status", "--json", "--id", str(request_id)]) == 0
    (entry,) = json.loads(capsys.readouterr().out)
    assert entry["id"] == request_id
    assert entry["metadata"] == {"title": "Café / Crème", "path": "a/b"}
    assert entry["state"] == "queued"

    assert main(["client", "status", "--limit", "5"]) == 0
    table = capsys.readouterr().out
    assert str(request_id) in table and "Queued" in table and "my-bucket/shows/clip.mp4" in table


def test_cli_flags_override_the_environment(client_env, capsys, monkeypatch) -> None:
    monkeypatch.setenv("VODPUSH_API_SECRET", "wrong")
    assert main(["client", "status", "--api-secret", client_env.api_secret, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_cli_api_failure_is_one_error_line_with_the_code(client_env, capsys) -> None:
    assert main(["client", "status", "--api-secret", "f" * 64]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("error: HMAC-SHA256 signature does not match")
    assert captured.err.rstrip().endswith("(code 0003)")
    assert "Traceback" not in captured.err and len(captured.err.splitlines()) == 1


@pytest.mark.integration  # opens its own sockets
def test_cli_user_errors(capsys, monkeypatch) -> None:
    for name in ("VODPUSH_URL", "VODPUSH_CDN", "VODPUSH_API_KEY", "VODPUSH_API_SECRET"):
        monkeypatch.delenv(name, raising=False)
    assert main(["client", "status", "--url", "http://127.0.0.1:9/"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: missing --cdn (or VODPUSH_CDN), --api-key (or VODPUSH_API_KEY)")

    # Nothing listens on port 9 (discard) on loopback: a transport error, cleanly reported.
    argv = ["client", "status", "--url", "http://127.0.0.1:9/", "--cdn", "1"]
    argv += ["--api-key", "k", "--api-secret", "s", "--timeout", "1"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: cannot reach http://127.0.0.1:9/stable/")
    assert "Traceback" not in err

    argv = ["client", "upload", "p", "d", "--bucket", "b", "--acl", "private"]
    assert main([*argv, "--metadata", "no-equals-sign", "--url", "http://h"]) == 2
    assert "is not KEY=VALUE" in capsys.readouterr().err


def scripted_poll(states: list[dict[str, Any]]) -> Callable[[], StatusRecord]:
    records = [StatusRecord.from_api(record(**fields)) for fields in states]
    return lambda: records.pop(0)


def uploading(done: int) -> dict[str, Any]:
    return {"state": "running", "message": "Uploading", "bytes_done": done, "bytes_total": 10 * MiB}


def test_follow_draws_bytes_rate_and_time_left_on_a_terminal() -> None:
    clock = Clock(now=0.0)
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=160, color_system=None)
    poll = scripted_poll(
        [
            {"state": "queued", "message": "Queued"},
            uploading(0),
            uploading(2 * MiB),
            uploading(6 * MiB),
            {
                "state": "succeeded",
                "message": "Successfully Uploaded to AWS",
                "status": 200,
                "bytes_done": 10 * MiB,
                "bytes_total": 10 * MiB,
            },
        ]
    )
    final = follow(
        poll, label="request 7", interval=1, console=console, sleep=clock.sleep, get_time=clock
    )
    assert final.succeeded
    assert clock.sleeps == [1, 1, 1, 1]
    frames = out.getvalue()
    assert "request 7: Queued" in frames
    assert "request 7: Uploading" in frames
    # 4 MiB between two polls 2 s apart (the fake sleep adds a second): 2.1 MB/s, 2 s left.
    assert "6.3/10.5 MB 2.1 MB/s 0:00:02" in frames
    assert "10.5/10.5 MB" in frames


def test_follow_prints_one_line_per_message_off_a_terminal() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=False, width=40)
    long = "Retrying in 1 s after attempt 1 of 3: SlowDown: Please reduce your request rate"
    poll = scripted_poll(
        [
            {"state": "queued", "message": "Queued"},
            {"state": "queued", "message": "Queued"},
            {"state": "queued", "message": long, "status": 503},
            {"state": "failed", "message": "Upload failed: [NoSuchBucket] gone", "status": 404},
        ]
    )
    final = follow(poll, label="request 7", interval=0.1, console=console, sleep=lambda s: None)
    assert final.failed
    assert out.getvalue().splitlines() == [
        "request 7: Queued",
        f"request 7: {long}",  # never wrapped, even on a narrow console
        "request 7: Upload failed: [NoSuchBucket] gone",  # brackets are not rich markup
    ]


# -- `vodpush client wait` against a real upload ------------------------------------------


def wait_for(argv: list[str], service: Any) -> int:
    """Run `vodpush client wait` while a worker drains the queue in a background thread."""
    worker = threading.Thread(target=run_worker, args=(service,), daemon=True)
    worker.start()
    try:
        return main(argv)
    finally:
        worker.join(60)


def test_wait_follows_an_upload_to_success(
    live_server, service, s3_account, s3, bucket, sestore_root, capsys, monkeypatch
) -> None:
    data = os.urandom(11 * MiB)
    path = put_file(sestore_root, "big.mp4", data)
    with live_client(live_server, s3_account) as api:
        request_id = api.upload(path, "shows/big.mp4", bucket, "private", metadata=METADATA)
    env = {
        "VODPUSH_URL": live_server.url,
        "VODPUSH_CDN": str(s3_account.cdn),
        "VODPUSH_API_KEY": s3_account.api_key,
        "VODPUSH_API_SECRET": s3_account.api_secret,
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)

    code = wait_for(["client", "wait", str(request_id), "--interval", "0.1"], service)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.out.splitlines()[-1] == f"request {request_id}: Successfully Uploaded to AWS"
    # Off a terminal, each new status message is a line on stderr, in order.
    messages = [line.split(": ", 1)[1] for line in captured.err.splitlines()]
    assert messages[-1] == "Successfully Uploaded to AWS"
    # "Finishing": the last S3 call (CompleteMultipartUpload) is under way.
    assert set(messages) <= {"Queued", "Uploading", "Finishing", "Successfully Uploaded to AWS"}
    assert len(messages) == len(set(messages))
    obj = s3_client(s3).get_object(Bucket=bucket, Key="shows/big.mp4")
    assert obj["Body"].read() == data


def test_wait_draws_a_progress_bar_on_a_terminal(
    live_server, service, s3_account, bucket, sestore_root, capsys, monkeypatch
) -> None:
    path = put_file(sestore_root, "bar.mp4", os.urandom(11 * MiB))
    with live_client(live_server, s3_account) as api:
        request_id = api.upload(path, "bar.mp4", bucket, "private")
    monkeypatch.setenv("TTY_COMPATIBLE", "1")  # rich: treat the captured stderr as a terminal
    monkeypatch.setenv("COLUMNS", "160")
    argv = ["client", "wait", str(request_id), "--interval", "0.05", "--url", live_server.url]
    argv += ["--cdn", str(s3_account.cdn), "--api-key", s3_account.api_key]
    argv += ["--api-secret", s3_account.api_secret]
    code = wait_for(argv, service)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    # The live display (cleared at the end) showed the request and its bytes.
    assert f"request {request_id}: " in captured.err
    assert "11.5/11.5 MB" in captured.err
    assert captured.out.splitlines()[-1] == f"request {request_id}: Successfully Uploaded to AWS"


def test_wait_reports_a_failed_upload(
    live_server, service, s3_account, sestore_root, capsys, monkeypatch
) -> None:
    path = put_file(sestore_root, "x.mp4", b"x" * 1000)
    with live_client(live_server, s3_account) as api:
        request_id = api.upload(path, "x.mp4", "no-such-bucket-here", "private")
    argv = ["client", "wait", str(request_id), "--interval", "0.1", "--url", live_server.url]
    argv += ["--cdn", str(s3_account.cdn), "--api-key", s3_account.api_key]
    argv += ["--api-secret", s3_account.api_secret]
    code = wait_for(argv, service)
    captured = capsys.readouterr()
    assert code == 1
    last = captured.out.splitlines()[-1]
    assert last.startswith(f"request {request_id} failed: Upload failed:")
    assert "NoSuchBucket" in last
    assert "Traceback" not in captured.err


def test_wait_for_an_unknown_request_is_an_error(client_env, capsys) -> None:
    assert main(["client", "wait", "12345", "--interval", "0.05"]) == 1
    assert capsys.readouterr().err == "error: request 12345 not found\n"
