"""A request waiting for its next attempt is visible as such: state ``retrying``, the time
of the next attempt and the last error, in aws.status, in the Python client's record and in
`vodpush client status` / `wait`; here with S3 refusing connections, then back."""

from __future__ import annotations

import io
import json
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from rich.console import Console

from tests.conftest import run_cli
from tests.s3server import ModalProxy
from tests.wire import call
from vodpush.client import Client, StatusRecord
from vodpush.client_cli import follow
from vodpush.service import Service
from vodpush.worker.runner import Worker

CAUSE = "S3 connection error: could not connect to the S3 endpoint"


def _entry(**fields: Any) -> dict[str, Any]:
    return {
        "id": 7, "cdn_id": 158, "path": "sestore1/jb/a.mp4", "destination_path": "a.mp4",
        "metadata": {}, "acl": "private", "callback": "", "results": {},
        "created": "2031-06-01 11:59:00", "last_updated": "2031-06-01 12:00:00", "status": 0,
        "bucket": "b", "attempts": 1, "bytes_done": 0, "bytes_total": None, "sha256": None,
        "callback_state": "none", "callback_attempts": 0, "callback_error": None, **fields,
    }  # fmt: skip


RETRYING = _entry(
    state="retrying",
    next_attempt_at="2031-06-01 12:00:10",
    message="Retrying at 2031-06-01 12:00:10 UTC (attempt 2 of 16): S3 said SlowDown: (slow)",
    error_code="SlowDown",
    status=503,
)


def test_the_client_record_of_a_retrying_request() -> None:
    record = StatusRecord.from_api(RETRYING)
    assert record.retrying and not record.finished
    assert record.next_attempt_at == datetime(2031, 6, 1, 12, 0, 10, tzinfo=UTC)
    assert record.last_error == "S3 said SlowDown: (slow)"
    assert (record.error_code, record.status) == ("SlowDown", 503)
    assert record.to_dict() == RETRYING  # the time written back as the server wrote it
    queued = StatusRecord.from_api(_entry(state="queued", next_attempt_at="", message="Queued"))
    assert queued.next_attempt_at is None and queued.last_error is None
    assert queued.to_dict()["next_attempt_at"] == ""
    failed = StatusRecord.from_api(
        _entry(state="failed", next_attempt_at="", message="Upload failed: [NoSuchBucket] gone")
    )
    assert failed.last_error == "Upload failed: [NoSuchBucket] gone" and not failed.retrying
    # Whatever else a server sends there is no time.
    for odd in ("soon", 5, None, "2031-13-01 00:00:00"):
        assert StatusRecord.from_api(_entry(next_attempt_at=odd)).next_attempt_at is None


def test_wait_on_a_terminal_keeps_each_retry_as_a_line_above_the_bar() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=100, color_system=None)
    records = [
        StatusRecord.from_api(e)
        for e in (
            _entry(state="queued", message="Queued", next_attempt_at=""),
            RETRYING,
            RETRYING,
            _entry(state="succeeded", message="Successfully Uploaded to AWS", status=200),
        )
    ]
    final = follow(lambda: records.pop(0), label="request 7", interval=0, console=console,
                   sleep=lambda s: None)  # fmt: skip
    assert final.succeeded
    text = out.getvalue()
    # The whole retry message once, as a line (the bar is only 100 columns wide) ...
    assert text.count(f"request 7: {RETRYING['message']}\n") == 1
    # ... and the bar says when and why in short.
    assert "request 7: retrying at 12:00:10 UTC: S3 said SlowDown" in text


def test_a_retrying_request_over_http_then_its_success(
    live_server, service: Service, s3_account, s3, bucket, sestore_root, cli_env, capsys,
    monkeypatch,
) -> None:  # fmt: skip
    """S3 refuses connections (its endpoint is a proxy that is down): after the first
    attempt, aws.status, the Python client and `vodpush client status` show the request
    retrying, when, and why. S3 comes back; `vodpush client wait` shows the retry, then
    follows the next attempt to its success."""
    monkeypatch.setenv("COLUMNS", "250")  # rich folds long cells on narrow terminals
    proxy = ModalProxy(s3.port)  # not started: nothing listens there yet
    service.accounts.set_s3(s3_account.api_key, s3.settings(endpoint_url=proxy.url))
    # The next attempt 2 to 4 s after the first: time enough to look.
    service.settings.retry_base_delay = service.settings.retry_max_delay = 4
    (sestore_root / "sestore1" / "jb" / "show.mp4").write_bytes(b"v" * 1000)
    api = Client(live_server.url, s3_account.cdn, s3_account.api_key, s3_account.api_secret)
    request_id = api.upload("sestore1/jb/show.mp4", "shows/show.mp4", bucket, "private")

    worker = Worker(service)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not (record := api.get(request_id)).retrying:
            assert time.monotonic() < deadline, record
            time.sleep(0.05)
    finally:
        worker.stop(grace=0)  # no worker: it stays retrying while we look
        thread.join(10)
    seen_at = datetime.now(UTC)

    # The Python client: state, when (in the future), the last error, its code.
    assert record.next_attempt_at is not None
    assert seen_at < record.next_attempt_at <= seen_at + timedelta(seconds=5)
    assert record.last_error == CAUSE
    assert (record.error_code, record.attempts, record.status) == ("EndpointConnectionError", 1, 0)
    # aws.status on the wire, as any client gets it.
    (entry,) = call(live_server.url, s3_account, "aws.status", id=request_id)["data"]
    when = entry["next_attempt_at"]
    assert when == record.next_attempt_at.strftime("%Y-%m-%d %H:%M:%S")
    assert entry["message"] == f"Retrying at {when} UTC (attempt 2 of 3): {CAUSE}"
    assert (entry["state"], entry["error_code"]) == ("retrying", "EndpointConnectionError")
    # `vodpush client status`: the state, the time in its column, and the message.
    client = ["--url", live_server.url, "--cdn", str(s3_account.cdn)]
    client += ["--api-key", s3_account.api_key, "--api-secret", s3_account.api_secret]
    code, out, err = run_cli(capsys, "client", "status", "--id", str(request_id), *client)
    assert code == 0, err
    (row,) = [line for line in out.splitlines() if "retrying" in line]
    assert row.count(when) == 2 and CAUSE in row
    code, out, err = run_cli(capsys, "client", "status", "--json", *client)
    assert code == 0, err
    (shown,) = json.loads(out)
    assert (shown["state"], shown["next_attempt_at"]) == ("retrying", when)

    # S3 is back. `wait` (off a terminal: a line per message) shows the retry, then a
    # worker takes the request when it is due and `wait` follows it to the end.
    proxy.start()
    worker = Worker(service)
    thread = threading.Thread(target=worker.run, kwargs={"burst": True}, daemon=True)
    thread.start()
    try:
        code, out, err = run_cli(
            capsys, "client", "wait", str(request_id), "--interval", "0.1", *client
        )
    finally:
        worker.stop(grace=0)
        thread.join(30)
        proxy.stop()
    assert code == 0, err
    lines = [line.split(": ", 1)[1] for line in err.splitlines()]
    assert lines[0] == entry["message"]
    assert lines[-1] == "Successfully Uploaded to AWS"
    assert out == f"request {request_id}: Successfully Uploaded to AWS\n"
    done = api.get(request_id)
    assert (done.state, done.next_attempt_at, done.last_error) == ("succeeded", None, None)
    assert done.attempts == 2
    api.close()
