"""Fault tests with real processes: a worker killed mid-upload, a worker stopped with
SIGTERM, a request that kills every worker that takes it, the S3 server going away and
coming back (mid-upload, and for longer than the old retry schedule lasted), and four
workers on PostgreSQL sharing one queue."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from botocore.exceptions import ClientError
from sqlalchemy import select, text

from tests.conftest import MiB, s3_client
from tests.faults import (  # others import them from here too
    log_events,
    parts_stored,
    queue_file,
    request_row,
    start_worker,
    wait_for,
    worker_env,
)
from tests.s3server import TcpProxy
from tests.test_worker import Receiver
from vodpush.config import Settings
from vodpush.core.retry import shortest_retry_span
from vodpush.persistence.models import UploadRequest
from vodpush.service import Service
from vodpush.worker.runner import Worker

pytestmark = pytest.mark.slow


def states(service: Service, ids, where: str) -> dict[str, int]:
    """How many of the requests ``ids`` that match ``where`` are in each state."""
    marks = ", ".join(str(int(i)) for i in ids)
    with service.engine.connect() as conn:
        rows = conn.execute(
            text(
                f"SELECT state, count(*) FROM upload_requests WHERE id IN ({marks}) "
                f"AND {where} GROUP BY state"
            )
        ).all()
    return {state: count for state, count in rows}


def test_sigkill_mid_upload_resumes_from_completed_parts(
    service, s3_account, s3, bucket, sestore_root, tmp_path
):
    request_id, data = queue_file(service, s3_account, sestore_root, "big.mp4", 100 * MiB, bucket)
    env = worker_env(service)
    first = start_worker(env, tmp_path / "w1.log")
    try:
        wait_for(lambda: parts_stored(service, request_id) >= 3, 60, "three stored parts")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    row = request_row(service, request_id)
    assert row.state == "running" and row.multipart_json  # left behind, lease still held

    second = start_worker(env, tmp_path / "w2.log", "--burst")
    assert second.wait(120) == 0
    row = request_row(service, request_id)
    assert row.state == "succeeded", row.message
    assert row.attempts == 2
    (done,) = log_events(tmp_path / "w2.log", "upload.succeeded")
    assert done["parts_total"] == 20
    assert done["parts_sent"] < done["parts_total"]
    body = s3_client(s3).get_object(Bucket=bucket, Key="big.mp4")["Body"].read()
    assert hashlib.sha256(body).hexdigest() == hashlib.sha256(data).hexdigest()
    uploads = s3_client(s3).list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    assert uploads == []  # nothing orphaned


def test_sigterm_releases_running_upload_for_resume(
    service, s3_account, s3, bucket, sestore_root, tmp_path
):
    request_id, data = queue_file(service, s3_account, sestore_root, "term.mp4", 60 * MiB, bucket)
    env = worker_env(service, VODPUSH_SHUTDOWN_GRACE="0")
    worker = start_worker(env, tmp_path / "w1.log")
    wait_for(lambda: parts_stored(service, request_id) >= 2, 60, "two stored parts")
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(30) == 0
    row = request_row(service, request_id)
    assert row.state == "queued"
    assert row.attempts == 0  # a release is not an attempt
    assert row.lease_owner is None
    assert log_events(tmp_path / "w1.log", "upload.released")

    again = start_worker(env, tmp_path / "w2.log", "--burst")
    assert again.wait(120) == 0
    (done,) = log_events(tmp_path / "w2.log", "upload.succeeded")
    assert done["parts_sent"] < done["parts_total"]
    body = s3_client(s3).get_object(Bucket=bucket, Key="term.mp4")["Body"].read()
    assert body == data


def test_a_request_that_kills_every_worker_fails_and_leaves_nothing_behind(
    service, s3_account, s3, bucket, sestore_root, tmp_path
):
    """Every worker that takes the request is SIGKILLed while uploading it (as a file that
    crashes its worker would): each time its lease runs out and the next claim counts the
    expiry. After max_lease_expiries (default 3) deaths the next worker does not upload it
    again: it fails the request (WorkerDied), aborts its multipart upload, and the callback
    is delivered once. Two workers run at a time, so that a successor is always ready."""
    receiver = Receiver().start()
    env = worker_env(service, VODPUSH_CALLBACK_ALLOW_PRIVATE="true")
    workers: dict[int, subprocess.Popen] = {}
    logs: list[Path] = []

    def add_worker() -> None:
        logs.append(tmp_path / f"w{len(logs)}.log")
        proc = start_worker(env, logs[-1])
        workers[proc.pid] = proc

    def holder() -> int | None:
        """The pid of the worker holding the lease (owner is host:pid:nonce)."""
        row = request_row(service, request_id)
        return int(row.lease_owner.split(":")[1]) if row.lease_owner else None

    try:
        request_id, _ = queue_file(
            service, s3_account, sestore_root, "poison.mp4", 40 * MiB, bucket, receiver.url
        )
        deaths = Settings.model_fields["max_lease_expiries"].default
        add_worker()
        add_worker()
        for n in range(deaths):
            parts = parts_stored(service, request_id)
            # It dies once it has sent a part more (the multipart upload exists).
            wait_for(
                lambda: parts_stored(service, request_id) > parts and holder() in workers,
                90,
                f"worker {n + 1} uploading",
            )
            victim = workers.pop(holder())
            victim.send_signal(signal.SIGKILL)
            victim.wait(10)
            row = request_row(service, request_id)
            assert (row.state, row.attempts, row.lease_expiries) == ("running", n + 1, n)
            if n < deaths - 1:
                add_worker()
        assert s3_client(s3).list_multipart_uploads(Bucket=bucket).get("Uploads")

        # The survivor takes it over and ends it, without uploading it again.
        wait_for(
            lambda: request_row(service, request_id).callback_state == "delivered",
            60,
            "the failure and its callback",
        )
        for proc in workers.values():
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
        row = request_row(service, request_id)
        assert (row.state, row.error_code) == ("failed", "WorkerDied")
        assert row.message == f"Upload failed: worker died while uploading ({deaths} times)"
        assert (row.attempts, row.lease_expiries) == (deaths + 1, deaths)
        started = [e for log in logs for e in log_events(log, "upload.started")]
        assert len(started) == deaths  # each victim once; nobody after the last death
        (failed,) = [e for log in logs for e in log_events(log, "upload.failed")]
        assert failed["code"] == "WorkerDied"
        client = s3_client(s3)
        assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
        with pytest.raises(ClientError):
            client.head_object(Bucket=bucket, Key="poison.mp4")
        assert client.list_objects_v2(Bucket=bucket)["KeyCount"] == 0
        assert parts_stored(service, request_id) == 0
        (delivery,) = receiver.received  # once
        record = json.loads(delivery[1])
        assert (record["id"], record["state"], record["message"]) == (
            request_id, "failed", row.message
        )  # fmt: skip
    finally:
        for proc in workers.values():
            proc.kill()
            proc.wait(10)
        receiver.stop()


def test_an_s3_outage_longer_than_the_old_retry_schedule_fails_no_upload(
    service, account, sestore_root, tmp_path, s3
):
    """32 uploads queued while S3 is unreachable (a TCP proxy in front of moto, not
    listening) for 10 s. The default retry settings scaled down 300 times (waits from
    17 ms to 3 s, 16 attempts, at least 12.6 s of retrying: the same code, a shorter
    clock) outlast it, as the real ones outlast a 50-minute outage: every upload succeeds
    once S3 is back, each stored exactly once (bucket versioning counts PUTs), none
    failed. The old defaults (5 attempts, 2 s doubling to 300 s: at most 30 s, here 0.1 s)
    failed nearly all of them."""
    scale = 1 / 300
    defaults = {name: Settings.model_fields[name].default for name in Settings.model_fields}
    s = service.settings
    s.max_attempts = defaults["max_attempts"]
    s.retry_base_delay = defaults["retry_base_delay"] * scale
    s.retry_max_delay = defaults["retry_max_delay"] * scale
    outage = 10.0
    assert shortest_retry_span(s.max_attempts, s.retry_base_delay, s.retry_max_delay) > outage
    endpoint = TcpProxy(s3.port)  # not started: S3 is down
    name = f"outage-{int(time.time() * 1000)}"
    client = s3_client(s3)
    client.create_bucket(Bucket=name)
    client.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
    service.accounts.set_s3(account.api_key, s3.settings(endpoint_url=endpoint.url))
    files = dict(
        queue_file(service, account, sestore_root, f"v{i:02}.mp4", 64 * 1024, name)
        for i in range(32)
    )
    worker = Worker(service, concurrency=16)
    thread = threading.Thread(target=worker.run, kwargs={"burst": True})
    started = time.monotonic()
    thread.start()
    try:
        # Every request meets the outage (has failed at least once) before S3 comes back.
        wait_for(lambda: states(service, files, "attempts < 2") == {}, 60, "a retry of each")
        time.sleep(max(0.0, started + outage - time.monotonic()))
        assert states(service, files, "state = 'failed'") == {}
        endpoint.start()
        thread.join(120)
        assert not thread.is_alive()
    finally:
        worker.stop(grace=0)
        endpoint.stop()

    rows = {rid: request_row(service, rid) for rid in files}
    assert {row.state for row in rows.values()} == {"succeeded"}, [
        row.message for row in rows.values() if row.state != "succeeded"
    ]
    assert min(row.attempts for row in rows.values()) >= 2
    versions: dict[str, int] = {}
    for page in client.get_paginator("list_object_versions").paginate(Bucket=name):
        for version in page.get("Versions", []):
            versions[version["Key"]] = versions.get(version["Key"], 0) + 1
    assert versions == {f"v{i:02}.mp4": 1 for i in range(32)}
    for rid, data in files.items():
        key = rows[rid].destination_path
        assert client.get_object(Bucket=name, Key=key)["Body"].read() == data


def test_s3_outage_mid_run_recovers_after_retries(service, account, sestore_root, tmp_path, s3):
    """The S3 endpoint goes away mid-upload (every connection cut, new ones refused) and
    comes back at the same address: requests complete after retries, the multipart upload
    resumes. The outage is a proxy in front of the moto process, because a restarted moto
    forgets every bucket, which no real S3 does."""
    endpoint = TcpProxy(s3.port).start()
    worker = Worker(service)
    try:
        service.accounts.set_s3(account.api_key, s3.settings(endpoint_url=endpoint.url))
        service.settings.max_attempts = 8
        service.settings.part_concurrency = 1
        name = f"outage-{int(time.time() * 1000)}"
        s3_client(s3).create_bucket(Bucket=name)
        big_id, big = queue_file(service, account, sestore_root, "big.mp4", 40 * MiB, name)
        small = [
            queue_file(service, account, sestore_root, f"s{i}.mp4", 100_000, name) for i in range(3)
        ]
        thread = threading.Thread(target=worker.run, kwargs={"burst": True})
        thread.start()
        wait_for(lambda: parts_stored(service, big_id) >= 2, 60, "two stored parts")
        endpoint.stop()
        wait_for(lambda: request_row(service, big_id).attempts >= 2, 30, "a retry")
        time.sleep(1)
        endpoint.start()
        thread.join(120)
        assert not thread.is_alive()

        row = request_row(service, big_id)
        assert row.state == "succeeded", row.message
        assert row.attempts >= 2
        client = s3_client(s3)
        assert client.get_object(Bucket=name, Key="big.mp4")["Body"].read() == big
        for request_id, data in small:
            assert request_row(service, request_id).state == "succeeded"
            key = f"s{small.index((request_id, data))}.mp4"
            assert client.get_object(Bucket=name, Key=key)["Body"].read() == data
    finally:
        worker.stop(grace=0)
        endpoint.stop()


@pytest.mark.postgres
def test_four_worker_processes_upload_each_request_exactly_once(pg_url, sestore_root, tmp_path, s3):
    from vodpush.config import Settings
    from vodpush.crypto import generate_key

    service = Service.open(
        Settings(database_url=pg_url, sestore_root=sestore_root, secret_key=generate_key())
    )
    try:
        created = service.accounts.create(cdn=1, username="multi", s3=s3.settings())
        name = f"exactly-once-{int(time.time() * 1000)}"
        client = s3_client(s3)
        client.create_bucket(Bucket=name)
        # With versioning on, every PUT of a key adds a version: the server counts uploads.
        client.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})

        class Creds:
            id = created["id"]
            cdn = 1
            username = "multi"

        ids = [
            queue_file(service, Creds, sestore_root, f"f{i:03}.mp4", 1024, name)[0]
            for i in range(500)
        ]
        env = worker_env(service)
        workers = [
            start_worker(env, tmp_path / f"w{i}.log", "--burst", "--concurrency", "4")
            for i in range(4)
        ]
        for proc in workers:
            assert proc.wait(240) == 0
        versions: dict[str, int] = {}
        paginator = client.get_paginator("list_object_versions")
        for page in paginator.paginate(Bucket=name):
            for version in page.get("Versions", []):
                versions[version["Key"]] = versions.get(version["Key"], 0) + 1
        assert len(versions) == 500
        assert set(versions.values()) == {1}
        with service.engine.connect() as conn:
            rows = conn.execute(
                select(UploadRequest.state, UploadRequest.attempts).where(UploadRequest.id.in_(ids))
            ).all()
        assert {(r.state, r.attempts) for r in rows} == {("succeeded", 1)}
        claims = [len(log_events(tmp_path / f"w{i}.log", "upload.claimed")) for i in range(4)]
        assert sum(claims) == 500
        assert all(count > 0 for count in claims), claims  # the work was shared
    finally:
        service.close()
