"""The worker end to end: a client queues over HTTP, a worker uploads to a moto S3 server
process, the object is read back from that server, aws.status shows the results, and a
real HTTP receiver gets a callback whose signature verifies with `standardwebhooks`."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from botocore.exceptions import ClientError
from standardwebhooks.webhooks import Webhook

from tests.conftest import MiB, free_port, s3_client
from tests.wire import call
from vodpush.cli import main
from vodpush.core.accounts import S3Settings
from vodpush.core.checkpoint import MultipartCheckpoint, PartRecord
from vodpush.core.requests import LeaseLost, NewRequest
from vodpush.metadata import decode_value
from vodpush.persistence.queue import DbLedger, QueueStore
from vodpush.service import Service
from vodpush.webhooks import standard_webhooks_secret
from vodpush.worker.runner import Worker


class Receiver:
    """A real HTTP callback receiver on a loopback port; can be started late (down, then up)."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}/hook"
        self.received: list[tuple[dict[str, str], bytes]] = []
        self._server: ThreadingHTTPServer | None = None

    def start(self) -> Receiver:
        received = self.received

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                received.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


@pytest.fixture
def receiver():
    r = Receiver().start()
    yield r
    r.stop()


def write_file(root: Path, rel: str, size: int) -> tuple[str, bytes]:
    path = root / "sestore1" / "jb" / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    data = os.urandom(size)
    path.write_bytes(data)
    return f"sestore1/jb/{rel}", data


def run_worker(service: Service, timeout: float = 60) -> None:
    """Drain the queue (burst mode) in this process, bounded in time."""
    worker = Worker(service)
    thread = threading.Thread(target=worker.run, kwargs={"burst": True})
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        worker.stop(grace=0)
        thread.join(10)
        pytest.fail("worker did not drain the queue in time")


def is_public(client, bucket: str, key: str) -> bool:
    try:
        grants = client.get_object_acl(Bucket=bucket, Key=key)["Grants"]
    except ClientError as exc:
        # moto 5 answers 500 for an object stored without an ACL header (S3's default,
        # owner-only): that object is private.
        assert exc.response["ResponseMetadata"]["HTTPStatusCode"] == 500
        return False
    return any(g["Grantee"].get("URI", "").endswith("AllUsers") for g in grants)


def status_of(url, creds, request_id) -> dict:
    answer = call(url, creds, "aws.status", id=request_id)
    assert answer["status"] == "success", answer
    return answer["data"][0]


def test_uploads_end_to_end(live_server, service, s3_account, s3, bucket, sestore_root, receiver):
    small_path, small = write_file(sestore_root, "clips/small.mp4", 300_000)
    big_path, big = write_file(sestore_root, "clips/big.mp4", 12 * MiB + 123)
    metadata = {"title": "Café / Crème 🎬", "show": "a/b"}
    ids = {}
    for name, path, acl in (("small", small_path, "public-read"), ("big", big_path, "private")):
        answer = call(
            live_server.url,
            s3_account,
            "aws.upload",
            path=path,
            destination_path=f"shows/{name}.mp4",
            bucket=bucket,
            acl=acl,
            metadata=metadata,
            callback=receiver.url,
        )
        assert answer["status"] == "success", answer
        ids[name] = answer["data"]["id"]

    run_worker(service)

    client = s3_client(s3)
    for name, data, acl in (("small", small, "public-read"), ("big", big, "private")):
        key = f"shows/{name}.mp4"
        obj = client.get_object(Bucket=bucket, Key=key)
        assert obj["Body"].read() == data
        assert obj["ContentType"] == "video/mp4"
        assert obj["ServerSideEncryption"] == "AES256"
        assert {k: decode_value(v) for k, v in obj["Metadata"].items()} == metadata
        assert is_public(client, bucket, key) == (acl == "public-read")

        record = status_of(live_server.url, s3_account, ids[name])
        assert record["status"] == 200
        assert record["message"] == "Successfully Uploaded to AWS"
        assert record["state"] == "succeeded"
        assert record["results"]["Bucket"] == bucket
        assert record["results"]["Key"] == key
        assert record["results"]["ETag"]
        assert record["results"]["ServerSideEncryption"] == "AES256"
        assert record["results"]["ObjectURL"].endswith(f"/{bucket}/shows/{name}.mp4")
        assert record["sha256"] == hashlib.sha256(data).hexdigest()
        assert record["bytes_done"] == record["bytes_total"] == len(data)
        assert record["attempts"] == 1

    # Callbacks: one per request, the body is the aws.status record, signed.
    deadline = time.monotonic() + 15
    while len(receiver.received) < 2 and time.monotonic() < deadline:
        run_worker(service)
        time.sleep(0.1)
    assert len(receiver.received) == 2
    hook = Webhook(standard_webhooks_secret(s3_account.api_secret))
    bodies = {}
    for headers, body in receiver.received:
        payload = hook.verify(body, headers)
        bodies[payload["id"]] = payload
    assert set(bodies) == set(ids.values())
    assert bodies[ids["big"]]["message"] == "Successfully Uploaded to AWS"
    assert bodies[ids["big"]]["results"]["Bucket"] == bucket
    record = status_of(live_server.url, s3_account, ids["small"])
    assert record["callback_state"] == "delivered"
    assert record["callback_attempts"] == 1


def test_permanent_error_fails_at_once(live_server, service, s3_account, sestore_root):
    path, _ = write_file(sestore_root, "x.mp4", 1000)
    answer = call(
        live_server.url,
        s3_account,
        "aws.upload",
        path=path,
        destination_path="x.mp4",
        bucket="no-such-bucket-here",
        acl="private",
    )
    run_worker(service)
    record = status_of(live_server.url, s3_account, answer["data"]["id"])
    assert record["state"] == "failed"
    assert record["attempts"] == 1
    assert record["status"] == 404
    assert "NoSuchBucket" in record["message"]
    assert "Traceback" not in record["message"]


def test_source_gone_at_upload_time(live_server, service, s3_account, sestore_root, bucket):
    path, _ = write_file(sestore_root, "gone.mp4", 1000)
    answer = call(
        live_server.url,
        s3_account,
        "aws.upload",
        path=path,
        destination_path="gone.mp4",
        bucket=bucket,
        acl="private",
    )
    (sestore_root / "sestore1" / "jb" / "gone.mp4").unlink()
    run_worker(service)
    record = status_of(live_server.url, s3_account, answer["data"]["id"])
    assert record["state"] == "failed"
    assert "no such file" in record["message"]


def test_transient_errors_retry_then_fail_with_attempts(
    live_server, service, account, sestore_root
):
    # An S3 endpoint nobody listens on: connection refused is transient.
    service.accounts.set_s3(
        account.api_key,
        S3Settings(
            endpoint_url=f"http://127.0.0.1:{free_port()}",
            region="us-east-1",
            access_key_id="testing",
            secret_access_key="testing",
        ),
    )
    path, _ = write_file(sestore_root, "t.mp4", 1000)
    answer = call(
        live_server.url,
        account,
        "aws.upload",
        path=path,
        destination_path="t.mp4",
        bucket="bucket",
        acl="private",
    )
    run_worker(service)
    record = status_of(live_server.url, account, answer["data"]["id"])
    assert record["state"] == "failed"
    assert record["attempts"] == 3
    assert "Could not connect" in record["message"] or "connect" in record["message"].lower()


def test_callback_receiver_down_then_up(live_server, service, s3_account, sestore_root, bucket):
    receiver = Receiver()  # not started: connection refused
    path, _ = write_file(sestore_root, "cb.mp4", 1000)
    answer = call(
        live_server.url,
        s3_account,
        "aws.upload",
        path=path,
        destination_path="cb.mp4",
        bucket=bucket,
        acl="private",
        callback=receiver.url,
    )
    request_id = answer["data"]["id"]
    worker = Worker(service)
    thread = threading.Thread(target=worker.run)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            attempts = QueueStore(service.engine).callback_attempts(request_id)
            if len(attempts) >= 2:
                break
            time.sleep(0.1)
        assert len(attempts) >= 2 and not any(a["ok"] for a in attempts)
        assert attempts[0]["error"]
        record = status_of(live_server.url, s3_account, request_id)
        assert record["state"] == "succeeded"
        assert record["callback_state"] == "pending"
        receiver.start()
        while time.monotonic() < deadline and not receiver.received:
            time.sleep(0.1)
    finally:
        worker.stop(grace=0)
        thread.join(10)
        receiver.stop()
    assert len(receiver.received) == 1
    record = status_of(live_server.url, s3_account, request_id)
    assert record["callback_state"] == "delivered"
    attempts = QueueStore(service.engine).callback_attempts(request_id)
    assert attempts[-1]["ok"] and attempts[-1]["http_status"] == 204
    # Every retry carries the same message id (receivers deduplicate on it).
    assert receiver.received[0][0]["webhook-id"]


def test_private_callback_refused_by_default(
    live_server, service, s3_account, sestore_root, bucket, receiver
):
    path, _ = write_file(sestore_root, "p.mp4", 1000)
    answer = call(
        live_server.url,
        s3_account,
        "aws.upload",
        path=path,
        destination_path="p.mp4",
        bucket=bucket,
        acl="private",
        callback=receiver.url,
    )
    # Issue 7: with private addresses refused, a loopback callback is now refused at submit
    # (tests/test_surface.py); refused after submit (setting or DNS changed), the delivery
    # still refuses it.
    service.settings.callback_allow_private = False
    run_worker(service)
    record = status_of(live_server.url, s3_account, answer["data"]["id"])
    assert record["state"] == "succeeded"
    assert record["callback_state"] == "failed"
    assert "loopback" in record["callback_error"]
    assert receiver.received == []


def test_operator_status_and_metrics(
    live_server, service, s3_account, sestore_root, bucket, capsys, monkeypatch
):
    path, _ = write_file(sestore_root, "m.mp4", 2000)
    call(
        live_server.url,
        s3_account,
        "aws.upload",
        path=path,
        destination_path="m.mp4",
        bucket=bucket,
        acl="private",
    )
    monkeypatch.setenv("VODPUSH_DATABASE_URL", service.settings.database_url)
    monkeypatch.setenv("VODPUSH_SECRET_KEY", service.settings.secret_key.get_secret_value())
    assert main(["status", "--json"]) == 0
    depth = json.loads(capsys.readouterr().out)
    assert depth["queued"] == 1 and depth["succeeded"] == 0
    run_worker(service)
    assert main(["status", "--json"]) == 0
    depth = json.loads(capsys.readouterr().out)
    assert depth["queued"] == 0 and depth["succeeded"] == 1
    text = httpx.get(live_server.url + "/metrics").text
    # Live states only on /metrics (`vodpush status` above counts every state).
    assert 'vodpush_queue_depth{state="queued"} 0.0' in text
    assert 'vodpush_queue_depth{state="succeeded"}' not in text
    assert 'vodpush_uploads_total{outcome="success"}' in text
    assert "vodpush_upload_duration_seconds_bucket" in text


def test_new_requests_are_picked_up_within_a_second(service, s3_account, sestore_root, bucket):
    worker = Worker(service)
    thread = threading.Thread(target=worker.run)
    thread.start()
    try:
        time.sleep(0.3)  # idle, waiting
        path, _ = write_file(sestore_root, "quick.mp4", 1000)
        queued_at = time.monotonic()
        answer = service.requests.enqueue(
            NewRequest(
                account_id=s3_account.id,
                cdn_id=s3_account.cdn,
                path=path,
                destination_path="quick.mp4",
                bucket=bucket,
                acl="private",
                metadata={},
                callback="",
                signature="quick",
            )
        )
        store = QueueStore(service.engine)
        while store.depth()["queued"] and time.monotonic() - queued_at < 5:
            time.sleep(0.02)
        picked_up = time.monotonic() - queued_at
        assert answer.id and picked_up < 1.0, picked_up
    finally:
        worker.stop(grace=5)
        thread.join(15)


def test_serve_runs_api_and_worker_and_stops_on_sigterm(
    service, s3_account, sestore_root, bucket, tmp_path
):
    """The real `vodpush serve` in a subprocess: a client queues over HTTP, the embedded
    worker uploads, SIGTERM stops both cleanly."""
    port = free_port()
    env = {
        **os.environ,
        "VODPUSH_DATABASE_URL": service.settings.database_url,
        "VODPUSH_SECRET_KEY": service.settings.secret_key.get_secret_value(),
        "VODPUSH_SESTORE_ROOT": str(sestore_root),
        "VODPUSH_POLL_INTERVAL": "0.2",
    }
    log = tmp_path / "serve.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "vodpush", "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log.open("wb"),
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                httpx.get(url + "/healthz", timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.1)
        path, _ = write_file(sestore_root, "served.mp4", 50_000)
        answer = call(
            url,
            s3_account,
            "aws.upload",
            path=path,
            destination_path="served.mp4",
            bucket=bucket,
            acl="private",
        )
        request_id = answer["data"]["id"]
        while time.monotonic() < deadline:
            record = status_of(url, s3_account, request_id)
            if record["state"] in ("succeeded", "failed"):
                break
            time.sleep(0.1)
        assert record["state"] == "succeeded", record["message"]
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
    assert code == 0, log.read_text()[-2000:]
    actions = [
        json.loads(line).get("action")
        for line in log.read_text().splitlines()
        if line.startswith("{")
    ]
    assert "worker.stopped" in actions and "upload.succeeded" in actions
    assert actions.count("worker.stop") == 1  # the signal and the server's shutdown: once


def test_a_second_stop_never_extends_the_grace_period(service):
    worker = Worker(service)
    worker.stop(grace=5)
    first = worker._deadline
    worker.stop(grace=60)
    assert worker._deadline == first
    worker.stop(grace=0)  # e.g. a second Ctrl-C: stop now
    assert worker._deadline < first


def test_db_ledger_and_the_claims_checkpoint_flag(service, account):
    """The multipart ledger on the database, and the claim telling whether one exists (so a
    single-PUT upload asks nothing)."""
    queue = QueueStore(service.engine)
    queued = service.requests.enqueue(
        NewRequest(
            account_id=account.id,
            cdn_id=account.cdn,
            path="sestore1/jb/x.mp4",
            destination_path="x.mp4",
            bucket="b",
            acl="private",
            metadata={},
            callback="",
            signature="ledger-test",
        )
    )
    first = queue.claim("w1", lease_seconds=0.01)
    assert first is not None and first.id == queued.id and not first.has_checkpoint
    ledger = DbLedger(service.engine, first.id, "w1", empty=True)
    assert ledger.load() is None
    checkpoint = MultipartCheckpoint(
        upload_id="u-1", chunksize=5 * MiB, size=11 * MiB, mtime_ns=1, checksums=True
    )
    ledger.begin(checkpoint)
    ledger.part_done(2, PartRecord(etag='"e2"', checksum_sha256="c2", size=5 * MiB))
    loaded = ledger.load()
    assert loaded is not None and loaded.upload_id == "u-1"
    assert loaded.parts == {2: PartRecord(etag='"e2"', checksum_sha256="c2", size=5 * MiB)}

    time.sleep(0.05)  # the lease expires: another worker takes the request over
    second = queue.claim("w2", lease_seconds=60)
    assert second is not None and second.id == first.id and second.has_checkpoint
    resumed = DbLedger(service.engine, second.id, "w2", empty=not second.has_checkpoint)
    assert resumed.load() == loaded
    with pytest.raises(LeaseLost):
        ledger.begin(checkpoint)  # w1 lost its lease
    resumed.clear()
    assert resumed.load() is None
    assert DbLedger(service.engine, second.id, "w2").load() is None
