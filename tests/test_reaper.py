"""The reaper and the recording of orphaned multipart uploads, on the in-memory stores with
a store clock the test moves and an S3 client object answering in memory (no socket): a
worker gives up while S3 refuses every call, the reaper backs off, then aborts. The same
with a real database, moto and a TCP proxy that goes down is in test_reaper_faults.py."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError
from prometheus_client import REGISTRY

from vodpush.config import Settings
from vodpush.core.checkpoint import MemoryLedger, MultipartCheckpoint
from vodpush.core.requests import NewRequest
from vodpush.crypto import generate_key
from vodpush.service import Service
from vodpush.transfer import ObjectOptions, UploadError, UploadJob, upload
from vodpush.worker.reaper import Reaper
from vodpush.worker.retry import abort_delay
from vodpush.worker.runner import Worker

MiB = 1024 * 1024


class Clock:
    """The stores' clock: real time (the runner's retry times are), plus what the test
    skipped; frozen while ``frozen`` so that a backoff can be checked to the second."""

    def __init__(self) -> None:
        self.offset = timedelta()
        self.frozen: datetime | None = None

    @property
    def now(self) -> datetime:
        return self.frozen or datetime.now(UTC).replace(tzinfo=None) + self.offset

    def __call__(self) -> datetime:
        return self.now

    def freeze(self) -> None:
        self.frozen = self.now

    def advance(self, seconds: float) -> None:
        self.offset += timedelta(seconds=seconds)
        if self.frozen is not None:
            self.frozen += timedelta(seconds=seconds)


class FakeS3:
    """The S3 calls of an abort: ``down`` refuses the connection, ``gone`` answers
    NoSuchUpload, otherwise the abort succeeds. Every call is recorded."""

    def __init__(self) -> None:
        self.down = True
        self.gone = False
        self.aborts: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    def abort_multipart_upload(self, **kw: Any) -> dict[str, Any]:
        with self.lock:
            self.aborts.append(kw)
        if self.down:
            raise EndpointConnectionError(endpoint_url="http://127.0.0.1:9/b")
        if self.gone:
            raise ClientError({"Error": {"Code": "NoSuchUpload"}}, "AbortMultipartUpload")
        return {}


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def service(tmp_path: Path, clock: Clock) -> Iterator[Service]:
    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'unused.db'}",  # never opened
        sestore_root=tmp_path,
        secret_key=generate_key(),
        secret_key_file=tmp_path / "unused.key",
        poll_interval=0.05,
        retry_base_delay=0.0,
        retry_max_delay=0.0,
        max_attempts=2,
        retry_window=0,  # a schedule of seconds: no one-hour promise
        lease_seconds=5,
        reap_interval=0.05,
        reap_backoff=60,
        reap_backoff_max=3600,
    )
    svc = Service.in_memory(settings, clock=clock)
    yield svc
    svc.close()


def _request(service: Service, name: str = "a.mp4") -> tuple[int, int]:
    account = service.accounts.find("1/jb") if service.accounts.list() else None
    if account is None:
        account_id = int(service.accounts.create(cdn=1, username="jb")["id"])
        service.accounts.allow_buckets(str(account_id), ["b"])
    else:
        account_id = account.id
    rid = service.requests.enqueue(
        NewRequest(account_id, 1, f"sestore1/jb/{name}", f"out/{name}", "b", "private", {}, "",
                   f"sig-{name}")
    ).id  # fmt: skip
    return account_id, rid


def _orphan(service: Service, upload_id: str, name: str) -> int:
    """A request that gave its multipart upload up without a confirmed abort."""
    _, rid = _request(service, name)
    claimed = service.queue.claim("w", 30)
    assert claimed is not None and claimed.id == rid
    service.ledger(rid, "w", empty=True).begin(MultipartCheckpoint(upload_id, 5, 12, 99, True))
    service.queue.fail(rid, "w", message="Upload failed", http_status=None, code="X",
                       has_callback=False)  # fmt: skip
    return rid


def _counter(outcome: str) -> float:
    return REGISTRY.get_sample_value("vodpush_orphan_aborts_total", {"outcome": outcome}) or 0.0


def test_the_backoff_doubles_from_the_base_up_to_the_cap() -> None:
    delays = [abort_delay(n, base=60, cap=3600) for n in range(1, 10)]
    assert delays == [60, 120, 240, 480, 960, 1920, 3600, 3600, 3600]
    assert abort_delay(10**6, base=60, cap=3600) == 3600  # no overflow after years of it


def test_the_reaper_backs_off_while_s3_is_down_and_aborts_once_it_is_back(
    service: Service, clock: Clock
) -> None:
    clock.freeze()
    rid = _orphan(service, "up-1", "a.mp4")
    s3 = FakeS3()
    reaper = Reaper(service, lambda account: s3)
    failed_before, aborted_before = _counter("failed"), _counter("aborted")

    assert reaper.reap_due() == (0, 1)
    (orphan,) = service.orphans.list()
    assert (orphan.attempts, orphan.next_at) == (1, clock.now + timedelta(seconds=60))
    assert orphan.last_error == "S3 connection error: could not connect to the S3 endpoint"
    assert reaper.reap_due() == (0, 0)  # not due during its backoff
    for wait in (60, 120, 240):  # doubling after each failure
        clock.advance(wait)
        assert reaper.reap_due() == (0, 1)
    (orphan,) = service.orphans.list()
    assert (orphan.attempts, orphan.next_at) == (4, clock.now + timedelta(seconds=480))
    assert REGISTRY.get_sample_value("vodpush_orphan_uploads") == 1

    s3.down = False
    clock.advance(480)
    assert reaper.reap_due() == (1, 0)
    assert service.orphans.list() == []
    assert s3.aborts[-1] == {"Bucket": "b", "Key": "out/a.mp4", "UploadId": "up-1"}
    assert len(s3.aborts) == 5
    assert _counter("failed") - failed_before == 4 and _counter("aborted") - aborted_before == 1
    assert REGISTRY.get_sample_value("vodpush_orphan_uploads") == 0
    assert service.requests.get(rid).state == "failed"  # type: ignore[union-attr]


def test_no_such_upload_counts_as_confirmed(service: Service) -> None:
    _orphan(service, "up-1", "a.mp4")
    s3 = FakeS3()
    s3.down, s3.gone = False, True  # aborted meanwhile, or removed by a lifecycle rule
    assert Reaper(service, lambda account: s3).reap_due() == (1, 0)
    assert service.orphans.list() == []


def test_a_crashing_abort_does_not_stop_the_pass(service: Service) -> None:
    _orphan(service, "up-bug", "a.mp4")
    _orphan(service, "up-ok", "b.mp4")
    s3 = FakeS3()
    s3.down = False

    def client_for(account: Any) -> Any:
        if not s3.aborts:
            s3.aborts.append({"crashed": True})
            raise RuntimeError("a bug in making the client")
        return s3

    assert Reaper(service, client_for).reap_due() == (1, 1)
    (left,) = service.orphans.list()
    assert left.upload_id == "up-bug"
    assert left.last_error == "internal error: RuntimeError (see the worker log)"


def test_reap_now_takes_an_orphan_that_is_not_due(service: Service) -> None:
    _orphan(service, "up-1", "a.mp4")
    s3 = FakeS3()
    reaper = Reaper(service, lambda account: s3)
    assert reaper.reap_due() == (0, 1)  # now backing off for a minute
    (orphan,) = service.orphans.list()
    s3.down = False
    result = reaper.reap_now(orphan.id)
    assert result is not None and result[0].upload_id == "up-1" and result[1] is None
    assert service.orphans.list() == [] and reaper.reap_now(orphan.id) is None


def test_a_worker_that_gives_up_records_the_upload_its_reaper_then_aborts(
    service: Service,
) -> None:
    """The runner's give-up after max_attempts while S3 refuses everything: the abort
    fails, the request fails with the cause, the upload id is kept; the worker's reaper
    thread aborts it as soon as S3 answers."""
    _, rid = _request(service)
    s3 = FakeS3()

    def multipart_then_down(client: Any, job: Any, ledger: Any, **kw: Any) -> Any:
        if ledger.load() is None:
            ledger.begin(MultipartCheckpoint("up-1", 5 * MiB, 12 * MiB, 99, True))
        raise UploadError(
            "S3 connection error: could not connect to the S3 endpoint",
            transient=True,
            code="EndpointConnectionError",
        )

    worker = Worker(service, uploader=multipart_then_down, clients=lambda account: s3)
    thread = threading.Thread(target=worker.run, kwargs={"burst": True})
    thread.start()
    thread.join(20)
    assert not thread.is_alive()
    row = service.requests.get(rid)
    assert row is not None and (row.state, row.attempts) == ("failed", 2)
    assert row.message == "Upload failed: S3 connection error: could not connect to the S3 endpoint"
    (orphan,) = service.orphans.list()
    assert (orphan.request_id, orphan.upload_id, orphan.key) == (rid, "up-1", "out/a.mp4")
    assert s3.aborts  # the give-up tried to abort first

    s3.down = False
    worker = Worker(service, uploader=multipart_then_down, clients=lambda account: s3)
    thread = threading.Thread(target=worker.run)
    thread.start()
    try:
        deadline = time.monotonic() + 15
        while service.orphans.list() and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        worker.stop(0)
        thread.join(10)
    assert service.orphans.list() == []
    assert s3.aborts[-1] == {"Bucket": "b", "Key": "out/a.mp4", "UploadId": "up-1"}


class RefusingS3(FakeS3):
    """Refuses the abort (no s3:AbortMultipartUpload) and the new upload (bucket policy)."""

    def abort_multipart_upload(self, **kw: Any) -> dict[str, Any]:
        self.aborts.append(kw)
        raise ClientError({"Error": {"Code": "AccessDenied"}}, "AbortMultipartUpload")

    def create_multipart_upload(self, **kw: Any) -> dict[str, Any]:
        raise ClientError({"Error": {"Code": "AccessDenied"}}, "CreateMultipartUpload")

    def get_paginator(self, name: str) -> Any:
        # The resume lists the old upload's parts first: S3 still holds it, with none.
        assert name == "list_parts"
        return SimpleNamespace(paginate=lambda **kw: iter([{"Parts": []}]))


def test_a_discarded_checkpoint_whose_abort_fails_is_given_up_not_forgotten(
    tmp_path: Path,
) -> None:
    """The source changed since the checkpoint: the engine discards it and starts anew; S3
    refuses the abort, so the upload id goes to the ledger's give_up."""
    source = tmp_path / "video.mp4"
    source.write_bytes(b"v" * (6 * MiB))
    ledger = MemoryLedger()
    ledger.begin(MultipartCheckpoint("up-old", 5 * MiB, 6 * MiB, 1, False))  # another mtime
    s3 = RefusingS3()
    job = UploadJob(source=source, bucket="b", key="k", options=ObjectOptions(checksums=False))
    with pytest.raises(UploadError) as raised:
        upload(s3, job, ledger, threshold=5 * MiB, chunksize=5 * MiB, concurrency=1)  # type: ignore[arg-type]
    assert raised.value.code == "AccessDenied"
    assert s3.aborts == [{"Bucket": "b", "Key": "k", "UploadId": "up-old"}]
    assert ledger.given_up == ["up-old"] and ledger.load() is None
