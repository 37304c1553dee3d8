"""Nothing left behind (issue 9): a multipart upload given up while S3 is unreachable is
recorded, still there in S3, and aborted once S3 is back, by the worker's reaper or by
`vodpush reap`. S3 is the moto process behind a TCP proxy that the test stops (every
connection cut, new ones refused) and starts again; the database is SQLite and
PostgreSQL."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Creds, run_cli, s3_client
from tests.faults import (
    log_events,
    parts_stored,
    queue_file,
    request_row,
    start_worker,
    wait_for,
    worker_env,
)
from tests.s3server import MotoServer, TcpProxy
from vodpush.core.checkpoint import MultipartCheckpoint
from vodpush.service import Service
from vodpush.worker.runner import Worker

pytestmark = pytest.mark.slow

MiB = 1024 * 1024


@pytest.fixture
def endpoint(service: Service, account: Creds, s3: MotoServer) -> Iterator[TcpProxy]:
    """The account's S3 endpoint: a proxy in front of moto (a restarted moto would forget
    every bucket and upload, which no real S3 does)."""
    proxy = TcpProxy(s3.port).start()
    service.accounts.set_s3(account.api_key, s3.settings(endpoint_url=proxy.url))
    yield proxy
    proxy.stop()


@pytest.fixture
def outage_bucket(s3: MotoServer) -> str:
    name = f"outage-{int(time.time() * 1000)}"
    s3_client(s3).create_bucket(Bucket=name)
    return name


def uploads_in(s3: MotoServer, bucket: str) -> list[str]:
    """The multipart uploads moto holds in ``bucket``, asked directly (not via the proxy)."""
    listed = s3_client(s3).list_multipart_uploads(Bucket=bucket)
    return [u["UploadId"] for u in listed.get("Uploads", [])]


def run_worker(service: Service) -> threading.Thread:
    """An in-process burst worker (its reaper thread waits an hour between passes)."""
    service.settings.reap_interval = 3600
    thread = threading.Thread(target=Worker(service).run, kwargs={"burst": True})
    thread.start()
    return thread


def give_up_during_outage(
    service: Service, account: Creds, s3: MotoServer, endpoint: TcpProxy, bucket: str, root: Path
) -> tuple[int, str]:
    """A 40 MiB multipart upload that loses S3 after its first part and gives up after
    max_attempts (2): its abort fails too. Returns (request id, upload id)."""
    service.settings.max_attempts = 2
    service.settings.part_concurrency = 1
    rid, _ = queue_file(service, account, root, "big.mp4", 40 * MiB, bucket)
    thread = run_worker(service)
    wait_for(lambda: parts_stored(service, rid) >= 1, 60, "a stored part")
    endpoint.stop()
    thread.join(120)
    assert not thread.is_alive()

    row = request_row(service, rid)
    assert (row.state, row.attempts) == ("failed", 2)
    assert row.message.startswith("Upload failed: S3 connection error"), row.message
    assert row.multipart_json is None and parts_stored(service, rid) == 0
    # Still in the customer's bucket, and the request forgot it: only the recorded id can
    # remove it now.
    (left,) = uploads_in(s3, bucket)
    (orphan,) = service.orphans.list()
    assert (orphan.request_id, orphan.bucket, orphan.key) == (rid, bucket, "big.mp4")
    assert orphan.upload_id == left
    return rid, orphan.upload_id


def test_the_worker_reaps_what_an_outage_left_behind(
    service: Service,
    account: Creds,
    s3: MotoServer,
    endpoint: TcpProxy,
    outage_bucket: str,
    sestore_root: Path,
    cli_env: Any,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    rid, upload_id = give_up_during_outage(
        service, account, s3, endpoint, outage_bucket, sestore_root
    )
    code, out, _ = run_cli(capsys, "reap", "--list", "--json")
    assert code == 0 and f'"upload_id": "{upload_id}"' in out and f'"request_id": {rid}' in out
    code, out, _ = run_cli(capsys, "reap", "--list")
    assert code == 0 and "1 orphaned multipart uploads" in out

    endpoint.start()
    log = tmp_path / "reaper.log"
    worker = start_worker(worker_env(service, VODPUSH_REAP_INTERVAL="0.2"), log)
    try:
        wait_for(lambda: not service.orphans.list(), 60, "the reaper's abort")
    finally:
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(30) == 0
    assert uploads_in(s3, outage_bucket) == []
    (aborted,) = log_events(log, "orphan.aborted")
    assert (aborted["upload_id"], aborted["request_id"]) == (upload_id, rid)
    assert "testing" not in log.read_text()  # the account's S3 secret is never logged


def test_vodpush_reap_aborts_what_an_outage_left_behind(
    service: Service,
    account: Creds,
    s3: MotoServer,
    endpoint: TcpProxy,
    outage_bucket: str,
    sestore_root: Path,
    cli_env: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _, upload_id = give_up_during_outage(
        service, account, s3, endpoint, outage_bucket, sestore_root
    )
    code, out, err = run_cli(capsys, "reap")  # S3 still down
    assert code == 1
    assert "FAILED" in out and "0 aborted, 1 failed" in out
    assert "1 of 1 multipart uploads could not be aborted" in err
    (orphan,) = service.orphans.list()
    assert orphan.attempts == 1 and orphan.last_error.startswith("S3 connection error")  # type: ignore[union-attr]

    endpoint.start()
    code, out, err = run_cli(capsys, "reap")
    assert code == 0, err
    assert f"aborted #{orphan.id} s3://{outage_bucket}/big.mp4 upload {upload_id}" in out
    assert "1 aborted, 0 failed" in out
    assert service.orphans.list() == [] and uploads_in(s3, outage_bucket) == []
    code, out, _ = run_cli(capsys, "reap", "--list", "--json")
    assert code == 0 and out.strip() == "[]"


def test_a_permanent_error_whose_abort_fails_is_recorded(
    service: Service,
    account: Creds,
    s3: MotoServer,
    endpoint: TcpProxy,
    outage_bucket: str,
    sestore_root: Path,
    cli_env: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """S3 goes away mid-upload and the customer deletes the file meanwhile: the retry finds
    no source (permanent), the engine's abort fails, the upload id is recorded."""
    service.settings.max_attempts = 5
    service.settings.part_concurrency = 1
    rid, _ = queue_file(service, account, sestore_root, "gone.mp4", 40 * MiB, outage_bucket)
    thread = run_worker(service)
    wait_for(lambda: parts_stored(service, rid) >= 1, 60, "a stored part")
    endpoint.stop()
    (sestore_root / "sestore1" / account.username / "gone.mp4").unlink()
    thread.join(120)
    assert not thread.is_alive()
    row = request_row(service, rid)
    assert (row.state, row.error_code, row.attempts) == ("failed", "SourceUnavailable", 2)
    (orphan,) = service.orphans.list()
    assert orphan.request_id == rid and uploads_in(s3, outage_bucket) == [orphan.upload_id]

    endpoint.start()
    code, _, err = run_cli(capsys, "reap")
    assert code == 0, err
    assert service.orphans.list() == [] and uploads_in(s3, outage_bucket) == []


def test_a_request_that_kills_its_workers_keeps_its_upload_id_when_s3_is_down(
    service: Service,
    account: Creds,
    s3: MotoServer,
    endpoint: TcpProxy,
    outage_bucket: str,
    sestore_root: Path,
    cli_env: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The poison-request path (every worker that took it died) ends the request and
    aborts its upload; with S3 down the abort fails and the id is recorded."""
    rid, _ = queue_file(service, account, sestore_root, "poison.mp4", 1000, outage_bucket)
    upload_id = s3_client(s3).create_multipart_upload(Bucket=outage_bucket, Key="poison.mp4")[
        "UploadId"
    ]
    for n in range(service.settings.max_attempts):  # each claimer dies: its lease runs out
        assert service.queue.claim(f"dead-{n}", 0.001) is not None
        if n == 0:
            checkpoint = MultipartCheckpoint(upload_id, 5 * MiB, 12 * MiB, 1, True)
            service.ledger(rid, "dead-0", empty=True).begin(checkpoint)
        time.sleep(0.05)
    endpoint.stop()
    thread = run_worker(service)
    thread.join(60)
    assert not thread.is_alive()
    row = request_row(service, rid)
    assert (row.state, row.error_code) == ("failed", "WorkerDied")
    (orphan,) = service.orphans.list()
    assert (orphan.request_id, orphan.upload_id) == (rid, upload_id)
    assert uploads_in(s3, outage_bucket) == [upload_id]

    endpoint.start()
    assert run_cli(capsys, "reap")[0] == 0
    assert service.orphans.list() == [] and uploads_in(s3, outage_bucket) == []
