"""The S3 upload engine against a real S3 server (moto's, as a subprocess), plus unit tests
of its pure parts: classification, verification, content types, the in-memory ledger."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import threading
import tracemalloc
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    ReadTimeoutError,
)

from tests.s3server import MotoServer
from vodpush.core.accounts import S3Settings
from vodpush.core.checkpoint import MemoryLedger, MultipartCheckpoint, PartRecord
from vodpush.core.records import RESULT_KEYS
from vodpush.metadata import decode_value
from vodpush.transfer import (
    ObjectOptions,
    UploadError,
    UploadInterrupted,
    UploadJob,
    abandon,
    classify,
    guess_content_type,
    object_url,
    upload,
    verify_stored,
)
from vodpush.transfer.s3client import make_s3_client
from vodpush.transfer.source import SourceFile
from vodpush.transfer.verify import verify_upload

MiB = 1024 * 1024
PART = 5 * MiB  # S3's minimum part size
BIG = 18 * MiB  # four parts: 5 + 5 + 5 + 3 MiB
ALL_USERS = "http://acs.amazonaws.com/groups/global/AllUsers"


# -- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    with MotoServer(log_dir=tmp_path_factory.mktemp("moto")) as server:
        yield server


@pytest.fixture
def s3(moto: MotoServer) -> Any:
    return make_s3_client(moto.settings())


@pytest.fixture
def bucket(s3: Any) -> str:
    name = f"vodpush-{uuid.uuid4().hex[:16]}"
    s3.create_bucket(Bucket=name)
    return name


def make_file(path: Path, size: int) -> bytes:
    data = os.urandom(size)
    path.write_bytes(data)
    return data


def get_bytes(s3: Any, bucket: str, key: str) -> bytes:
    return s3.get_object(Bucket=bucket, Key=key)["Body"].read()


def open_uploads(s3: Any, bucket: str) -> list[dict[str, Any]]:
    return s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])


def run(s3: Any, job: UploadJob, ledger: MemoryLedger | None = None, **options: Any) -> Any:
    tuning = {"threshold": PART, "chunksize": PART, "concurrency": 3} | options
    return upload(s3, job, ledger if ledger is not None else MemoryLedger(), **tuning)


def stop_after(parts: int) -> Any:
    """A should_stop that lets ``parts`` parts start: upload() polls it once before it
    begins and once before each part."""
    calls = 0

    def should_stop() -> bool:
        nonlocal calls
        calls += 1
        return calls > parts + 1

    return should_stop


def capture_headers(client: Any) -> list[tuple[str, dict[str, str]]]:
    """Every request's operation and headers, observed through botocore's own event hook."""
    seen: list[tuple[str, dict[str, str]]] = []

    def record(request: Any, event_name: str, **_: Any) -> None:
        headers = {
            k.lower(): v.decode() if isinstance(v, bytes) else v for k, v in request.headers.items()
        }
        seen.append((event_name.rsplit(".", 1)[-1], headers))

    client.meta.events.register("before-send.s3", record)
    return seen


# -- single PutObject -----------------------------------------------------------------------


def test_small_file_single_put(s3: Any, bucket: str, moto: MotoServer, tmp_path: Path) -> None:
    data = make_file(tmp_path / "clip.bin", 200_000)
    metadata = {"title": "Café ☕ 東京", "plain": "hello world"}
    job = UploadJob(
        source=tmp_path / "clip.bin",
        bucket=bucket,
        key="videos/clip one.mp4",
        options=ObjectOptions(acl="public-read", metadata=metadata, sse="AES256"),
    )
    calls: list[tuple[int, int]] = []
    result = run(s3, job, progress=lambda done, total: calls.append((done, total)))

    assert get_bytes(s3, bucket, "videos/clip one.mp4") == data
    assert result.sha256 == hashlib.sha256(data).hexdigest()
    assert (result.size, result.parts_sent, result.parts_total) == (len(data), 1, 1)
    assert result.http_status == 200
    assert calls == [(len(data), len(data))]

    head = s3.head_object(Bucket=bucket, Key="videos/clip one.mp4")
    assert head["ContentType"] == "video/mp4"
    assert {k: decode_value(v) for k, v in head["Metadata"].items()} == metadata
    assert head["ServerSideEncryption"] == "AES256"
    grants = s3.get_object_acl(Bucket=bucket, Key="videos/clip one.mp4")["Grants"]
    assert any(g["Grantee"].get("URI") == ALL_USERS and g["Permission"] == "READ" for g in grants)

    assert tuple(sorted(result.results)) == tuple(sorted(RESULT_KEYS))
    assert result.results["Bucket"] == bucket
    assert result.results["Key"] == "videos/clip one.mp4"
    assert result.results["ServerSideEncryption"] == "AES256"
    assert result.results["ETag"] == f'"{hashlib.md5(data).hexdigest()}"'
    assert result.results["ObjectURL"] == f"{moto.url}/{bucket}/videos/clip%20one.mp4"
    assert result.results["Location"] == result.results["ObjectURL"]
    assert result.results["SSEKMSKeyId"] == ""
    assert all(isinstance(v, str) for v in result.results.values())


def test_private_acl_grants_nothing_public(s3: Any, bucket: str, tmp_path: Path) -> None:
    make_file(tmp_path / "a.m3u8", 1000)
    run(
        s3,
        UploadJob(
            source=tmp_path / "a.m3u8",
            bucket=bucket,
            key="a.m3u8",
            options=ObjectOptions(acl="private"),
        ),
    )
    grants = s3.get_object_acl(Bucket=bucket, Key="a.m3u8")["Grants"]
    assert grants and all(g["Grantee"].get("URI") != ALL_USERS for g in grants)
    head = s3.head_object(Bucket=bucket, Key="a.m3u8", ChecksumMode="ENABLED")
    assert head["ContentType"] == "application/vnd.apple.mpegurl"
    assert "ServerSideEncryption" not in head


def test_empty_file(s3: Any, bucket: str, tmp_path: Path) -> None:
    (tmp_path / "empty.mp4").write_bytes(b"")
    result = run(s3, UploadJob(source=tmp_path / "empty.mp4", bucket=bucket, key="empty.mp4"))
    assert result.size == 0 and get_bytes(s3, bucket, "empty.mp4") == b""


def test_single_put_sends_sha256_not_md5(moto: MotoServer, bucket: str, tmp_path: Path) -> None:
    client = make_s3_client(moto.settings())
    seen = capture_headers(client)
    data = make_file(tmp_path / "x.mp4", 1000)
    run(client, UploadJob(source=tmp_path / "x.mp4", bucket=bucket, key="x.mp4"))
    puts = [h for op, h in seen if op == "PutObject"]
    assert len(puts) == 1
    assert "content-md5" not in puts[0]  # the SHA-256 checksum guards the body
    assert (
        puts[0]["x-amz-checksum-sha256"] == base64.b64encode(hashlib.sha256(data).digest()).decode()
    )


def test_checksum_echo_verifies_without_head(moto: MotoServer, bucket: str, tmp_path: Path) -> None:
    # S3 answers a write with the SHA-256 it computed over what it stored: when that is ours,
    # no HeadObject is needed. Bodies go unsigned (the checksum, a signed header, guards them).
    client = make_s3_client(moto.settings())
    seen = capture_headers(client)
    make_file(tmp_path / "one.mp4", 1000)
    make_file(tmp_path / "parts.mp4", 11 * MiB)
    run(client, UploadJob(source=tmp_path / "one.mp4", bucket=bucket, key="one.mp4"))
    assert [op for op, _ in seen] == ["PutObject"]
    run(client, UploadJob(source=tmp_path / "parts.mp4", bucket=bucket, key="parts.mp4"))
    # moto's CompleteMultipartUpload answer leaves the checksum out (S3's has it): HEAD then.
    assert [op for op, _ in seen][-2:] == ["CompleteMultipartUpload", "HeadObject"]
    bodies = [h for op, h in seen if op in ("PutObject", "UploadPart")]
    assert len(bodies) == 4
    assert {h["x-amz-content-sha256"] for h in bodies} == {"UNSIGNED-PAYLOAD"}


class NoCallsClient:
    """A client that must not be called (verification settled by the write response)."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"unexpected S3 call: {name}")


def test_composite_checksum_echo_settles_multipart(tmp_path: Path) -> None:
    job = UploadJob(source=tmp_path / "x.mp4", bucket="b", key="x.mp4")
    digests = [hashlib.sha256(bytes([n])).digest() for n in range(3)]
    composite = base64.b64encode(hashlib.sha256(b"".join(digests)).digest()).decode() + "-3"
    whole = base64.b64encode(hashlib.sha256(b"whole").digest()).decode()
    checks = {
        "size": 3,
        "sha256": whole,
        "sha256_composite": composite,
        "etag": lambda: "0" * 32 + "-3",
    }
    verify_upload(NoCallsClient(), job, {"ChecksumSHA256": composite}, **checks)  # type: ignore[arg-type]
    # A different echo is not taken on trust: S3 is asked (here, the client refuses).
    wrong = base64.b64encode(hashlib.sha256(b"other").digest()).decode() + "-3"
    with pytest.raises(AssertionError, match="head_object"):
        verify_upload(NoCallsClient(), job, {"ChecksumSHA256": wrong}, **checks)  # type: ignore[arg-type]


def test_without_checksums_head_object_verifies(
    moto: MotoServer, bucket: str, tmp_path: Path
) -> None:
    client = make_s3_client(moto.settings(checksums=False))
    seen = capture_headers(client)
    make_file(tmp_path / "one.mp4", 1000)
    make_file(tmp_path / "parts.mp4", 11 * MiB)
    run(
        client,
        UploadJob(
            source=tmp_path / "one.mp4",
            bucket=bucket,
            key="one.mp4",
            options=ObjectOptions(checksums=False),
        ),
    )
    run(
        client,
        UploadJob(
            source=tmp_path / "parts.mp4",
            bucket=bucket,
            key="parts.mp4",
            options=ObjectOptions(checksums=False),
        ),
    )
    assert [op for op, _ in seen].count("HeadObject") == 2


class ChecksumBlindClient:
    """A fake store that ignores checksum headers: HeadObject reports only size and ETag."""

    def __init__(self, head: dict[str, Any]) -> None:
        self.head = head
        self.deleted: list[dict[str, Any]] = []

    def head_object(self, **_: Any) -> dict[str, Any]:
        return self.head

    def delete_object(self, **kwargs: Any) -> dict[str, Any]:
        self.deleted.append(kwargs)
        return {}


@pytest.mark.parametrize("parts", [None, PART])
def test_store_without_checksums_is_verified_by_md5_etag(tmp_path: Path, parts: int | None) -> None:
    # No SHA-256 comes back: the file is read again for the MD5 ETag, and compared.
    data = make_file(tmp_path / "x.mp4", 2 * PART + 10)
    if parts is None:
        good = hashlib.md5(data).hexdigest()
    else:
        digests = [hashlib.md5(data[i : i + PART]).digest() for i in range(0, len(data), PART)]
        good = f"{hashlib.md5(b''.join(digests)).hexdigest()}-3"
    job = UploadJob(source=tmp_path / "x.mp4", bucket="b", key="x.mp4")
    sha = base64.b64encode(hashlib.sha256(data).digest()).decode()
    source = SourceFile(job.source)
    try:
        checks = {
            "size": len(data),
            "sha256": sha,
            "sha256_composite": None,
            "etag": lambda: source.md5_etag(parts),
        }
        written = {"ETag": f'"{good}"'}
        verify_upload(
            ChecksumBlindClient({"ContentLength": len(data), **written}), job, written, **checks
        )
        bad = "0" * 32 + ("" if parts is None else "-3")
        client = ChecksumBlindClient({"ContentLength": len(data), "ETag": f'"{bad}"'})
        with pytest.raises(UploadError, match=f"expected {good}; the object was deleted"):
            verify_upload(client, job, {"ETag": f'"{bad}"'}, **checks)  # type: ignore[arg-type]
        assert client.deleted == [{"Bucket": "b", "Key": "x.mp4"}]
    finally:
        source.close()


def test_sse_kms(s3: Any, bucket: str, tmp_path: Path) -> None:
    key_id = "arn:aws:kms:us-east-1:123456789012:key/11111111-2222-3333-4444-555555555555"
    make_file(tmp_path / "k.mp4", 1000)
    job = UploadJob(
        source=tmp_path / "k.mp4",
        bucket=bucket,
        key="k.mp4",
        options=ObjectOptions(sse="aws:kms", sse_kms_key_id=key_id),
    )
    result = run(s3, job)
    assert result.results["ServerSideEncryption"] == "aws:kms"
    assert result.results["SSEKMSKeyId"] == key_id


# -- multipart ------------------------------------------------------------------------------


def test_multipart_parallel_parts(moto: MotoServer, bucket: str, tmp_path: Path) -> None:
    client = make_s3_client(moto.settings())
    seen = capture_headers(client)
    data = make_file(tmp_path / "movie.ts", BIG)
    ledger = MemoryLedger()
    calls: list[tuple[int, int]] = []
    job = UploadJob(
        source=tmp_path / "movie.ts",
        bucket=bucket,
        key="out/movie.ts",
        options=ObjectOptions(acl="public-read", metadata={"title": "Ünïcödé"}),
    )
    result = run(client, job, ledger, progress=lambda d, t: calls.append((d, t)))

    assert get_bytes(client, bucket, "out/movie.ts") == data
    assert result.sha256 == hashlib.sha256(data).hexdigest()
    assert (result.parts_sent, result.parts_total, result.size) == (4, 4, BIG)
    assert result.http_status == 200
    assert result.results["ETag"].endswith('-4"')
    assert result.results["Location"]
    # The checkpoint of the completed upload is the caller's to drop, with its record of
    # the outcome (tests/test_resume.py): S3 no longer lists the upload.
    assert sorted(ledger.load().parts) == [1, 2, 3, 4]  # type: ignore[union-attr]
    assert open_uploads(client, bucket) == []

    # Progress: one call a part, increasing, ending at the total.
    assert [t for _, t in calls] == [BIG] * 4
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    assert calls[-1] == (BIG, BIG)

    head = client.head_object(Bucket=bucket, Key="out/movie.ts", ChecksumMode="ENABLED")
    assert head["ContentType"] == "video/mp2t"
    assert decode_value(head["Metadata"]["title"]) == "Ünïcödé"
    # S3 answers "<composite>-4"; moto's HeadObject leaves out the "-4".
    digests = b"".join(hashlib.sha256(data[i : i + PART]).digest() for i in range(0, BIG, PART))
    composite = base64.b64encode(hashlib.sha256(digests).digest()).decode()
    assert head["ChecksumSHA256"] in (composite, f"{composite}-4")
    grants = client.get_object_acl(Bucket=bucket, Key="out/movie.ts")["Grants"]
    assert any(g["Grantee"].get("URI") == ALL_USERS for g in grants)

    parts = [h for op, h in seen if op == "UploadPart"]
    assert len(parts) == 4
    assert all("content-md5" not in h and "x-amz-checksum-sha256" in h for h in parts)
    created = [h for op, h in seen if op == "CreateMultipartUpload"]
    assert created[0]["x-amz-checksum-algorithm"] == "SHA256"


def test_checksums_off_sends_no_flexible_checksums(
    moto: MotoServer, bucket: str, tmp_path: Path
) -> None:
    client = make_s3_client(moto.settings(checksums=False))
    seen = capture_headers(client)
    big = make_file(tmp_path / "big.mkv", 11 * MiB)
    small = make_file(tmp_path / "small.webm", 1000)
    common = {"bucket": bucket, "options": ObjectOptions(checksums=False)}
    r1 = run(client, UploadJob(source=tmp_path / "big.mkv", key="big.mkv", **common))
    r2 = run(client, UploadJob(source=tmp_path / "small.webm", key="small.webm", **common))

    assert get_bytes(client, bucket, "big.mkv") == big
    assert get_bytes(client, bucket, "small.webm") == small
    assert (r1.parts_total, r2.parts_total) == (3, 1)
    assert r1.sha256 == hashlib.sha256(big).hexdigest()
    flexible = [
        (op, name)
        for op, headers in seen
        for name in headers
        if name.startswith(("x-amz-checksum", "x-amz-sdk-checksum"))
    ]
    assert flexible == []
    bodies = [h for op, h in seen if op in ("UploadPart", "PutObject")]
    assert len(bodies) == 4 and all("content-md5" in h for h in bodies)
    assert client.head_object(Bucket=bucket, Key="small.webm")["ContentType"] == "video/webm"


def test_memory_stays_bounded(s3: Any, bucket: str, tmp_path: Path) -> None:
    # 8 parts, 2 threads: at most 3 parts (concurrency + 1) may be alive, never the file.
    data = make_file(tmp_path / "huge.mp4", 8 * PART)
    tracemalloc.start()
    try:
        run(s3, UploadJob(source=tmp_path / "huge.mp4", bucket=bucket, key="h"), concurrency=2)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 5 * PART, f"peak {peak / MiB:.1f} MiB"
    assert get_bytes(s3, bucket, "h") == data


def test_resume_after_interrupt(s3: Any, bucket: str, tmp_path: Path) -> None:
    data = make_file(tmp_path / "long.mov", BIG)
    job = UploadJob(source=tmp_path / "long.mov", bucket=bucket, key="long.mov")
    ledger = MemoryLedger()

    with pytest.raises(UploadInterrupted) as info:
        run(s3, job, ledger, concurrency=1, should_stop=stop_after(2))
    assert info.value.transient
    checkpoint = ledger.load()
    assert checkpoint is not None and sorted(checkpoint.parts) == [1, 2]
    assert [u["UploadId"] for u in open_uploads(s3, bucket)] == [checkpoint.upload_id]

    calls: list[int] = []
    result = run(s3, job, ledger, progress=lambda d, t: calls.append(d))
    assert (result.parts_sent, result.parts_total) == (2, 4)
    assert get_bytes(s3, bucket, "long.mov") == data
    assert result.sha256 == hashlib.sha256(data).hexdigest()
    assert calls[:2] == [PART, 2 * PART] and calls[-1] == BIG
    assert ledger.load().upload_id == checkpoint.upload_id  # type: ignore[union-attr]
    assert open_uploads(s3, bucket) == []


def test_resume_resends_parts_s3_does_not_hold(s3: Any, bucket: str, tmp_path: Path) -> None:
    data = make_file(tmp_path / "v.mp4", BIG)
    job = UploadJob(source=tmp_path / "v.mp4", bucket=bucket, key="v.mp4")
    ledger = MemoryLedger()
    with pytest.raises(UploadInterrupted):
        run(s3, job, ledger, concurrency=1, should_stop=stop_after(2))
    # The ledger claims part 2 with an ETag S3 does not have (its checksum still matches the
    # file, so only ListParts can tell).
    record = ledger.load().parts[2]  # type: ignore[union-attr]
    ledger.part_done(2, replace(record, etag='"' + "0" * 32 + '"'))

    result = run(s3, job, ledger)
    assert (result.parts_sent, result.parts_total) == (3, 4)
    assert get_bytes(s3, bucket, "v.mp4") == data


def test_changed_file_invalidates_checkpoint(s3: Any, bucket: str, tmp_path: Path) -> None:
    path = tmp_path / "c.mp4"
    make_file(path, BIG)
    job = UploadJob(source=path, bucket=bucket, key="c.mp4")
    ledger = MemoryLedger()
    with pytest.raises(UploadInterrupted):
        run(s3, job, ledger, concurrency=1, should_stop=stop_after(2))
    old = ledger.load()
    assert old is not None

    new = make_file(path, BIG)  # same size, new content
    os.utime(path, ns=(old.mtime_ns + 10**9, old.mtime_ns + 10**9))
    result = run(s3, job, ledger)
    assert (result.parts_sent, result.parts_total) == (4, 4)
    assert get_bytes(s3, bucket, "c.mp4") == new
    assert open_uploads(s3, bucket) == []  # the old upload was aborted


def test_vanished_upload_starts_over(s3: Any, bucket: str, tmp_path: Path) -> None:
    data = make_file(tmp_path / "g.mp4", BIG)
    job = UploadJob(source=tmp_path / "g.mp4", bucket=bucket, key="g.mp4")
    ledger = MemoryLedger()
    with pytest.raises(UploadInterrupted):
        run(s3, job, ledger, concurrency=1, should_stop=stop_after(1))
    checkpoint = ledger.load()
    assert checkpoint is not None
    s3.abort_multipart_upload(Bucket=bucket, Key="g.mp4", UploadId=checkpoint.upload_id)

    result = run(s3, job, ledger)
    assert (result.parts_sent, result.parts_total) == (4, 4)
    assert get_bytes(s3, bucket, "g.mp4") == data


def _completed_unrecorded(
    moto: MotoServer, tmp_path: Path, *, checksums: bool, name: str
) -> tuple[Any, str, UploadJob, MemoryLedger, bytes]:
    client = make_s3_client(moto.settings(checksums=checksums))
    bucket = f"vodpush-{uuid.uuid4().hex[:16]}"
    client.create_bucket(Bucket=bucket)
    client.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    data = make_file(tmp_path / name, BIG)
    job = UploadJob(
        source=tmp_path / name,
        bucket=bucket,
        key=name,
        options=ObjectOptions(checksums=checksums, metadata={"title": "Ünïcödé"}),
    )
    # The engine leaves the checkpoint for the caller to drop with the record of success:
    # a worker cut off right after CompleteMultipartUpload never drops it.
    ledger = MemoryLedger()
    run(client, job, ledger)
    assert sorted(ledger.load().parts) == [1, 2, 3, 4]  # type: ignore[union-attr]
    return client, bucket, job, ledger, data


def versions(client: Any, bucket: str) -> list[dict[str, Any]]:
    return client.list_object_versions(Bucket=bucket).get("Versions", [])


@pytest.mark.parametrize("checksums", [True, False], ids=["checksums", "md5"])
def test_resume_finds_an_upload_completed_but_not_recorded(
    moto: MotoServer, tmp_path: Path, checksums: bool
) -> None:
    """S3 no longer knows the upload (it was completed) and the key holds the object its
    parts make: the resumed attempt records that object and stores nothing again."""
    client, bucket, job, ledger, data = _completed_unrecorded(
        moto, tmp_path, checksums=checksums, name="done.mp4"
    )
    (stored,) = versions(client, bucket)

    result = run(client, job, ledger)
    assert (result.parts_sent, result.parts_total) == (0, 4)
    assert result.results["VersionId"] == stored["VersionId"]
    assert result.results["ETag"] == stored["ETag"]
    assert result.sha256 == hashlib.sha256(data).hexdigest()
    assert [v["VersionId"] for v in versions(client, bucket)] == [stored["VersionId"]]
    assert open_uploads(client, bucket) == []


def test_resume_starts_over_when_the_key_holds_another_object(
    moto: MotoServer, tmp_path: Path
) -> None:
    """The upload is gone and the key holds something else (a later writer, or the same
    bytes with other metadata): nothing proves the upload was completed, so it starts over."""
    client, bucket, job, ledger, data = _completed_unrecorded(
        moto, tmp_path, checksums=True, name="other.mp4"
    )
    client.copy_object(
        Bucket=bucket,
        Key="other.mp4",
        CopySource={"Bucket": bucket, "Key": "other.mp4"},
        Metadata={"title": "changed"},
        MetadataDirective="REPLACE",
    )
    result = run(client, job, ledger)
    assert (result.parts_sent, result.parts_total) == (4, 4)
    assert len(versions(client, bucket)) == 3
    assert get_bytes(client, bucket, "other.mp4") == data


def test_stop_before_start_creates_nothing(s3: Any, bucket: str, tmp_path: Path) -> None:
    make_file(tmp_path / "s.mp4", BIG)
    ledger = MemoryLedger()
    with pytest.raises(UploadInterrupted):
        run(
            s3,
            UploadJob(source=tmp_path / "s.mp4", bucket=bucket, key="s.mp4"),
            ledger,
            should_stop=lambda: True,
        )
    assert ledger.load() is None
    assert open_uploads(s3, bucket) == []


# -- failures -------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1000, 6 * MiB], ids=["put", "multipart"])
def test_no_such_bucket_is_permanent(s3: Any, tmp_path: Path, size: int) -> None:
    make_file(tmp_path / "f.mp4", size)
    job = UploadJob(source=tmp_path / "f.mp4", bucket=f"missing-{uuid.uuid4().hex}", key="f.mp4")
    with pytest.raises(UploadError) as info:
        run(s3, job)
    err = info.value
    assert not err.transient
    assert (err.http_status, err.code) == (404, "NoSuchBucket")
    assert str(err) == "S3 error NoSuchBucket (404): The specified bucket does not exist"


def test_missing_source_is_permanent_and_aborts_checkpoint(
    s3: Any, bucket: str, tmp_path: Path
) -> None:
    path = tmp_path / "gone.mp4"
    make_file(path, BIG)
    job = UploadJob(source=path, bucket=bucket, key="gone.mp4")
    ledger = MemoryLedger()
    with pytest.raises(UploadInterrupted):
        run(s3, job, ledger, concurrency=1, should_stop=stop_after(1))
    assert len(open_uploads(s3, bucket)) == 1

    path.unlink()
    with pytest.raises(UploadError) as info:
        run(s3, job, ledger)
    assert not info.value.transient
    assert str(info.value) == f"source file missing: {path}"
    assert ledger.load() is None
    assert open_uploads(s3, bucket) == []


def test_directory_source_is_permanent(s3: Any, bucket: str, tmp_path: Path) -> None:
    with pytest.raises(UploadError) as info:
        run(s3, UploadJob(source=tmp_path, bucket=bucket, key="dir"))
    assert not info.value.transient
    assert str(info.value) == f"source is not a regular file: {tmp_path}"


def test_permanent_s3_failure_aborts_multipart(tmp_path: Path) -> None:
    # A server whose minimum part size is above ours refuses CompleteMultipartUpload with
    # EntityTooSmall (400): a real permanent failure after the upload exists.
    with MotoServer(env={"S3_UPLOAD_PART_MIN_SIZE": str(64 * MiB)}, log_dir=tmp_path) as server:
        client = make_s3_client(server.settings())
        client.create_bucket(Bucket="strict")
        make_file(tmp_path / "p.mp4", 11 * MiB)
        ledger = MemoryLedger()
        with pytest.raises(UploadError) as info:
            run(client, UploadJob(source=tmp_path / "p.mp4", bucket="strict", key="p"), ledger)
        assert not info.value.transient
        assert (info.value.code, info.value.http_status) == ("EntityTooSmall", 400)
        assert str(info.value).startswith("S3 error EntityTooSmall (400)")
        assert ledger.load() is None
        assert open_uploads(client, "strict") == []


def test_transient_failure_keeps_upload_for_resume(tmp_path: Path) -> None:
    with MotoServer(log_dir=tmp_path) as server:
        client = make_s3_client(server.settings(), max_attempts=1)
        client.create_bucket(Bucket="flaky")
        make_file(tmp_path / "t.mp4", BIG)
        ledger = MemoryLedger()
        stopped: list[int] = []

        def kill_server(done: int, total: int) -> None:
            if not stopped:
                stopped.append(done)
                server.stop()  # the next part cannot connect

        with pytest.raises(UploadError) as info:
            run(
                client,
                UploadJob(source=tmp_path / "t.mp4", bucket="flaky", key="t"),
                ledger,
                concurrency=1,
                progress=kill_server,
            )
    err = info.value
    assert err.transient and err.http_status is None
    assert str(err) == "S3 connection error: could not connect to the S3 endpoint"
    # The endpoint is the operator's business: named in the log detail, not to the customer.
    assert server.url not in str(err) and server.url in (err.detail or "")
    assert "Traceback" not in str(err)
    checkpoint = ledger.load()
    assert checkpoint is not None and sorted(checkpoint.parts) == [1]


def test_source_shrinking_while_read_fails_and_aborts(s3: Any, bucket: str, tmp_path: Path) -> None:
    path = tmp_path / "live.mp4"
    make_file(path, BIG)
    ledger = MemoryLedger()

    def truncate(done: int, total: int) -> None:
        os.truncate(path, 6 * MiB)

    with pytest.raises(UploadError) as info:
        run(
            s3,
            UploadJob(source=path, bucket=bucket, key="live.mp4"),
            ledger,
            concurrency=1,
            progress=truncate,
        )
    assert info.value.code == "SourceChanged"
    assert str(info.value).startswith("source file changed while uploading")
    assert open_uploads(s3, bucket) == []
    assert ledger.load() is None
    with pytest.raises(ClientError):
        s3.head_object(Bucket=bucket, Key="live.mp4")


def test_source_growing_while_read_fails(s3: Any, bucket: str, tmp_path: Path) -> None:
    path = tmp_path / "grow.mp4"
    make_file(path, BIG)

    def append(done: int, total: int) -> None:
        with open(path, "ab") as fh:
            fh.write(b"more")

    with pytest.raises(UploadError) as info:
        run(
            s3,
            UploadJob(source=path, bucket=bucket, key="grow.mp4"),
            concurrency=1,
            progress=append,
        )
    assert info.value.code == "SourceChanged" and info.value.transient
    assert open_uploads(s3, bucket) == []


def test_connection_refused_is_transient(tmp_path: Path) -> None:
    server = MotoServer()  # never started: its port refuses connections
    client = make_s3_client(server.settings(), max_attempts=1)
    make_file(tmp_path / "n.mp4", 100)
    with pytest.raises(UploadError) as info:
        run(client, UploadJob(source=tmp_path / "n.mp4", bucket="b", key="n"))
    assert info.value.transient and info.value.http_status is None
    assert info.value.code == "EndpointConnectionError"


def test_abandon_aborts_and_clears(s3: Any, bucket: str, tmp_path: Path) -> None:
    make_file(tmp_path / "ab.mp4", BIG)
    job = UploadJob(source=tmp_path / "ab.mp4", bucket=bucket, key="ab.mp4")
    ledger = MemoryLedger()
    with pytest.raises(UploadInterrupted):
        run(s3, job, ledger, concurrency=1, should_stop=stop_after(1))
    assert open_uploads(s3, bucket)
    assert abandon(s3, job, ledger) is True
    assert open_uploads(s3, bucket) == []
    assert ledger.load() is None


# -- validation -----------------------------------------------------------------------------


def test_job_and_tuning_are_validated(s3: Any, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="acl must be one of private, public-read"):
        ObjectOptions(acl="public")
    with pytest.raises(ValueError, match="sse_kms_key_id needs"):
        ObjectOptions(sse="AES256", sse_kms_key_id="x")
    job = UploadJob(source=tmp_path / "x", bucket="b", key="k")
    with pytest.raises(ValueError, match="chunksize"):
        upload(s3, job, MemoryLedger(), threshold=PART, chunksize=MiB, concurrency=1)
    with pytest.raises(ValueError, match="concurrency"):
        upload(s3, job, MemoryLedger(), threshold=PART, chunksize=PART, concurrency=0)


# -- classification (pure) ------------------------------------------------------------------


def client_error(code: str, status: int, message: str = "msg") -> ClientError:
    return ClientError(
        {
            "Error": {"Code": code, "Message": message},
            "ResponseMetadata": {"HTTPStatusCode": status},
        },
        "PutObject",
    )


@pytest.mark.parametrize(
    ("code", "status"),
    [
        ("SlowDown", 503),
        ("Throttling", 400),
        ("ThrottlingException", 400),
        ("RequestTimeout", 400),
        ("InternalError", 500),
        ("ServiceUnavailable", 503),
        ("BadDigest", 400),
        ("TooManyRequests", 429),
        ("500", 500),
    ],
)
def test_transient_s3_errors(code: str, status: int) -> None:
    err = classify(client_error(code, status))
    assert err.transient and err.http_status == status


@pytest.mark.parametrize(
    ("code", "status"),
    [
        ("NoSuchBucket", 404),
        ("AccessDenied", 403),
        ("InvalidAccessKeyId", 403),
        ("SignatureDoesNotMatch", 403),
        ("InvalidArgument", 400),
        ("EntityTooSmall", 400),
        ("404", 404),
    ],
)
def test_permanent_s3_errors(code: str, status: int) -> None:
    err = classify(client_error(code, status))
    assert not err.transient and err.http_status == status


def test_error_messages_are_readable() -> None:
    err = classify(client_error("AccessDenied", 403, "Access Denied"))
    assert str(err) == "S3 error AccessDenied (403): Access Denied"
    assert err.code == "AccessDenied"
    head_404 = classify(client_error("404", 404, "Not Found"))
    assert str(head_404) == "S3 error NotFound (404): Not Found"


@pytest.mark.parametrize(
    "exc",
    [
        EndpointConnectionError(endpoint_url="http://x"),
        ConnectionClosedError(endpoint_url="http://x"),
        ReadTimeoutError(endpoint_url="http://x"),
        ConnectTimeoutError(endpoint_url="http://x"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_network_errors_are_transient(exc: Exception) -> None:
    err = classify(exc)
    assert err.transient and err.http_status is None
    assert str(err).startswith("S3 connection error: ")


def test_local_and_unknown_errors_are_permanent() -> None:
    missing = classify(FileNotFoundError(2, "No such file or directory", "/s/a.mp4"))
    assert (missing.transient, str(missing)) == (False, "source file missing: /s/a.mp4")
    denied = classify(PermissionError(13, "Permission denied", "/s/a.mp4"))
    assert not denied.transient and "permission denied" in str(denied)
    assert not classify(NoCredentialsError()).transient
    odd = classify(ValueError("boom"))
    assert not odd.transient and str(odd) == "unexpected error: ValueError: boom"


# -- verification (pure) --------------------------------------------------------------------


def test_verify_stored() -> None:
    sha = base64.b64encode(hashlib.sha256(b"abc").digest()).decode()
    md5 = hashlib.md5(b"abc").hexdigest()
    ok = {"ContentLength": 3, "ChecksumSHA256": sha, "ETag": f'"{md5}"'}
    assert verify_stored(ok, size=3, sha256=sha, etag=md5) is None
    assert "4 bytes" in verify_stored(ok | {"ContentLength": 4}, size=3, sha256=sha, etag=md5)
    assert "SHA-256" in verify_stored(ok | {"ChecksumSHA256": "AAAA"}, size=3, sha256=sha)
    composite = {"ContentLength": 3, "ChecksumSHA256": "xyz=-2"}
    assert verify_stored(composite, size=3, sha256=sha, sha256_composite="xyz=-2") is None
    assert verify_stored(composite, size=3, sha256=sha, sha256_composite="abc=-2")
    assert verify_stored(composite, size=3, sha256=sha, sha256_composite="xyz=-3")
    bare = {"ChecksumSHA256": "xyz="}  # a composite without "-N"
    assert verify_stored(bare, size=3, sha256=sha, sha256_composite="xyz=-2") is None
    full = {"ChecksumSHA256": "xyz=", "ChecksumType": "FULL_OBJECT"}
    assert verify_stored(full, size=3, sha256=sha, sha256_composite="xyz=-2")
    # Without checksums the MD5 ETag decides, except under SSE-KMS.
    bad_etag = {"ContentLength": 3, "ETag": '"' + "0" * 32 + '"'}
    assert "ETag" in verify_stored(bad_etag, size=3, sha256=None, etag=md5)
    kms = bad_etag | {"ServerSideEncryption": "aws:kms"}
    assert verify_stored(kms, size=3, sha256=None, etag=md5) is None
    # A non-MD5 ETag (some S3-compatible stores) cannot be compared.
    assert verify_stored({"ETag": '"opaque"'}, size=3, sha256=None, etag=md5) is None
    # A function giving the ETag (it reads the file again) is called only to compare.
    calls: list[int] = []

    def expected_etag() -> str:
        calls.append(1)
        return md5

    assert verify_stored(ok, size=3, sha256=sha, etag=expected_etag) is None
    assert verify_stored(kms, size=3, sha256=None, etag=expected_etag) is None
    assert calls == []
    assert "ETag" in verify_stored(bad_etag, size=3, sha256=None, etag=expected_etag)
    assert (
        verify_stored(bad_etag | {"ETag": f'"{md5}"'}, size=3, sha256=None, etag=expected_etag)
        is None
    )
    assert calls == [1, 1]


# -- small pure helpers ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        (("a/b.mp4",), "video/mp4"),
        (("x.M3U8",), "application/vnd.apple.mpegurl"),
        (("seg-001.ts",), "video/mp2t"),
        (("a.mkv",), "video/x-matroska"),
        (("a.webm",), "video/webm"),
        (("a.mov",), "video/quicktime"),
        (("a.png",), "image/png"),
        (("a.tar.gz",), "application/gzip"),
        (("noext", "source.mp4"), "video/mp4"),
        (("noext",), "application/octet-stream"),
    ],
)
def test_guess_content_type(names: tuple[str, ...], expected: str) -> None:
    assert guess_content_type(*names) == expected


def test_object_url_styles(moto: MotoServer, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    aws = make_s3_client(
        S3Settings(region="eu-west-1", access_key_id="testing", secret_access_key="testing")
    )
    assert object_url(aws, "media", "a b/é.mp4") == (
        "https://media.s3.eu-west-1.amazonaws.com/a%20b/%C3%A9.mp4"
    )
    assert object_url(aws, "my.bucket", "k") == "https://s3.eu-west-1.amazonaws.com/my.bucket/k"
    local = make_s3_client(moto.settings())
    assert object_url(local, "media", "a b") == f"{moto.url}/media/a%20b"


def test_make_s3_client_config(moto: MotoServer) -> None:
    strict = make_s3_client(moto.settings(checksums=False))
    config = strict.meta.config
    assert config.request_checksum_calculation == "when_required"
    assert config.response_checksum_validation == "when_required"
    assert config.s3["addressing_style"] == "path"
    assert config.s3["payload_signing_enabled"] is False
    assert (config.connect_timeout, config.read_timeout) == (10, 60)
    default = make_s3_client(moto.settings()).meta.config
    assert default.request_checksum_calculation == "when_supported"


# -- the in-memory ledger -------------------------------------------------------------------


def test_memory_ledger_is_thread_safe_and_hands_out_copies() -> None:
    ledger = MemoryLedger()
    assert ledger.load() is None
    ledger.begin(MultipartCheckpoint("u1", PART, BIG, 1, True))

    def record(start: int) -> None:
        for n in range(start, start + 100):
            ledger.part_done(n, PartRecord(f'"{n}"', None, n))

    threads = [threading.Thread(target=record, args=(i * 100 + 1,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    loaded = ledger.load()
    assert loaded is not None and sorted(loaded.parts) == list(range(1, 801))
    loaded.parts.clear()
    assert len(ledger.load().parts) == 800  # type: ignore[union-attr]
    ledger.clear()
    assert ledger.load() is None
    with pytest.raises(RuntimeError):
        ledger.part_done(1, PartRecord('"x"', None, 1))


def test_checkpoint_json_round_trip() -> None:
    checkpoint = MultipartCheckpoint(
        upload_id="u",
        chunksize=PART,
        size=BIG,
        mtime_ns=123,
        checksums=True,
        parts={2: PartRecord('"b"', "c2=", PART), 1: PartRecord('"a"', None, PART)},
    )
    text = json.dumps(checkpoint.to_dict())
    assert MultipartCheckpoint.from_dict(json.loads(text)) == checkpoint
