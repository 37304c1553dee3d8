"""aws.callbacks and aws.redeliver (issue 10, item 10) the way a customer uses them: over
HTTP against a live server with its worker in the same process, uploading to the moto S3
server, with a real callback receiver on loopback. The history shows every POST with its
HTTP status and error; a redelivery reaches the receiver again as a new message (a new
webhook-id, a valid signature, the current record); what cannot be redelivered is refused
with a message that says why; the Python client and `vodpush client` show the same."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from tests.test_callback_ids import ScriptedReceiver, status_of, verify_all, wait_for
from tests.wire import STYLES, call, envelope, post
from vodpush.cli import main
from vodpush.client import ApiError, Client
from vodpush.config import Settings
from vodpush.service import Service
from vodpush.worker.runner import Worker


def no_such_request(request_id: int) -> str:
    return f"invalid id: no such request: {request_id}"


@pytest.fixture
def settings(settings: Settings) -> Settings:
    # Two quick retries, then a long wait: a callback failing three times stays pending
    # long enough to be looked at. Two redeliveries an hour, so that the third is refused.
    return settings.model_copy(
        update={"callback_schedule": [0.2, 0.2, 60.0], "callback_redeliveries_per_hour": 2}
    )


@contextmanager
def running_worker(service: Service) -> Iterator[Worker]:
    """The worker `vodpush serve` embeds: woken by the API when a request is queued."""
    worker = Worker(service)
    service.requests.on_enqueue = worker.wake
    thread = threading.Thread(target=worker.run, name="worker", daemon=True)
    thread.start()
    try:
        yield worker
    finally:
        service.requests.on_enqueue = None
        worker.stop(grace=0)
        thread.join(10)


@pytest.fixture
def worker(service: Service) -> Iterator[Worker]:
    with running_worker(service) as running:
        yield running


@pytest.fixture
def receivers() -> Iterator[list[ScriptedReceiver]]:
    made: list[ScriptedReceiver] = []
    yield made
    for receiver in made:
        receiver.stop()


def upload(url: str, creds: Any, bucket: str, sestore_root: Any, name: str, **fields: Any) -> int:
    (sestore_root / "sestore1" / creds.username / name).write_bytes(b"video " * 100)
    answer = call(
        url,
        creds,
        "aws.upload",
        path=f"sestore1/{creds.username}/{name}",
        destination_path=f"out/{name}",
        bucket=bucket,
        acl="private",
        **fields,
    )
    assert answer["status"] == "success", answer
    return int(answer["data"]["id"])


def callbacks(url: str, creds: Any, request_id: Any) -> dict[str, Any]:
    return call(url, creds, "aws.callbacks", id=request_id)


def redeliver(url: str, creds: Any, request_id: Any) -> dict[str, Any]:
    return call(url, creds, "aws.redeliver", id=request_id)


def callback_state(service: Service, request_id: int) -> tuple[str, int]:
    row = service.requests.get(request_id)
    assert row is not None
    return row.callback_state, row.callback_attempts


def test_history_shows_failed_posts_then_a_redelivery_reaches_the_receiver_again(
    live_server, service, worker, s3_account, bucket, sestore_root, receivers
):
    receiver = ScriptedReceiver([500, 500, 204])  # then 204 for every later POST
    receivers.append(receiver)
    rid = upload(live_server.url, s3_account, bucket, sestore_root, "a.mp4", callback=receiver.url)
    wait_for(lambda: callback_state(service, rid)[0] == "delivered", 30, "the callback")

    answer = callbacks(live_server.url, s3_account, rid)
    assert answer["status"] == "success" and answer["message"] == "Found callback history"
    history = answer["data"]
    first_id = receiver.ids()[0]
    assert set(receiver.ids()) == {first_id}
    assert {k: history[k] for k in ("id", "state", "callback", "callback_state")} == {
        "id": rid,
        "state": "succeeded",
        "callback": receiver.url,
        "callback_state": "delivered",
    }
    assert (history["callback_attempts"], history["total"], history["webhook_id"]) == (
        3,
        3,
        first_id,
    )
    assert (history["next_attempt_at"], history["redeliveries"], history["last_redelivered"]) == (
        "",
        0,
        "",
    )
    # Newest first, each with its status code and error.
    assert [(a["ok"], a["http_status"], a["error"]) for a in history["attempts"]] == [
        (True, 204, None),
        (False, 500, "HTTP 500"),
        (False, 500, "HTTP 500"),
    ]
    assert all(len(a["at"]) == 19 and 0 <= a["duration"] < 10 for a in history["attempts"])

    # The redelivery: due now, a new message for the receiver. (Each aws.redeliver here
    # has a timestamp of its own: the same signed request twice is one redelivery, see the
    # next test.)
    now = int(time.time())
    answer = call(live_server.url, s3_account, "aws.redeliver", id=rid, timestamp=now)
    assert answer["status"] == "success" and answer["message"] == "Callback redelivery queued"
    queued = answer["data"]
    assert queued["id"] == rid and queued["callback_state"] == "pending"
    assert queued["webhook_id"].startswith("msg_") and queued["webhook_id"] != first_id
    assert len(queued["next_attempt_at"]) == 19
    wait_for(lambda: callback_state(service, rid) == ("delivered", 1), 30, "the redelivery")
    assert len(receiver.received) == 4
    headers, body = receiver.received[3]
    assert headers["webhook-id"] == queued["webhook_id"]
    verify_all(receiver, s3_account.api_secret)  # every POST, the redelivery too
    # The current record, as it was when the redelivery was due (a new schedule: 0 POSTs).
    sent, current = json.loads(body), status_of(live_server.url, s3_account, rid)
    assert (sent["callback_state"], sent["callback_attempts"]) == ("pending", 0)
    assert {k: v for k, v in sent.items() if not k.startswith("callback_")} == {
        k: v for k, v in current.items() if not k.startswith("callback_")
    }

    history = callbacks(live_server.url, s3_account, rid)["data"]
    assert (history["callback_state"], history["callback_attempts"], history["total"]) == (
        "delivered",
        1,
        4,
    )
    assert history["webhook_id"] == queued["webhook_id"] and history["redeliveries"] == 1
    assert len(history["last_redelivered"]) == 19
    assert [a["http_status"] for a in history["attempts"]] == [204, 204, 500, 500]

    # A second redelivery is allowed (two an hour here), a third is refused: code 1000, and
    # when it will be possible again.
    second = call(live_server.url, s3_account, "aws.redeliver", id=rid, timestamp=now - 1)
    assert second["status"] == "success", second
    wait_for(lambda: len(receiver.received) == 5, 30, "the second redelivery")
    wait_for(lambda: callback_state(service, rid)[0] == "delivered", 30, "its record")
    refused = call(live_server.url, s3_account, "aws.redeliver", id=rid, timestamp=now - 2)
    assert (refused["status"], refused["code"]) == ("failure", "1000")
    assert 3500 < refused["retry_after"] <= 3600  # seconds, as the API's rate limits say
    assert refused["message"].startswith(
        f"the callback of request {rid} was redelivered 2 times in the past hour, "
        "the most allowed (2); try again after "
    )
    assert callback_state(service, rid) == ("delivered", 1)


def test_the_same_signed_redelivery_sent_again_sends_nothing_more(
    live_server, service, worker, s3_account, bucket, sestore_root, receivers
):
    receiver = ScriptedReceiver([])
    receivers.append(receiver)
    rid = upload(live_server.url, s3_account, bucket, sestore_root, "b.mp4", callback=receiver.url)
    wait_for(lambda: callback_state(service, rid)[0] == "delivered", 30, "the callback")
    # One signed aws.redeliver, sent twice (a client whose first answer was lost).
    text = STYLES["php"](envelope(s3_account, "aws.redeliver", id=rid), s3_account.api_secret)
    first = post(live_server.url, text).json()
    assert first["status"] == "success", first
    wait_for(lambda: callback_state(service, rid) == ("delivered", 1), 30, "the redelivery")
    again = post(live_server.url, text).json()
    assert again["status"] == "success", again
    assert again["data"]["webhook_id"] == first["data"]["webhook_id"]
    assert again["data"]["callback_state"] == "delivered"  # where it is now; nothing due
    assert callback_state(service, rid) == ("delivered", 1)
    assert len(receiver.received) == 2
    assert callbacks(live_server.url, s3_account, rid)["data"]["redeliveries"] == 1


def test_what_cannot_be_redelivered_is_refused_with_the_reason(
    live_server, service, s3_account, make_account, bucket, sestore_root, receivers
):
    receiver = ScriptedReceiver([500, 500, 500])  # then a retry a minute later
    receivers.append(receiver)
    url = live_server.url
    with_callback = upload(url, s3_account, bucket, sestore_root, "c.mp4", callback=receiver.url)
    # Not finished (no worker yet): its callback is sent when it is.
    refused = redeliver(url, s3_account, with_callback)
    assert (refused["status"], refused["code"]) == ("failure", "0007")
    assert refused["message"] == (
        f"invalid id: request {with_callback} has not finished (it is queued); "
        "its callback is sent when it does"
    )
    # Its history, before any POST.
    history = callbacks(url, s3_account, with_callback)["data"]
    assert (history["callback_state"], history["total"], history["attempts"]) == ("none", 0, [])

    without = upload(url, s3_account, bucket, sestore_root, "d.mp4")
    with running_worker(service):
        wait_for(lambda: callback_state(service, with_callback) == ("pending", 3), 30, "3 POSTs")
        wait_for(lambda: service.requests.get(without).state == "succeeded", 30, "the upload")
    # A delivery is pending (retried in a minute): refused, saying when.
    refused = redeliver(url, s3_account, with_callback)
    assert (refused["status"], refused["code"]) == ("failure", "0007")
    assert refused["message"].startswith(
        f"invalid id: a delivery of request {with_callback}'s callback is already pending "
        "(next attempt at "
    )
    history = callbacks(url, s3_account, with_callback)["data"]
    assert history["callback_state"] == "pending" and len(history["next_attempt_at"]) == 19
    assert history["callback_error"] == "HTTP 500"
    assert [a["http_status"] for a in history["attempts"]] == [500, 500, 500]
    # No callback URL.
    refused = redeliver(url, s3_account, without)
    assert (refused["code"], refused["message"]) == (
        "0007",
        f"invalid id: request {without} has no callback URL",
    )
    # Another account's request answers exactly as one that does not exist.
    other = make_account(cdn=159, username="other")
    for command in ("aws.callbacks", "aws.redeliver"):
        for creds, request_id in ((other, with_callback), (other, without), (s3_account, 10**9)):
            answer = call(url, creds, command, id=request_id)
            assert (answer["status"], answer["code"], answer["message"]) == (
                "failure",
                "0007",
                no_such_request(request_id),
            ), (command, request_id)
    # The field is checked as any other.
    assert callbacks(url, s3_account, "x")["message"] == "invalid id: must be an integer"
    assert call(url, s3_account, "aws.redeliver")["message"] == "missing required field(s): id"
    assert callback_state(service, with_callback) == ("pending", 3)


def test_client_and_cli_show_the_history_and_redeliver(
    live_server, service, worker, s3_account, bucket, sestore_root, receivers, capsys, monkeypatch
):
    receiver = ScriptedReceiver([500, 204])
    receivers.append(receiver)
    rid = upload(live_server.url, s3_account, bucket, sestore_root, "e.mp4", callback=receiver.url)
    plain = upload(live_server.url, s3_account, bucket, sestore_root, "f.mp4")
    wait_for(lambda: callback_state(service, rid)[0] == "delivered", 30, "the callback")
    wait_for(lambda: service.requests.get(plain).state == "succeeded", 30, "the upload")

    # Its clock is a little behind: its aws.redeliver and the CLI's, signed in the same
    # second, would otherwise be the same request (see above).
    with Client(
        live_server.url,
        s3_account.cdn,
        s3_account.api_key,
        s3_account.api_secret,
        clock=lambda: time.time() - 2,
    ) as api:
        history = api.callbacks(rid)
        assert (history.id, history.callback_state, history.total) == (rid, "delivered", 2)
        assert history.webhook_id == receiver.ids()[0]
        assert [(a.ok, a.http_status, a.error) for a in history.attempts] == [
            (True, 204, None),
            (False, 500, "HTTP 500"),
        ]
        done = api.redeliver(rid)
        assert (done.id, done.callback_state) == (rid, "pending")
        assert done.webhook_id not in (None, history.webhook_id)
        wait_for(lambda: len(receiver.received) == 3, 30, "the redelivery")
        assert receiver.ids()[2] == done.webhook_id
        with pytest.raises(ApiError) as refused:
            api.redeliver(plain)
        assert refused.value.code == "0007" and "has no callback URL" in refused.value.message
        with pytest.raises(ApiError) as unknown:
            api.callbacks(10**9)
        assert (unknown.value.code, unknown.value.message) == ("0007", no_such_request(10**9))
    wait_for(lambda: callback_state(service, rid) == ("delivered", 1), 30, "its record")

    for name, value in {
        "VODPUSH_URL": live_server.url,
        "VODPUSH_CDN": str(s3_account.cdn),
        "VODPUSH_API_KEY": s3_account.api_key,
        "VODPUSH_API_SECRET": s3_account.api_secret,
        "COLUMNS": "200",  # rich folds long cells on narrow terminals
    }.items():
        monkeypatch.setenv(name, value)
    assert main(["client", "callbacks", str(rid)]) == 0
    out = capsys.readouterr().out
    assert f"request {rid} (succeeded): callback delivered" in out
    assert f"webhook-id: {done.webhook_id}" in out
    assert "attempts: 1 of this delivery, 3 in all" in out and "redeliveries: 1" in out
    rows = [line for line in out.splitlines() if " ok " in line or " failed " in line]
    assert len(rows) == 3 and "HTTP 500" in rows[2] and "204" in rows[0]

    assert main(["client", "callbacks", str(rid), "--json"]) == 0
    as_json = json.loads(capsys.readouterr().out)
    assert as_json["total"] == 3 and as_json["webhook_id"] == done.webhook_id
    assert [a["http_status"] for a in as_json["attempts"]] == [204, 204, 500]

    assert main(["client", "redeliver", str(rid)]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"request {rid}: callback pending (webhook-id msg_")
    wait_for(lambda: len(receiver.received) == 4, 30, "the CLI's redelivery")
    assert line.split("webhook-id ")[1].split(",")[0] == receiver.ids()[3]

    assert main(["client", "redeliver", str(plain)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.strip() == (
        f"error: invalid id: request {plain} has no callback URL (code 0007)"
    )
    assert main(["client", "callbacks", str(plain)]) == 0
    assert capsys.readouterr().out.strip() == f"request {plain} (succeeded) has no callback URL"
