"""SIGTERM keeps its word: `vodpush worker` and `vodpush serve` exit within the grace period
plus a few seconds whatever S3 or a callback receiver does (refuses, swallows, trickles),
running uploads are handed back uncounted and finish elsewhere exactly once, an interrupted
callback is sent again later, and a process that gave a request back can never complete it.

Real processes, real signals, a real S3 server (moto) behind a switchable endpoint
(tests/s3faults.py). Every figure is printed (`pytest -s` shows them)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import MiB, free_port, s3_client
from tests.faults import (
    log_events,
    parts_stored,
    queue_file,
    request_row,
    start_worker,
    wait_for,
    worker_env,
)
from tests.s3faults import FaultyEndpoint, HangingReceiver
from vodpush.service import Service
from vodpush.worker.runner import Worker

GRACE = 2.0
BOUND = GRACE + 5  # what issue 9 asks: the process is gone within grace + 5 s
# Only to measure how long an unbounded shutdown really takes (the figure before a fix): the
# test waits this long before killing the process. The bound is asserted either way.
WAIT = max(BOUND, float(os.environ.get("VODPUSH_TEST_SHUTDOWN_WAIT", "0")))


@pytest.fixture
def endpoint(service: Service, account: Any, s3: Any) -> Any:
    """The account's S3 endpoint: moto behind a FaultyEndpoint the test switches."""
    faulty = FaultyEndpoint(s3.port).start()
    service.accounts.set_s3(account.api_key, s3.settings(endpoint_url=faulty.url))
    yield faulty
    faulty.stop()


def sigterm_and_time(proc: subprocess.Popen, log: Path, what: str) -> float:
    """SIGTERM ``proc``; seconds until it exited. Fails beyond BOUND or on a non-zero exit."""
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(WAIT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
        pytest.fail(f"{what}: still running {WAIT:.0f} s after SIGTERM (grace {GRACE:g} s)")
    took = time.monotonic() - sent
    print(f"\n{what}: exited {took:.2f} s after SIGTERM (grace {GRACE:g} s, bound {BOUND:g} s)")
    assert took <= BOUND, f"{what}: exit took {took:.1f} s, more than grace + 5 s"
    assert code == 0, log.read_text()[-3000:]
    return took


def put_in_flight(endpoint: FaultyEndpoint, mode: str, service: Service, rid: int) -> None:
    """Once a part is stored, turn S3 bad in ``mode`` and wait until a call is caught in it."""
    wait_for(lambda: parts_stored(service, rid) >= 1, 60, "a stored part")
    endpoint.set_mode(mode)
    if mode == "blackhole":
        # The next call's request goes into the hole, or (sent just before) its answer does.
        wait_for(lambda: endpoint.swallowed or endpoint.withheld, 60, "a call caught in the hole")
    elif mode == "trickle":
        wait_for(lambda: endpoint.trickled > 0, 60, "an answer trickling back")


def assert_handed_back(service: Service, rid: int, log: Path) -> None:
    row = request_row(service, rid)
    assert (row.state, row.attempts, row.lease_owner) == ("queued", 0, None), row.message
    assert row.multipart_json  # the checkpoint stays: the next worker resumes it
    assert log_events(log, "upload.released")


def assert_finished_once(
    service: Service, s3: Any, env: dict[str, str], tmp: Path, rid: int, data: bytes, key: str
) -> None:
    """A new worker, S3 healthy again, completes the request: one object version, the
    bytes sent, no multipart upload left behind."""
    again = start_worker(env, tmp / "again.log", "--burst")
    assert again.wait(120) == 0, (tmp / "again.log").read_text()[-3000:]
    row = request_row(service, rid)
    assert (row.state, row.attempts) == ("succeeded", 1), row.message
    bucket = row.bucket
    client = s3_client(s3)
    versions = client.list_object_versions(Bucket=bucket, Prefix=key).get("Versions", [])
    assert len(versions) == 1, versions
    assert client.get_object(Bucket=bucket, Key=key)["Body"].read() == data
    assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["refuse", "blackhole", "trickle"])
def test_sigterm_exits_within_the_bound_whatever_s3_does(
    mode, service, account, s3, endpoint, versioned_bucket, sestore_root, tmp_path
):
    key = f"{mode}.mp4"
    rid, data = queue_file(service, account, sestore_root, key, 25 * MiB, versioned_bucket)
    env = worker_env(service, VODPUSH_SHUTDOWN_GRACE=str(GRACE))
    log = tmp_path / "worker.log"
    worker = start_worker(env, log)
    try:
        put_in_flight(endpoint, mode, service, rid)
    except BaseException:
        worker.kill()
        worker.wait(10)
        raise
    sigterm_and_time(worker, log, f"vodpush worker, S3 {mode}")
    assert_handed_back(service, rid, log)

    endpoint.set_mode("forward")
    assert_finished_once(service, s3, env, tmp_path, rid, data, key)


@pytest.mark.slow
def test_serve_exits_within_the_bound_with_s3_blackholed(
    service, account, s3, endpoint, versioned_bucket, sestore_root, tmp_path
):
    """`vodpush serve`: the API and the embedded worker both stop in time."""
    rid, data = queue_file(service, account, sestore_root, "served.mp4", 25 * MiB, versioned_bucket)
    env = worker_env(service, VODPUSH_SHUTDOWN_GRACE=str(GRACE))
    port = free_port()
    log = tmp_path / "serve.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "vodpush", "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log.open("wb"),
    )
    try:
        put_in_flight(endpoint, "blackhole", service, rid)
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200
    except BaseException:
        proc.kill()
        proc.wait(10)
        raise
    sigterm_and_time(proc, log, "vodpush serve, S3 blackhole")
    assert_handed_back(service, rid, log)

    endpoint.set_mode("forward")
    assert_finished_once(service, s3, env, tmp_path, rid, data, "served.mp4")


@pytest.mark.slow
def test_a_hung_callback_receiver_does_not_hold_the_exit(
    service, account, s3, endpoint, versioned_bucket, sestore_root, tmp_path
):
    """The receiver reads the POST and never answers (the callback timeout is far beyond
    the grace): the worker exits in time; the callback is sent again later, once, with the
    same message id."""
    receiver = HangingReceiver().start()
    try:
        receiver.hang.set()
        rid, _ = queue_file(
            service, account, sestore_root, "cb.mp4", 1000, versioned_bucket, receiver.url
        )
        env = worker_env(
            service,
            VODPUSH_SHUTDOWN_GRACE=str(GRACE),
            VODPUSH_CALLBACK_TIMEOUT="30",
            VODPUSH_CALLBACK_ALLOW_PRIVATE="true",
        )
        log = tmp_path / "worker.log"
        worker = start_worker(env, log)
        if not receiver.got_post.wait(60):
            worker.kill()
            worker.wait(10)
            pytest.fail("the callback never came")
        sigterm_and_time(worker, log, "vodpush worker, callback receiver hung")
        row = request_row(service, rid)
        assert (row.state, row.callback_state) == ("succeeded", "pending")
        (first,) = service.queue.callback_attempts(rid)
        assert not first["ok"] and "shutdown" in first["error"]

        receiver.hang.clear()
        again = start_worker(env, tmp_path / "again.log", "--burst")
        assert again.wait(60) == 0, (tmp_path / "again.log").read_text()[-3000:]
        row = request_row(service, rid)
        assert (row.callback_state, row.callback_attempts) == ("delivered", 2)
        assert len(receiver.answered) == 1  # delivered once
        assert len(receiver.received) == 2
        ids = {headers["webhook-id"] for headers, _ in receiver.received}
        assert len(ids) == 1  # the same message both times: the receiver can tell
    finally:
        receiver.stop()


@pytest.mark.slow
def test_a_handed_back_request_is_never_completed_by_the_old_worker(
    service, account, s3, endpoint, versioned_bucket, sestore_root, tmp_path
):
    """In process, with the real engine: a part's answer trickles in while the grace runs
    out; the worker hands the request back and returns. Then S3 answers the stuck call at
    once: the old upload thread carries on, and the lease guard stops it before it records
    a part or completes the upload."""
    service.settings.part_concurrency = 1
    rid, data = queue_file(service, account, sestore_root, "guard.mp4", 30 * MiB, versioned_bucket)
    worker = Worker(service)
    thread = threading.Thread(target=worker.run)
    thread.start()
    try:
        put_in_flight(endpoint, "trickle", service, rid)
        parts_before = parts_stored(service, rid)
        stopped = time.monotonic()
        worker.stop(grace=0.5)
        thread.join(30)
        took = time.monotonic() - stopped
        print(f"\nWorker.run returned {took:.2f} s after stop(grace=0.5)")
        assert not thread.is_alive() and took < 0.5 + 5
    finally:
        worker.stop(grace=0)
        thread.join(30)
    row = request_row(service, rid)
    assert (row.state, row.attempts) == ("queued", 0)
    old = [t for t in threading.enumerate() if t.name.startswith(f"upload-{rid}")]
    assert old, "the upload thread should still be stuck in its S3 call"

    endpoint.set_mode("forward")  # the stuck call gets its answer now
    for t in old:
        t.join(60)
        assert not t.is_alive()
    row = request_row(service, rid)
    assert (row.state, row.attempts, row.lease_owner) == ("queued", 0, None)
    assert parts_stored(service, rid) == parts_before  # no part recorded after the release
    client = s3_client(s3)
    assert client.list_object_versions(Bucket=versioned_bucket).get("Versions", []) == []
    uploads = client.list_multipart_uploads(Bucket=versioned_bucket).get("Uploads", [])
    assert len(uploads) == 1  # kept for the next holder to resume

    env = worker_env(service)
    assert_finished_once(service, s3, env, tmp_path, rid, data, "guard.mp4")
