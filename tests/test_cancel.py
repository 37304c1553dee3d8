"""aws.cancel and aws.retry as a customer uses them: signed requests over HTTP to a live
server, a worker uploading to the moto S3 process (through a TCP proxy where a test must
hold a request in flight), real callback receivers on loopback, SQLite and PostgreSQL.

A canceled upload stores nothing: a running multipart upload is aborted within 2 s (no
upload listed, no object), one whose last S3 call is under way cannot be canceled (the
cancel is refused and the upload succeeds), and a cancel racing the worker ends in exactly
one outcome, the one the API answered. A retried request starts over (attempts from 0),
keeps its history, and sends a second callback under a new webhook-id."""

from __future__ import annotations

import dataclasses
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest
from botocore.exceptions import ClientError

from tests.conftest import MiB, s3_client
from tests.s3server import Intercept, MotoServer, TcpProxy
from tests.test_callback_ids import ScriptedReceiver
from tests.test_faults import log_events, start_worker, worker_env
from tests.wire import call
from vodpush.service import Service
from vodpush.worker.runner import Worker

CANCELED = "Canceled by the customer"


# -- helpers --------------------------------------------------------------------------------


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.02)
    pytest.fail(f"timed out waiting for {what}")


def queue_upload(
    url: str, creds: Any, root: Path, name: str, size: int, bucket: str, callback: str = ""
) -> int:
    path = root / "sestore1" / creds.username / name
    path.write_bytes(os.urandom(size))
    answer = call(
        url,
        creds,
        "aws.upload",
        path=f"sestore1/{creds.username}/{name}",
        destination_path=name,
        bucket=bucket,
        acl="private",
        callback=callback,
    )
    assert answer["status"] == "success", answer
    return int(answer["data"]["id"])


def status_of(url: str, creds: Any, request_id: int) -> dict[str, Any]:
    answer = call(url, creds, "aws.status", id=request_id)
    assert answer["status"] == "success", answer
    (record,) = answer["data"]
    return record


def state_of(service: Service, request_id: int) -> str:
    row = service.requests.get(request_id)
    assert row is not None
    return row.state


def open_uploads(s3: MotoServer, bucket: str) -> list[dict[str, Any]]:
    return s3_client(s3).list_multipart_uploads(Bucket=bucket).get("Uploads", [])


def stored(s3: MotoServer, bucket: str, key: str) -> bool:
    try:
        s3_client(s3).head_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        assert exc.response["Error"]["Code"] in ("404", "NoSuchKey")
        return False
    return True


def history(service: Service, request_id: int) -> list[tuple[str, str, int]]:
    return [(e.event, e.state, e.attempts) for e in service.requests.events(request_id)]


def bodies(receiver: ScriptedReceiver) -> list[dict[str, Any]]:
    return [orjson.loads(body) for _, body in receiver.received]


@contextmanager
def running_worker(service: Service, **settings: Any) -> Iterator[Worker]:
    """A worker in this process (as `vodpush serve` embeds one), with ``settings`` changed."""
    if settings:
        service = dataclasses.replace(
            service, settings=service.settings.model_copy(update=settings)
        )
    worker = Worker(service)
    thread = threading.Thread(target=worker.run, name="test-worker", daemon=True)
    thread.start()
    try:
        yield worker
    finally:
        worker.stop(grace=0)
        thread.join(15)
        assert not thread.is_alive(), "the worker did not stop"


@pytest.fixture
def receiver() -> Iterator[ScriptedReceiver]:
    hook = ScriptedReceiver([])
    yield hook
    hook.stop()


@pytest.fixture
def proxy(s3: MotoServer) -> Iterator[TcpProxy]:
    endpoint = TcpProxy(s3.port).start()
    yield endpoint
    endpoint.stop()


class Gate:
    """Holds one S3 request at the proxy (Intercept.before) until ``open()``."""

    def __init__(self) -> None:
        self.arrived = threading.Event()
        self._open = threading.Event()

    def hold(self) -> None:
        self.arrived.set()
        self._open.wait(60)

    def open(self) -> None:
        self._open.set()


# -- a queued request -------------------------------------------------------------------------


def test_a_queued_request_is_canceled_never_uploaded_and_retried(
    live_server, service, s3_account, s3, bucket, sestore_root, receiver
) -> None:
    url = live_server.url
    rid = queue_upload(url, s3_account, sestore_root, "q.mp4", 1000, bucket, receiver.url)
    answer = call(url, s3_account, "aws.cancel", id=rid)
    assert answer["status"] == "success", answer
    assert answer["message"] == "Upload canceled"
    record = answer["data"]  # the request's aws.status record, as it is now
    assert (record["id"], record["state"], record["message"]) == (rid, "canceled", CANCELED)
    assert status_of(url, s3_account, rid)["state"] == "canceled"
    again = call(url, s3_account, "aws.cancel", id=rid)
    assert (again["status"], again["code"]) == ("failure", "0007")
    assert again["message"] == (
        f"invalid id: request {rid} has already finished (canceled); only a queued, running "
        "or retrying request can be canceled"
    )

    with running_worker(service):
        # The callback goes once, with the canceled record; the upload never starts.
        wait_for(lambda: receiver.received, 30, "the callback of the cancel")
        wait_for(
            lambda: status_of(url, s3_account, rid)["callback_state"] == "delivered",
            30,
            "the callback to be recorded",
        )
        (first,) = bodies(receiver)
        assert (first["id"], first["state"], first["message"]) == (rid, "canceled", CANCELED)
        assert first["attempts"] == 0 and not stored(s3, bucket, "q.mp4")

        answer = call(url, s3_account, "aws.retry", id=rid)
        assert answer["status"] == "success", answer
        assert answer["message"] == "Upload queued again"
        assert (answer["data"]["state"], answer["data"]["attempts"]) == ("queued", 0)
        assert answer["data"]["callback_state"] == "none"  # the next one comes at the end
        wait_for(lambda: len(receiver.received) == 2, 30, "the callback of the retry")
    done = status_of(url, s3_account, rid)
    assert (done["state"], done["attempts"]) == ("succeeded", 1)
    assert stored(s3, bucket, "q.mp4")
    second = bodies(receiver)[1]
    assert (second["state"], second["callback_attempts"]) == ("succeeded", 0)
    first_id, second_id = receiver.ids()
    assert first_id != second_id  # a new delivery: a receiver deduplicating by id takes it
    assert history(service, rid) == [
        ("queued", "queued", 0),
        ("canceled", "canceled", 0),
        ("retried", "queued", 0),
        ("succeeded", "succeeded", 1),
    ]


def test_refusals_name_the_field_and_never_tell_another_accounts_request(
    live_server, service, make_account, sestore_root
) -> None:
    url = live_server.url
    mine, theirs = make_account(158, "jb"), make_account(159, "eve")
    own = queue_upload(url, mine, sestore_root, "a.mp4", 10, "my-bucket")
    foreign = queue_upload(url, theirs, sestore_root, "e.mp4", 10, "my-bucket")
    unknown = foreign + 1000
    for command in ("aws.cancel", "aws.retry"):
        answers = [call(url, mine, command, id=i) for i in (foreign, unknown)]
        # The same words for a request of another account as for one that is not there.
        assert [(a["status"], a["code"]) for a in answers] == [("failure", "0007")] * 2
        assert [a["message"] for a in answers] == [
            f"invalid id: no such request: {foreign}",
            f"invalid id: no such request: {unknown}",
        ]
        missing = call(url, mine, command)
        assert (missing["code"], missing["message"]) == (
            "0006",
            "missing required field(s): id",
        )
        for bad, why in (("x", "must be an integer"), (0, "must be at least 1"), (True, "not")):
            refused = call(url, mine, command, id=bad)
            assert refused["code"] == "0007" and refused["message"].startswith("invalid id: ")
            assert why in refused["message"]
    assert state_of(service, foreign) == "queued"  # untouched

    queued = call(url, mine, "aws.retry", id=own)
    assert (queued["code"], queued["message"]) == (
        "0007",
        f"invalid id: request {own} is queued; only a failed or canceled request can be retried",
    )
    # Finished by a worker (here the store, as a worker records it).
    claimed = service.queue.claim("w", 30)
    assert claimed is not None and claimed.id == own
    service.queue.succeed(own, "w", results={}, http_status=200, sha256="ab" * 32, size=10,
                          has_callback=False)  # fmt: skip
    late = call(url, mine, "aws.cancel", id=own)
    assert late["code"] == "0007" and "has already finished (succeeded)" in late["message"]
    assert call(url, mine, "aws.retry", id=own)["message"].endswith(
        "is succeeded; only a failed or canceled request can be retried"
    )
    # Digit strings, as Perl sends them, are ids too.
    assert call(url, theirs, "aws.cancel", id=str(foreign))["status"] == "success"


# -- a running upload -----------------------------------------------------------------------


def test_a_running_multipart_upload_in_another_process_is_aborted_within_two_seconds(
    live_server, service, s3_account, s3, bucket, sestore_root, proxy, receiver, tmp_path
) -> None:
    """The worker is a process of its own (as on PostgreSQL with separate workers): it
    learns of the cancel from the database alone. Its third part is held in flight at the
    proxy while the cancel is made, then let go."""
    service.accounts.set_s3(s3_account.api_key, s3.settings(sse="AES256", endpoint_url=proxy.url))
    gate = Gate()
    proxy.intercept(Intercept(marker=b"&partNumber=3 HTTP/1.1", before=gate.hold))
    url = live_server.url
    rid = queue_upload(url, s3_account, sestore_root, "big.mp4", 4 * 5 * MiB, bucket, receiver.url)
    env = worker_env(service, VODPUSH_CALLBACK_ALLOW_PRIVATE="true")
    log = tmp_path / "worker.log"
    worker = start_worker(env, log)
    try:
        assert gate.arrived.wait(60), "the worker never sent part 3"
        (upload,) = open_uploads(s3, bucket)
        running = wait_for(
            lambda: (r := status_of(url, s3_account, rid))["bytes_done"] == 10 * MiB and r,
            10,
            "the heartbeat to report parts 1 and 2",
        )
        assert running["state"] == "running"
        started = time.monotonic()
        answer = call(url, s3_account, "aws.cancel", id=rid)
        gate.open()
        assert answer["status"] == "success", answer
        assert answer["data"]["state"] == "canceled"
        wait_for(lambda: not open_uploads(s3, bucket), 10, "the multipart upload to be aborted")
        took = time.monotonic() - started
        assert took <= 2.0, f"the cancel took {took:.2f} s to abort the upload"
        assert not stored(s3, bucket, "big.mp4")
        assert service.orphans.count() == 0  # aborted by the worker, S3 confirmed it
        wait_for(
            lambda: status_of(url, s3_account, rid)["callback_state"] == "delivered",
            30,
            "the callback",
        )
    finally:
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(30) == 0
    record = status_of(url, s3_account, rid)
    assert (record["state"], record["message"], record["attempts"]) == ("canceled", CANCELED, 1)
    ((_headers, body),) = receiver.received  # exactly once
    assert orjson.loads(body)["state"] == "canceled"
    (canceled,) = log_events(log, "upload.canceled")
    assert canceled["request_id"] == rid
    assert not log_events(log, "upload.lease_lost")
    (aborted,) = log_events(log, "orphan.aborted")
    assert aborted["upload_id"] == upload["UploadId"]
    assert history(service, rid) == [("queued", "queued", 0), ("canceled", "canceled", 1)]


def test_a_cancel_during_the_final_s3_call_is_refused_and_the_upload_stands(
    live_server, service, s3_account, s3, bucket, sestore_root, proxy
) -> None:
    """Once the worker has committed to writing the object (PutObject under way), a cancel
    could not stop it: it is refused, saying so, and the upload succeeds."""
    service.accounts.set_s3(s3_account.api_key, s3.settings(endpoint_url=proxy.url))
    gate = Gate()
    proxy.intercept(Intercept(marker=f"PUT /{bucket}/put.mp4 HTTP/1.1".encode(), before=gate.hold))
    url = live_server.url
    rid = queue_upload(url, s3_account, sestore_root, "put.mp4", 1000, bucket)
    with running_worker(service):
        assert gate.arrived.wait(30), "the worker never sent its PutObject"
        assert status_of(url, s3_account, rid)["message"] == "Finishing"
        answer = call(url, s3_account, "aws.cancel", id=rid)
        gate.open()
        assert (answer["status"], answer["code"]) == ("failure", "0007")
        assert answer["message"] == (
            f"invalid id: request {rid} is finishing (its last S3 call is under way) and can "
            "no longer be canceled; its outcome follows shortly"
        )
        wait_for(lambda: state_of(service, rid) == "succeeded", 30, "the upload to succeed")
    assert stored(s3, bucket, "put.mp4")


def test_cancels_racing_the_worker_end_in_exactly_the_outcome_the_api_answered(
    live_server, service, s3_account, s3, bucket, sestore_root
) -> None:
    """Uploads canceled at random moments while a worker takes them: every one ends either
    canceled (the cancel answered success) with nothing stored, or succeeded (the cancel was
    refused: finished or finishing) with its object; never both, never neither."""
    url = live_server.url
    rng = random.Random(10)
    answers: dict[int, dict[str, Any]] = {}
    with running_worker(service):
        for n in range(16):
            # Single PUTs and two-part multipart uploads, canceled while queued, while
            # running, in their final S3 call, or after they ended.
            size = (6 if n % 2 else 1) * MiB
            rid = queue_upload(url, s3_account, sestore_root, f"r{n}.mp4", size, bucket)
            time.sleep(rng.uniform(0, 0.12))
            answers[rid] = call(url, s3_account, "aws.cancel", id=rid)
        wait_for(
            lambda: all(state_of(service, rid) in ("succeeded", "canceled") for rid in answers),
            60,
            "every request to end",
        )
    succeeded = set()
    for n, (rid, answer) in enumerate(answers.items()):
        state = state_of(service, rid)
        if answer["status"] == "success":
            assert state == "canceled" and not stored(s3, bucket, f"r{n}.mp4"), rid
        else:
            assert answer["code"] == "0007", answer
            assert "finishing" in answer["message"] or "(succeeded)" in answer["message"]
            assert state == "succeeded" and stored(s3, bucket, f"r{n}.mp4"), rid
            succeeded.add(rid)
    # Every multipart upload of a canceled request was aborted by the worker that held it.
    # What is left in the orphan table is the completed uploads of succeeded requests (an
    # outcome records any checkpoint still there), which S3 no longer lists.
    wait_for(lambda: not open_uploads(s3, bucket), 10, "every canceled upload to be aborted")
    assert {o.request_id for o in service.orphans.list()} <= succeeded


# -- a retrying request -----------------------------------------------------------------------


def test_a_retrying_request_is_canceled_and_its_kept_upload_reaped(
    live_server, service, s3_account, s3, bucket, sestore_root, proxy
) -> None:
    """S3 goes away while part 2 is sent: the attempt fails transiently, the request waits a
    minute for its next attempt, its multipart upload kept for the resume. Canceled: it is
    never tried again, and the reaper aborts the upload it kept (S3 back by then)."""
    service.accounts.set_s3(s3_account.api_key, s3.settings(endpoint_url=proxy.url))
    proxy.intercept(Intercept(marker=b"&partNumber=2 HTTP/1.1", before=proxy.stop))
    url = live_server.url
    rid = queue_upload(url, s3_account, sestore_root, "re.mp4", 3 * 5 * MiB, bucket)
    with running_worker(service, retry_base_delay=60, retry_max_delay=60, reap_interval=0.2):
        wait_for(lambda: state_of(service, rid) == "retrying", 60, "the transient failure")
        proxy.start()
        assert len(open_uploads(s3, bucket)) == 1  # kept for the next attempt
        answer = call(url, s3_account, "aws.cancel", id=rid)
        assert answer["status"] == "success", answer
        record = answer["data"]
        assert (record["state"], record["next_attempt_at"], record["error_code"]) == (
            "canceled",
            "",
            None,
        )
        wait_for(lambda: not open_uploads(s3, bucket), 10, "the reaper to abort the upload")
        assert state_of(service, rid) == "canceled"
    assert service.orphans.count() == 0 and not stored(s3, bucket, "re.mp4")
    assert history(service, rid) == [
        ("queued", "queued", 0),
        ("retrying", "retrying", 1),
        ("canceled", "canceled", 1),
    ]
    (retrying,) = [e for e in service.requests.events(rid) if e.event == "retrying"]
    assert retrying.error_code and "Retrying at" in (retrying.message or "")


# -- retrying a failed request --------------------------------------------------------------


def test_a_request_failed_for_a_missing_bucket_is_retried_once_the_bucket_exists(
    live_server, service, s3_account, s3, sestore_root, receiver
) -> None:
    url = live_server.url
    bucket = f"later-{os.urandom(6).hex()}"
    rid = queue_upload(url, s3_account, sestore_root, "f.mp4", 6 * MiB, bucket, receiver.url)
    with running_worker(service):
        wait_for(lambda: len(receiver.received) == 1, 30, "the callback of the failure")
        failed = status_of(url, s3_account, rid)
        assert (failed["state"], failed["error_code"], failed["attempts"]) == (
            "failed",
            "NoSuchBucket",
            1,
        )
        s3_client(s3).create_bucket(Bucket=bucket)
        answer = call(url, s3_account, "aws.retry", id=rid)
        assert answer["status"] == "success", answer
        again = answer["data"]
        assert (again["state"], again["message"], again["attempts"]) == ("queued", "Queued", 0)
        assert (again["status"], again["error_code"]) == (0, None)
        wait_for(lambda: len(receiver.received) == 2, 60, "the callback of the retry")
    done = status_of(url, s3_account, rid)
    assert (done["state"], done["attempts"], done["callback_state"]) == (
        "succeeded",
        1,
        "delivered",
    )
    assert stored(s3, bucket, "f.mp4")
    assert [b["state"] for b in bodies(receiver)] == ["failed", "succeeded"]
    assert len(set(receiver.ids())) == 2
    assert history(service, rid) == [
        ("queued", "queued", 0),
        ("failed", "failed", 1),
        ("retried", "queued", 0),
        ("succeeded", "succeeded", 1),
    ]
    failed_step = service.requests.events(rid)[1]
    assert failed_step.error_code == "NoSuchBucket" and "NoSuchBucket" in (
        failed_step.message or ""
    )
    # Both deliveries are in the callback history.
    assert [a["ok"] for a in service.queue.callback_attempts(rid)] == [True, True]
