"""Resuming sees what S3 already has, and a source that changed is never reported uploaded.

A worker killed after S3 stored the object (CompleteMultipartUpload or PutObject answered)
but before the request's success was recorded: the next worker claims that object instead
of writing a second version, and never claims another one. A source file rewritten while
it is uploaded (same size, its mtime set back; or another file renamed over it) is not
reported as uploaded, and its stale bytes are never written as the object.

The faults are real: a moto S3 process behind a TCP proxy that lets a chosen request through
and then SIGKILLs the worker process (with the request's row locked meanwhile, so the
worker cannot record anything in between), cuts a response, or answers in S3's place;
buckets have versioning on, so S3 itself counts the objects written.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, update

from tests.conftest import MiB, s3_client
from tests.faults import log_events, queue_file, request_row, start_worker, worker_env
from tests.s3server import Intercept, MotoServer, TcpProxy, s3_error
from vodpush.core.checkpoint import MemoryLedger
from vodpush.persistence.models import UploadRequest
from vodpush.service import Service
from vodpush.transfer import ObjectOptions, UploadError, UploadJob, upload
from vodpush.transfer.s3client import make_s3_client
from vodpush.transfer.verify import holds_same

PART = 5 * MiB


# -- helpers --------------------------------------------------------------------------------


def versions(client: Any, bucket: str, key: str) -> list[dict[str, Any]]:
    listed = client.list_object_versions(Bucket=bucket, Prefix=key).get("Versions", [])
    return [v for v in listed if v["Key"] == key]


def open_uploads(client: Any, bucket: str) -> list[dict[str, Any]]:
    return client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])


@pytest.fixture
def vbucket(versioned_bucket: str) -> str:
    return versioned_bucket


@pytest.fixture
def proxy(s3: MotoServer) -> Iterator[TcpProxy]:
    endpoint = TcpProxy(s3.port).start()
    yield endpoint
    endpoint.stop()


def operations(client: Any) -> list[str]:
    """The S3 operations ``client`` sends from now on, seen by botocore's own event hook."""
    seen: list[str] = []
    client.meta.events.register(
        "before-send.s3", lambda event_name, **_: seen.append(event_name.rsplit(".", 1)[-1])
    )
    return seen


def run(client: Any, job: UploadJob, ledger: MemoryLedger, **options: Any) -> Any:
    tuning = {"threshold": PART, "chunksize": PART, "concurrency": 2} | options
    return upload(client, job, ledger, **tuning)


def rewrite_keeping_mtime(path: Path) -> bytes:
    """Another content of the same size written in place, its mtime set back: only ctime
    tells (what `touch -r`, rsync --inplace or a careless tool do)."""
    before = os.stat(path)
    data = os.urandom(before.st_size)
    with open(path, "r+b") as fh:
        fh.write(data)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert os.stat(path).st_mtime_ns == before.st_mtime_ns
    return data


class RowLock:
    """A write lock on one request's row, held by this test (SQLite: the database's write
    lock; PostgreSQL: the row's lock) from ``hold()`` to ``release()``: meanwhile a worker
    can record nothing about the request, so a kill in that window is a kill before the
    outcome was recorded, whatever the scheduler does."""

    def __init__(self, engine: Engine, request_id: int) -> None:
        self._engine = engine
        self._request_id = request_id
        self._held = threading.Event()
        self._release = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with self._engine.connect() as conn:
            transaction = conn.begin()
            conn.execute(
                update(UploadRequest)
                .where(UploadRequest.id == self._request_id)
                .values(updated_at=UploadRequest.updated_at)
            )
            self._held.set()
            self._release.wait(120)
            transaction.rollback()

    def hold(self) -> None:
        self._thread.start()
        assert self._held.wait(60), "could not lock the request's row"

    def release(self) -> None:
        self._release.set()
        self._thread.join(60)


def kill_between_s3_and_the_record(
    service: Service, proxy: TcpProxy, request_id: int, marker: bytes, log: Path
) -> subprocess.Popen:
    """Start a worker; let the request holding ``marker`` through to S3 and its answer back
    to the worker with the request's row locked, then SIGKILL the worker."""
    lock = RowLock(service.engine, request_id)
    worker: list[subprocess.Popen] = []

    def kill() -> None:
        worker[0].send_signal(signal.SIGKILL)
        worker[0].wait(30)

    rule = proxy.intercept(Intercept(marker=marker, before=lock.hold, after=kill))
    worker.append(start_worker(worker_env(service), log))
    try:
        assert rule.done.wait(120), "the worker never sent the request"
    finally:
        if worker[0].poll() is None:
            worker[0].kill()
            worker[0].wait(30)
        lock.release()
    return worker[0]


# -- killed after S3 stored the object, before success was recorded -------------------------


@pytest.mark.slow
def test_worker_killed_after_complete_multipart_next_worker_claims_the_object(
    service: Service, s3_account: Any, s3: MotoServer, vbucket: str, proxy: TcpProxy, tmp_path
) -> None:
    service.accounts.set_s3(s3_account.api_key, s3.settings(sse="AES256", endpoint_url=proxy.url))
    rid, data = queue_file(
        service, s3_account, service.settings.sestore_root, "m.mp4", 13 * MiB, vbucket
    )
    killed = kill_between_s3_and_the_record(
        service, proxy, rid, f"POST /{vbucket}/m.mp4?uploadId=".encode(), tmp_path / "w1.log"
    )
    assert killed.returncode == -signal.SIGKILL
    client = s3_client(s3)
    (stored,) = versions(client, vbucket, "m.mp4")  # S3 completed the upload
    row = request_row(service, rid)
    assert row.state == "running" and row.multipart_json  # nothing recorded, lease held

    again = start_worker(worker_env(service), tmp_path / "w2.log", "--burst")
    assert again.wait(120) == 0
    row = request_row(service, rid)
    assert row.state == "succeeded", row.message
    assert (row.attempts, row.lease_expiries) == (2, 1)
    assert row.sha256 == hashlib.sha256(data).hexdigest()
    assert row.multipart_json is None  # dropped with the record of success
    # The upload S3 completed is gone there: not recorded as an orphan for the reaper.
    assert service.orphans.count() == 0
    # Exactly one object version: the one the killed worker's upload made, named as the result.
    assert [v["VersionId"] for v in versions(client, vbucket, "m.mp4")] == [stored["VersionId"]]
    results = json.loads(row.results_json)
    assert results["VersionId"] == stored["VersionId"]
    assert results["ETag"] == stored["ETag"] and results["ETag"].endswith('-3"')
    assert results["ServerSideEncryption"] == "AES256"
    (found,) = log_events(tmp_path / "w2.log", "s3.multipart.found_completed")
    assert found["version_id"] == stored["VersionId"]
    (done,) = log_events(tmp_path / "w2.log", "upload.succeeded")
    assert (done["parts_sent"], done["parts_total"]) == (0, 3)
    assert not log_events(tmp_path / "w2.log", "s3.multipart.create")
    assert open_uploads(client, vbucket) == []
    assert client.get_object(Bucket=vbucket, Key="m.mp4")["Body"].read() == data


@pytest.mark.slow
def test_worker_killed_after_put_next_worker_claims_the_object(
    service: Service, s3_account: Any, s3: MotoServer, vbucket: str, proxy: TcpProxy, tmp_path
) -> None:
    service.accounts.set_s3(s3_account.api_key, s3.settings(sse="AES256", endpoint_url=proxy.url))
    rid, data = queue_file(
        service, s3_account, service.settings.sestore_root, "s.mp4", MiB, vbucket
    )
    kill_between_s3_and_the_record(
        service, proxy, rid, f"PUT /{vbucket}/s.mp4 HTTP/1.1".encode(), tmp_path / "w1.log"
    )
    client = s3_client(s3)
    (stored,) = versions(client, vbucket, "s.mp4")
    assert request_row(service, rid).state == "running"

    again = start_worker(worker_env(service), tmp_path / "w2.log", "--burst")
    assert again.wait(120) == 0
    row = request_row(service, rid)
    assert row.state == "succeeded", row.message
    assert row.attempts == 2 and row.sha256 == hashlib.sha256(data).hexdigest()
    assert [v["VersionId"] for v in versions(client, vbucket, "s.mp4")] == [stored["VersionId"]]
    results = json.loads(row.results_json)
    assert (results["VersionId"], results["ETag"]) == (stored["VersionId"], stored["ETag"])
    (found,) = log_events(tmp_path / "w2.log", "s3.found_same")
    assert found["version_id"] == stored["VersionId"]
    (done,) = log_events(tmp_path / "w2.log", "upload.succeeded")
    assert done["parts_sent"] == 0


# -- the engine: what is claimed, and what never is -----------------------------------------


@pytest.mark.parametrize("checksums", [True, False], ids=["sha256", "md5-etag"])
def test_a_completed_upload_whose_success_was_not_recorded_is_claimed(
    s3: MotoServer, vbucket: str, tmp_path: Path, checksums: bool
) -> None:
    client = make_s3_client(s3.settings(checksums=checksums))
    data = os.urandom(3 * PART + 1000)
    (tmp_path / "f.mp4").write_bytes(data)
    job = UploadJob(
        source=tmp_path / "f.mp4", bucket=vbucket, key="f.mp4",
        options=ObjectOptions(checksums=checksums),
    )  # fmt: skip
    ledger = MemoryLedger()
    first = run(client, job, ledger)
    assert first.parts_sent == 4
    # The caller died before recording it: the checkpoint is all that is left.
    assert ledger.load() is not None

    sent = operations(client)
    progress: list[int] = []
    again = run(client, job, ledger, progress=lambda done, total: progress.append(done))
    assert sent == ["ListParts", "HeadObject"]  # no part, no upload, no PUT
    assert (again.parts_sent, again.parts_total, again.size) == (0, 4, len(data))
    assert again.sha256 == hashlib.sha256(data).hexdigest()
    assert again.results["VersionId"] == first.results["VersionId"]
    assert again.results["ETag"] == first.results["ETag"]
    assert progress[-1] == len(data)
    assert len(versions(client, vbucket, "f.mp4")) == 1


def test_another_object_under_the_key_is_never_claimed(
    s3: MotoServer, vbucket: str, tmp_path: Path
) -> None:
    client = make_s3_client(s3.settings())
    data = os.urandom(2 * PART + 10)
    (tmp_path / "g.mp4").write_bytes(data)
    job = UploadJob(source=tmp_path / "g.mp4", bucket=vbucket, key="g.mp4")
    ledger = MemoryLedger()
    run(client, job, ledger)
    # Someone writes other bytes of the same size under the key before we look again.
    other = client.put_object(Bucket=vbucket, Key="g.mp4", Body=os.urandom(len(data)))

    again = run(client, job, ledger)
    assert again.parts_sent == again.parts_total == 3  # sent again, as before this change
    assert again.results["VersionId"] not in ("", other["VersionId"])
    assert client.get_object(Bucket=vbucket, Key="g.mp4")["Body"].read() == data
    assert len(versions(client, vbucket, "g.mp4")) == 3


def test_a_file_changed_since_its_upload_completed_is_sent_again(
    s3: MotoServer, vbucket: str, tmp_path: Path
) -> None:
    client = make_s3_client(s3.settings())
    path = tmp_path / "h.mp4"
    path.write_bytes(os.urandom(2 * PART + 10))
    job = UploadJob(source=path, bucket=vbucket, key="h.mp4")
    ledger = MemoryLedger()
    run(client, job, ledger)
    new = rewrite_keeping_mtime(path)  # the object is the old file now

    again = run(client, job, ledger)
    assert again.parts_sent == 3 and again.sha256 == hashlib.sha256(new).hexdigest()
    assert client.get_object(Bucket=vbucket, Key="h.mp4")["Body"].read() == new


def test_a_lost_complete_answer_then_no_such_upload_claims_the_object(
    s3: MotoServer, vbucket: str, tmp_path: Path, proxy: TcpProxy
) -> None:
    """S3 completed the upload but its answer was lost; botocore sends the Complete again
    and AWS answers NoSuchUpload (moto would repeat its answer: the proxy answers as AWS)."""
    client = make_s3_client(s3.settings(endpoint_url=proxy.url))
    data = os.urandom(2 * PART + 10)
    (tmp_path / "c.mp4").write_bytes(data)
    marker = f"POST /{vbucket}/c.mp4?uploadId=".encode()
    cut = proxy.intercept(Intercept(marker=marker, cut=True))
    gone = s3_error(404, "NoSuchUpload", "The specified upload does not exist.")
    answered = proxy.intercept(Intercept(marker=marker, answer=gone))
    ledger = MemoryLedger()

    result = run(client, UploadJob(source=tmp_path / "c.mp4", bucket=vbucket, key="c.mp4"), ledger)
    assert cut.done.is_set() and answered.done.is_set()
    (stored,) = versions(s3_client(s3), vbucket, "c.mp4")
    assert result.results["VersionId"] == stored["VersionId"]
    assert (result.parts_sent, result.parts_total) == (3, 3)
    assert result.sha256 == hashlib.sha256(data).hexdigest()


def test_a_single_put_retried_claims_the_object_it_wrote(
    s3: MotoServer, vbucket: str, tmp_path: Path
) -> None:
    for checksums in (True, False):
        client = make_s3_client(s3.settings(checksums=checksums))
        key = f"one-{checksums}.mp4"
        (tmp_path / key).write_bytes(os.urandom(1000))
        options = ObjectOptions(checksums=checksums)
        first = run(
            client,
            UploadJob(source=tmp_path / key, bucket=vbucket, key=key, options=options),
            MemoryLedger(),
        )
        sent = operations(client)
        job = UploadJob(
            source=tmp_path / key, bucket=vbucket, key=key, options=options, may_exist=True
        )
        again = run(client, job, MemoryLedger())
        assert sent == ["HeadObject"], checksums
        assert again.results["VersionId"] == first.results["VersionId"]
        assert (again.parts_sent, again.sha256) == (0, first.sha256)
        assert len(versions(client, vbucket, key)) == 1


def test_a_single_put_retried_overwrites_other_bytes(
    s3: MotoServer, vbucket: str, tmp_path: Path
) -> None:
    client = make_s3_client(s3.settings())
    data = os.urandom(1000)
    (tmp_path / "o.mp4").write_bytes(data)
    client.put_object(Bucket=vbucket, Key="o.mp4", Body=os.urandom(1000))  # not ours
    sent = operations(client)
    job = UploadJob(source=tmp_path / "o.mp4", bucket=vbucket, key="o.mp4", may_exist=True)
    result = run(client, job, MemoryLedger())
    assert sent[:2] == ["HeadObject", "PutObject"]
    assert result.parts_sent == 1
    assert client.get_object(Bucket=vbucket, Key="o.mp4")["Body"].read() == data
    assert len(versions(client, vbucket, "o.mp4")) == 2
    # A first attempt does not look at all.
    sent.clear()
    run(client, UploadJob(source=tmp_path / "o.mp4", bucket=vbucket, key="o.mp4"), MemoryLedger())
    assert sent[0] == "PutObject"


def test_the_same_bytes_stored_otherwise_are_written_again(
    s3: MotoServer, vbucket: str, tmp_path: Path
) -> None:
    """Another request's object with these very bytes but other metadata, Content-Type,
    Cache-Control, Content-Disposition or storage class is not this request's upload."""
    client = make_s3_client(s3.settings())
    data = os.urandom(1000)
    (tmp_path / "t.mp4").write_bytes(data)
    options = ObjectOptions(
        metadata={"title": "new"},
        cache_control="max-age=60",
        content_disposition="inline",
        storage_class="STANDARD_IA",
    )
    job = UploadJob(
        source=tmp_path / "t.mp4", bucket=vbucket, key="t.mp4", options=options, may_exist=True
    )
    asked = {
        "ContentType": "video/mp4",  # as guessed from the key: else moto's default differs
        "Metadata": {"title": "new"},
        "CacheControl": "max-age=60",
        "ContentDisposition": "inline",
        "StorageClass": "STANDARD_IA",
    }
    for other in (
        {"Metadata": {"title": "old"}},
        {"ContentType": "text/plain"},
        {"CacheControl": "no-cache"},
        {"ContentDisposition": "attachment"},
        {"StorageClass": "STANDARD"},
    ):
        client.put_object(Bucket=vbucket, Key="t.mp4", Body=data, **(asked | other))
        sent = operations(client)
        run(client, job, MemoryLedger())
        assert "PutObject" in sent, other
        head = client.head_object(Bucket=vbucket, Key="t.mp4")
        assert {k: head.get(k) for k in asked} == asked
    sent.clear()
    run(client, job, MemoryLedger())  # now it is stored as asked: claimed
    assert sent == ["HeadObject"]


def test_only_proof_counts_as_the_same_object() -> None:
    sha = "q" * 43 + "="
    assert holds_same({"ContentLength": 5, "ChecksumSHA256": sha}, size=5, sha256=sha)
    assert not holds_same({"ContentLength": 6, "ChecksumSHA256": sha}, size=5, sha256=sha)
    assert not holds_same({"ContentLength": 5, "ChecksumSHA256": "x" + sha[1:]}, size=5, sha256=sha)
    md5 = "0" * 32
    assert holds_same({"ContentLength": 5, "ETag": f'"{md5}"'}, size=5, etag=md5)
    assert not holds_same({"ContentLength": 5, "ETag": f'"{"1" * 32}"'}, size=5, etag=md5)
    # An SSE-KMS ETag is not an MD5: nothing proves the object ours, so it is written again.
    kms = {"ContentLength": 5, "ETag": f'"{md5}"', "ServerSideEncryption": "aws:kms"}
    assert not holds_same(kms, size=5, etag=md5)
    assert not holds_same({"ContentLength": 5}, size=5, sha256=sha, etag=md5)


# -- the source changed while it was uploaded -----------------------------------------------


def test_a_rewrite_with_mtime_restored_after_the_last_read_is_not_uploaded(
    s3: MotoServer, bucket: str, tmp_path: Path
) -> None:
    client = make_s3_client(s3.settings())
    path = tmp_path / "r.mp4"
    path.write_bytes(os.urandom(3 * PART))
    ledger = MemoryLedger()

    def rewrite_at_the_end(done: int, total: int) -> None:
        if done == total:  # every part read and sent; CompleteMultipartUpload is next
            rewrite_keeping_mtime(path)

    with pytest.raises(UploadError) as info:
        run(client, UploadJob(source=path, bucket=bucket, key="r.mp4"), ledger,
            progress=rewrite_at_the_end)  # fmt: skip
    assert (info.value.code, info.value.transient) == ("SourceChanged", True)
    assert str(info.value) == (
        f"source file changed while uploading (it was changed, renamed or removed): {path}"
    )
    assert versions(client, bucket, "r.mp4") == [] and open_uploads(client, bucket) == []
    assert ledger.load() is None  # aborted: the retry sends the file as it is then


def test_a_file_renamed_over_the_source_is_not_uploaded(
    s3: MotoServer, bucket: str, tmp_path: Path
) -> None:
    client = make_s3_client(s3.settings())
    path = tmp_path / "n.mp4"
    path.write_bytes(os.urandom(2 * PART))

    def replace_at_the_end(done: int, total: int) -> None:
        if done == total:
            (tmp_path / "n.new").write_bytes(os.urandom(2 * PART))
            os.rename(tmp_path / "n.new", path)

    with pytest.raises(UploadError) as info:
        run(client, UploadJob(source=path, bucket=bucket, key="n.mp4"), MemoryLedger(),
            progress=replace_at_the_end)  # fmt: skip
    assert str(info.value) == (
        f"source file changed while uploading (another file has taken its name): {path}"
    )
    assert versions(client, bucket, "n.mp4") == [] and open_uploads(client, bucket) == []


def test_a_checkpoint_of_another_version_of_the_file_is_not_resumed(
    s3: MotoServer, bucket: str, tmp_path: Path
) -> None:
    """Between two attempts the file is rewritten, same size, mtime set back: ctime tells,
    and none of the earlier parts are used (where the part ETags cannot be compared, as
    under SSE-KMS, they would have been trusted)."""
    client = make_s3_client(s3.settings())
    path = tmp_path / "a.mp4"
    path.write_bytes(os.urandom(3 * PART))
    job = UploadJob(source=path, bucket=bucket, key="a.mp4")
    ledger = MemoryLedger()
    calls = 0

    def stop_after_two() -> bool:
        nonlocal calls
        calls += 1
        return calls > 3

    with pytest.raises(UploadError):
        run(client, job, ledger, concurrency=1, should_stop=stop_after_two)
    old = ledger.load()
    assert old is not None and old.ctime_ns is not None and len(old.parts) == 2
    new = rewrite_keeping_mtime(path)

    result = run(client, job, ledger)
    assert result.parts_sent == 3 and result.sha256 == hashlib.sha256(new).hexdigest()
    assert ledger.load().upload_id != old.upload_id  # type: ignore[union-attr]
    assert open_uploads(client, bucket) == []  # the old upload was aborted


@pytest.mark.slow
def test_a_worker_never_reports_a_source_rewritten_mid_upload(
    service: Service, s3_account: Any, s3: MotoServer, vbucket: str, proxy: TcpProxy, tmp_path
) -> None:
    """The file is rewritten in place (same size, mtime set back) while its last part is
    on its way: no success, the state and message say why, nothing stale is stored; the
    retry uploads the file as it is now."""
    service.accounts.set_s3(s3_account.api_key, s3.settings(sse="AES256", endpoint_url=proxy.url))
    root = service.settings.sestore_root
    rid, _ = queue_file(service, s3_account, root, "live.mp4", 3 * PART, vbucket)
    path = root / "sestore1" / s3_account.username / "live.mp4"
    new: list[bytes] = []
    rule = proxy.intercept(
        Intercept(
            marker=b"&partNumber=3 HTTP/1.1", before=lambda: new.append(rewrite_keeping_mtime(path))
        )
    )
    env = worker_env(service, VODPUSH_RETRY_BASE_DELAY="4", VODPUSH_MAX_ATTEMPTS="2")
    worker = start_worker(env, tmp_path / "w.log", "--burst")
    try:
        deadline = time.monotonic() + 90
        while (row := request_row(service, rid)).state != "retrying":
            assert row.state != "succeeded", "a rewritten source was reported uploaded"
            assert time.monotonic() < deadline and worker.poll() is None, row.message
            time.sleep(0.02)
        assert rule.done.is_set()
        assert row.error_code == "SourceChanged"
        assert (
            "(attempt 2 of 2): source file changed while uploading (it was changed, "
            f"renamed or removed): sestore1/{s3_account.username}/live.mp4" in row.message
        )
        client = s3_client(s3)
        assert versions(client, vbucket, "live.mp4") == []  # nothing was stored
        assert open_uploads(client, vbucket) == []  # the upload was aborted
        assert worker.wait(120) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait(30)
    row = request_row(service, rid)
    assert (row.state, row.attempts) == ("succeeded", 2), row.message
    assert row.sha256 == hashlib.sha256(new[0]).hexdigest()
    (stored,) = versions(client, vbucket, "live.mp4")
    assert json.loads(row.results_json)["VersionId"] == stored["VersionId"]
    assert client.get_object(Bucket=vbucket, Key="live.mp4")["Body"].read() == new[0]
