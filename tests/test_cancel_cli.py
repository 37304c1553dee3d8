"""Cancel and retry from the Python client, `vodpush client cancel|retry` and the operator's
`vodpush request cancel|retry|show`: the client's rules on httpx.MockTransport, the rest
against a live server and the database it serves."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qs

import httpx
import pytest

from tests.conftest import run_cli
from tests.test_client import Clock, fail, ok, record
from tests.wire import call
from vodpush.cli import main
from vodpush.client import ApiError, Client, StatusRecord, TransportError
from vodpush.protocol.signing import split_signed_request

SECRET = "s3cr3t" * 8


def mock_client(handler: Any) -> Client:
    clock = Clock()
    return Client(
        "http://api.test",
        158,
        "KEY",
        SECRET,
        transport=httpx.MockTransport(handler),
        sleep=clock.sleep,
        clock=clock,
    )


def sent(request: httpx.Request) -> dict[str, Any]:
    (text,) = parse_qs(request.content.decode())["json"]
    return split_signed_request(text).payload


# -- the client's rules -----------------------------------------------------------------------


@pytest.mark.parametrize("command", ["cancel", "retry"])
def test_cancel_and_retry_send_the_id_and_return_the_record(command: str) -> None:
    seen: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(sent(request))
        return ok(record(id=12, state="canceled", message="Canceled by the customer"))

    with mock_client(handler) as api:
        answer = getattr(api, command)(12)
    assert isinstance(answer, StatusRecord) and answer.id == 12
    assert answer.canceled and answer.finished and not answer.failed
    (payload,) = seen
    assert (payload["command"], payload["id"]) == (f"aws.{command}", 12)


def test_a_refused_cancel_is_an_api_error_and_not_repeated() -> None:
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return fail("0007", "invalid id: no such request: 12")

    with mock_client(handler) as api, pytest.raises(ApiError) as raised:
        api.cancel(12)
    assert raised.value.code == "0007" and len(calls) == 1


def test_a_cancel_whose_answer_was_lost_is_not_sent_again() -> None:
    """A timeout after sending: the server may have canceled; a second cancel would be
    refused ("already finished") and hide it. The caller sees the transport error."""
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        raise httpx.ReadTimeout("no answer", request=request)

    with mock_client(handler) as api, pytest.raises(TransportError):
        api.cancel(12)
    assert len(calls) == 1


@pytest.mark.parametrize("trouble", ["connect", "busy"])
def test_a_cancel_the_server_surely_did_not_run_is_sent_again(trouble: str) -> None:
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        if len(calls) == 1:
            if trouble == "connect":
                raise httpx.ConnectError("refused", request=request)
            return fail("1000", "too busy")
        return ok(record(id=12, state="queued"))

    with mock_client(handler) as api:
        assert api.retry(12).state == "queued"
    assert len(calls) == 2


def test_a_record_that_is_not_an_object_is_a_transport_error() -> None:
    with mock_client(lambda request: ok([])) as api, pytest.raises(TransportError):
        api.cancel(1)


# -- over HTTP --------------------------------------------------------------------------------


def queued(url: str, creds: Any, sestore_root: Any, name: str = "a.mp4") -> int:
    (sestore_root / "sestore1" / creds.username / name).write_bytes(b"x" * 10)
    answer = call(url, creds, "aws.upload", path=f"sestore1/{creds.username}/{name}",
                  destination_path=name, bucket="my-bucket", acl="private")  # fmt: skip
    assert answer["status"] == "success", answer
    return int(answer["data"]["id"])


def test_the_client_cancels_and_retries_over_http(live_server, account, sestore_root) -> None:
    rid = queued(live_server.url, account, sestore_root)
    with Client(live_server.url, account.cdn, account.api_key, account.api_secret) as api:
        canceled = api.cancel(rid)
        assert (canceled.id, canceled.state, canceled.message) == (
            rid,
            "canceled",
            "Canceled by the customer",
        )
        assert api.get(rid).canceled
        with pytest.raises(ApiError) as raised:
            api.cancel(rid)
        assert raised.value.code == "0007" and "already finished (canceled)" in raised.value.message
        again = api.retry(rid)
        assert (again.state, again.attempts, again.message) == ("queued", 0, "Queued")
        with pytest.raises(ApiError) as raised:
            api.retry(rid + 1000)
        assert raised.value.message == f"invalid id: no such request: {rid + 1000}"


@pytest.fixture
def client_env(monkeypatch, live_server, account) -> Any:
    monkeypatch.setenv("VODPUSH_URL", live_server.url)
    monkeypatch.setenv("VODPUSH_CDN", str(account.cdn))
    monkeypatch.setenv("VODPUSH_API_KEY", account.api_key)
    monkeypatch.setenv("VODPUSH_API_SECRET", account.api_secret)
    return account


def test_vodpush_client_cancel_retry_and_wait(client_env, live_server, sestore_root, capsys):
    rid = queued(live_server.url, client_env, sestore_root)
    assert main(["client", "cancel", str(rid)]) == 0
    assert capsys.readouterr().out == f"request {rid}: canceled (Canceled by the customer)\n"
    # Following a canceled request ends at once, with exit code 1.
    assert main(["client", "wait", str(rid)]) == 1
    assert capsys.readouterr().out == f"request {rid} canceled: Canceled by the customer\n"
    assert main(["client", "cancel", str(rid)]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith(f"error: invalid id: request {rid} ")
    assert captured.err.rstrip().endswith("(code 0007)")
    assert main(["client", "retry", "--json", str(rid)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert (shown["id"], shown["state"], shown["attempts"]) == (rid, "queued", 0)


# -- the operator ---------------------------------------------------------------------------


def test_vodpush_request_cancel_retry_and_show(
    cli_env, live_server, service, make_account, sestore_root, capsys, monkeypatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # rich folds long cells on narrow terminals
    someone = make_account(160, "ann")
    rid = queued(live_server.url, someone, sestore_root)
    code, out, err = run_cli(capsys, "request", "cancel", str(rid))
    assert (code, err) == (0, "")
    assert out == f"request {rid}: queued -> canceled (Canceled by the operator)\n"
    code, out, err = run_cli(capsys, "request", "cancel", str(rid))
    assert code == 1 and err.startswith(f"error: invalid id: request {rid} has already finished")
    code, out, _ = run_cli(capsys, "request", "retry", "--json", str(rid))
    assert code == 0 and json.loads(out)["state"] == "queued"

    code, out, _ = run_cli(capsys, "request", "show", "--json", str(rid))
    assert code == 0
    shown = json.loads(out)
    assert shown["id"] == rid and shown["cdn_id"] == 160
    assert [(e["event"], e["state"], e["message"]) for e in shown["events"]] == [
        ("queued", "queued", "Queued"),
        ("canceled", "canceled", "Canceled by the operator"),
        ("retried", "queued", "Queued"),
    ]
    assert all(len(e["at"]) == 19 for e in shown["events"])  # YYYY-MM-DD HH:MM:SS
    code, out, _ = run_cli(capsys, "request", "show", str(rid))
    assert code == 0 and "Canceled by the operator" in out and "retried" in out
    assert f"id: {rid}" in out

    code, _, err = run_cli(capsys, "request", "show", str(rid + 1000))
    assert (code, err) == (1, f"error: invalid id: no such request: {rid + 1000}\n")
    code, _, err = run_cli(capsys, "request", "retry", "0")
    assert (code, err) == (1, "error: invalid id: must be at least 1\n")
