"""The worker runner's own logic on the in-memory stores, in seconds: claim, renew, retry,
give up, release on shutdown, lease lost, crash. The transfer step is a plain function in
place of the S3 engine (the runner's ``uploader``), so no database, S3 or network is
involved; the real-database and moto-process tests (test_worker.py, test_faults.py) stay
as the integration tier."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from vodpush.config import Settings
from vodpush.core.requests import LeaseLost, NewRequest
from vodpush.crypto import generate_key
from vodpush.service import Service
from vodpush.transfer import UploadError, UploadInterrupted, UploadResult, upload
from vodpush.worker.runner import Worker

OK = UploadResult(
    results={"ETag": '"e"', "Bucket": "b", "Key": "k"},
    http_status=200,
    sha256="ab" * 32,
    size=10,
    parts_sent=1,
    parts_total=1,
)


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'unused.db'}",  # never opened
        sestore_root=tmp_path,
        secret_key=generate_key(),
        secret_key_file=tmp_path / "unused.key",
        poll_interval=0.05,
        retry_base_delay=0.05,
        retry_max_delay=0.1,
        max_attempts=3,
        retry_window=0,
        lease_seconds=5,
        shutdown_grace=0.2,
    )
    svc = Service.in_memory(settings)
    yield svc
    svc.close()
    assert not (tmp_path / "unused.db").exists()


def _enqueue(service: Service, n: int = 1) -> list[int]:
    account = service.accounts.create(cdn=1, username="jb")["id"]
    service.accounts.allow_buckets(str(account), ["b"])
    return [
        service.requests.enqueue(
            NewRequest(account, 1, f"sestore1/jb/{i}", f"out/{i}", "b", "private", {}, "", f"s{i}")
        ).id
        for i in range(n)
    ]


class FakeUpload:
    """The transfer step: each call runs the next behaviour (the last one repeats)."""

    def __init__(self, *behaviours: Callable[[dict[str, Any]], UploadResult]) -> None:
        self.behaviours = list(behaviours)
        self.calls: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    def __call__(self, client: Any, job: Any, ledger: Any, **kw: Any) -> UploadResult:
        call = {"job": job, "ledger": ledger, **kw}
        with self.lock:
            self.calls.append(call)
            behaviour = self.behaviours[min(len(self.calls), len(self.behaviours)) - 1]
        return behaviour(call)


def _state(service: Service, rid: int) -> Any:
    row = service.requests.get(rid)
    assert row is not None
    return row


def _run(worker: Worker, timeout: float = 20) -> None:
    thread = threading.Thread(target=worker.run, kwargs={"burst": True})
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        worker.stop(0)
        thread.join(5)
        pytest.fail("the worker did not finish its burst")


def test_claims_every_request_and_records_success(service: Service) -> None:
    ids = _enqueue(service, 5)
    fake = FakeUpload(lambda call: OK)
    _run(Worker(service, concurrency=2, uploader=fake))
    assert len(fake.calls) == 5
    assert sorted(c["job"].key for c in fake.calls) == [f"out/{i}" for i in range(5)]
    call = fake.calls[0]
    assert call["threshold"] == service.settings.multipart_threshold
    assert call["ledger"].load() is None  # a fresh claim has no checkpoint
    for rid in ids:
        row = _state(service, rid)
        assert (row.state, row.attempts, row.bytes_done) == ("succeeded", 1, 10)
    assert service.queue.depth()["succeeded"] == 5


def test_a_transient_error_is_retried_then_succeeds(service: Service) -> None:
    (rid,) = _enqueue(service)

    def flaky(call: dict[str, Any]) -> UploadResult:
        raise UploadError("S3 said SlowDown", transient=True, http_status=503, code="SlowDown")

    fake = FakeUpload(flaky, lambda call: OK)
    _run(Worker(service, uploader=fake))
    row = _state(service, rid)
    assert (row.state, row.attempts, len(fake.calls)) == ("succeeded", 2, 2)


def test_a_retry_or_a_takeover_looks_for_the_object_before_writing(service: Service) -> None:
    """The attempt after a failure, or after a dead worker, may find the object the earlier
    one wrote (its answer lost, or the worker killed before recording it): the engine is
    told so (UploadJob.may_exist); a first attempt is not."""
    first, second = _enqueue(service, 2)
    failed: set[str] = set()

    def once_flaky(call: dict[str, Any]) -> UploadResult:
        if call["job"].key in failed:
            return OK
        failed.add(call["job"].key)
        raise UploadError("S3 did not answer in time", transient=True, code="ReadTimeoutError")

    fake = FakeUpload(once_flaky)
    assert service.queue.claim("dead", 0.001) is not None  # takes ``first`` and dies
    time.sleep(0.005)
    _run(Worker(service, concurrency=1, uploader=fake))
    looked = [(c["job"].key, c["job"].may_exist) for c in fake.calls]
    # ``first``: taken over from the dead worker, then retried; ``second``: failed, retried.
    assert sorted(looked) == [("out/0", True), ("out/0", True), ("out/1", False), ("out/1", True)]
    assert {_state(service, rid).state for rid in (first, second)} == {"succeeded"}


def test_transient_errors_give_up_after_max_attempts(service: Service) -> None:
    (rid,) = _enqueue(service)

    def down(call: dict[str, Any]) -> UploadResult:
        raise UploadError("connection refused", transient=True, code="EndpointConnectionError")

    fake = FakeUpload(down)
    _run(Worker(service, uploader=fake))
    row = _state(service, rid)
    assert (row.state, row.attempts, len(fake.calls)) == ("failed", 3, 3)
    assert row.message == "Upload failed: connection refused"
    assert row.error_code == "EndpointConnectionError"


def test_a_permanent_error_fails_at_once(service: Service) -> None:
    (rid,) = _enqueue(service)

    def denied(call: dict[str, Any]) -> UploadResult:
        raise UploadError("Access Denied", transient=False, http_status=403, code="AccessDenied")

    fake = FakeUpload(denied)
    _run(Worker(service, uploader=fake))
    row = _state(service, rid)
    assert (row.state, row.attempts, row.http_status, len(fake.calls)) == ("failed", 1, 403, 1)


def test_an_unexpected_error_fails_the_request_instead_of_leaving_it_leased(
    service: Service,
) -> None:
    (rid,) = _enqueue(service)

    def crash(call: dict[str, Any]) -> UploadResult:
        raise RuntimeError("bug")

    _run(Worker(service, uploader=FakeUpload(crash)))
    row = _state(service, rid)
    assert (row.state, row.error_code) == ("failed", "InternalError")


def test_the_heartbeat_renews_the_lease_and_writes_progress(service: Service) -> None:
    (rid,) = _enqueue(service)
    seen: list[Any] = []

    def slow(call: dict[str, Any]) -> UploadResult:
        call["progress"](5, 10)
        deadline = time.monotonic() + 10
        while _state(service, rid).bytes_done != 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        seen.append(_state(service, rid))
        return OK

    _run(Worker(service, uploader=FakeUpload(slow)))
    assert (seen[0].bytes_done, seen[0].bytes_total, seen[0].state) == (5, 10, "running")
    assert _state(service, rid).state == "succeeded"


def test_shutdown_interrupts_and_releases_without_counting_the_attempt(service: Service) -> None:
    (rid,) = _enqueue(service)
    started = threading.Event()

    def until_stopped(call: dict[str, Any]) -> UploadResult:
        started.set()
        while not call["should_stop"]():
            time.sleep(0.02)
        raise UploadInterrupted()

    worker = Worker(service, uploader=FakeUpload(until_stopped))
    thread = threading.Thread(target=worker.run)
    thread.start()
    assert started.wait(10)
    worker.stop(grace=0.1)
    thread.join(10)
    assert not thread.is_alive()
    row = _state(service, rid)
    assert (row.state, row.attempts) == ("queued", 0)
    # Another worker takes it up at once.
    claimed = service.queue.claim("next", 30)
    assert claimed is not None and claimed.id == rid


def test_a_stop_within_the_grace_lets_the_upload_finish(service: Service) -> None:
    (rid,) = _enqueue(service)
    started, go = threading.Event(), threading.Event()

    def finishing(call: dict[str, Any]) -> UploadResult:
        started.set()
        go.wait(10)
        assert not call["should_stop"]()
        return OK

    worker = Worker(service, uploader=FakeUpload(finishing))
    thread = threading.Thread(target=worker.run)
    thread.start()
    assert started.wait(10)
    worker.stop(grace=30)
    go.set()
    thread.join(10)
    assert _state(service, rid).state == "succeeded"


def _run_until(worker: Worker, done: threading.Event) -> None:
    """Run the worker (not in burst: a lost request stays running) until ``done``, then a
    moment for the runner to handle what the upload raised or returned, then stop it."""
    thread = threading.Thread(target=worker.run)
    thread.start()
    assert done.wait(15)
    time.sleep(0.3)
    worker.stop(0)
    thread.join(10)
    assert not thread.is_alive()


def _steal(service: Service, rid: int, owner: str) -> None:
    """Another worker takes the request over (as after an expired lease)."""
    service.queue.release(rid, owner)
    claimed = service.queue.claim("thief", 30)
    assert claimed is not None and claimed.id == rid


def test_a_lost_lease_stops_the_upload(service: Service) -> None:
    (rid,) = _enqueue(service)
    done = threading.Event()
    stopped: list[bool] = []

    def stolen(call: dict[str, Any]) -> UploadResult:
        _steal(service, rid, worker.owner)
        # The next heartbeat finds the lease gone: the upload is asked to stop.
        deadline = time.monotonic() + 10
        while not call["should_stop"]() and time.monotonic() < deadline:
            time.sleep(0.02)
        stopped.append(call["should_stop"]())
        done.set()
        raise UploadInterrupted()

    worker = Worker(service, uploader=FakeUpload(stolen))
    _run_until(worker, done)
    assert stopped == [True]
    row = _state(service, rid)
    # Still the thief's: neither released nor failed by the worker that lost it.
    assert (row.state, row.message, row.attempts) == ("running", "Uploading", 1)
    service.queue.heartbeat(rid, "thief", 30)


def test_an_outcome_after_a_lost_lease_is_dropped(service: Service) -> None:
    (rid,) = _enqueue(service)
    done = threading.Event()

    def stolen_then_done(call: dict[str, Any]) -> UploadResult:
        _steal(service, rid, worker.owner)
        done.set()
        return OK  # the runner's succeed() meets LeaseLost

    worker = Worker(service, uploader=FakeUpload(stolen_then_done))
    _run_until(worker, done)
    row = _state(service, rid)
    assert (row.state, row.attempts) == ("running", 1)
    service.queue.heartbeat(rid, "thief", 30)  # still the thief's lease


def test_an_error_after_a_lost_lease_is_reported_as_the_lost_lease(
    service: Service, caplog: pytest.LogCaptureFixture
) -> None:
    """An upload that ends in an unexpected error (a database connection that died while
    the host was cut off) after another worker took the request over: the failure it would
    record is refused, and the log says the lease was lost, not only that it crashed."""
    (rid,) = _enqueue(service)
    done = threading.Event()

    def stolen_then_crash(call: dict[str, Any]) -> UploadResult:
        _steal(service, rid, worker.owner)
        done.set()
        raise ConnectionError("server closed the connection unexpectedly")

    worker = Worker(service, uploader=FakeUpload(stolen_then_crash))
    with caplog.at_level("INFO", logger="vodpush.worker.runner"):
        _run_until(worker, done)
    actions = [getattr(r, "action", None) for r in caplog.records]
    assert "upload.crashed" in actions and "upload.lease_lost" in actions
    assert (_state(service, rid).state, _state(service, rid).attempts) == ("running", 1)
    service.queue.heartbeat(rid, "thief", 30)  # still the thief's lease


def test_a_request_of_a_disabled_account_is_held_not_uploaded(service: Service) -> None:
    (rid,) = _enqueue(service)
    service.accounts.set_enabled("1/jb", False)
    fake = FakeUpload(lambda call: OK)
    _run(Worker(service, uploader=fake))  # burst: ends at once, nothing it may do
    assert fake.calls == [] and _state(service, rid).state == "queued"
    service.accounts.set_enabled("1/jb", True)
    _run(Worker(service, uploader=fake))
    assert len(fake.calls) == 1 and _state(service, rid).state == "succeeded"


class RecordingS3:
    """The S3 calls the real transfer engine makes, answered in memory (no socket)."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def create_multipart_upload(self, **kw: Any) -> dict[str, Any]:
        self.calls.append("CreateMultipartUpload")
        return {"UploadId": "up-1"}

    def upload_part(self, **kw: Any) -> dict[str, Any]:
        self.calls.append(f"UploadPart {kw['PartNumber']}")
        return {"ETag": f'"{kw["PartNumber"]}"'}

    def put_object(self, **kw: Any) -> dict[str, Any]:
        self.calls.append("PutObject")
        raise AssertionError("PutObject after the lease was lost")

    def complete_multipart_upload(self, **kw: Any) -> dict[str, Any]:
        self.calls.append("CompleteMultipartUpload")
        raise AssertionError("CompleteMultipartUpload after the lease was lost")

    def abort_multipart_upload(self, **kw: Any) -> dict[str, Any]:
        self.calls.append("AbortMultipartUpload")
        raise AssertionError("the new holder's multipart upload aborted")


@pytest.mark.parametrize("size", [1024, 6 * 1024 * 1024], ids=["put", "multipart"])
def test_a_lease_lost_before_the_final_call_means_no_final_call(
    service: Service, tmp_path: Path, size: int
) -> None:
    """The real engine, stopped by ledger.confirm() just before PutObject or
    CompleteMultipartUpload when the lease was taken over (after the last part)."""
    (rid,) = _enqueue(service)
    (tmp_path / "sestore1" / "jb").mkdir(parents=True)
    (tmp_path / "sestore1" / "jb" / "0").write_bytes(b"v" * size)
    s3 = RecordingS3()
    done = threading.Event()
    raised: list[BaseException] = []

    def real_engine(client: Any, job: Any, ledger: Any, **kw: Any) -> UploadResult:
        report = kw["progress"]

        def progress(sent: int, total: int) -> None:
            report(sent, total)
            if sent == total:  # every part stored: the final call comes next
                _steal(service, rid, worker.owner)

        if size < 5 * 1024 * 1024:
            _steal(service, rid, worker.owner)
        kw |= {"threshold": 5 * 1024 * 1024, "chunksize": 5 * 1024 * 1024, "progress": progress}
        try:
            return upload(s3, job, ledger, **kw)  # type: ignore[arg-type]
        except BaseException as exc:
            raised.append(exc)
            raise
        finally:
            done.set()

    worker = Worker(service, uploader=real_engine)
    _run_until(worker, done)
    assert "PutObject" not in s3.calls and "CompleteMultipartUpload" not in s3.calls
    assert "AbortMultipartUpload" not in s3.calls
    if size > 5 * 1024 * 1024:
        assert s3.calls[0] == "CreateMultipartUpload" and len(s3.calls) == 3
    assert [type(e) for e in raised] == [LeaseLost]
    row = _state(service, rid)
    # Handled as a lost lease: neither failed, retried nor released by the loser.
    assert (row.state, row.message, row.attempts) == ("running", "Uploading", 1)
    service.queue.heartbeat(rid, "thief", 30)
    assert service.ledger(rid, "thief").load() is not None or size < 5 * 1024 * 1024


def test_a_permanent_error_after_the_lease_ran_out_leaves_the_upload_to_the_next_holder(
    service: Service, tmp_path: Path
) -> None:
    """A worker whose lease ran out (nobody took over yet) meets a permanent S3 error: it may
    neither abort the multipart upload nor fail the request (that would drop a checkpoint
    whose upload was not aborted); the next holder resumes, meets the error, cleans up."""
    from botocore.exceptions import ClientError

    now = [datetime(2026, 1, 1)]
    store = Service.in_memory(service.settings, clock=lambda: now[0])
    (rid,) = _enqueue(store)
    (tmp_path / "sestore1" / "jb").mkdir(parents=True)
    (tmp_path / "sestore1" / "jb" / "0").write_bytes(b"v" * (6 * 1024 * 1024))

    class DeniedAfterExpiry(RecordingS3):
        def upload_part(self, **kw: Any) -> dict[str, Any]:
            if kw["PartNumber"] == 1:
                return super().upload_part(**kw)
            now[0] += timedelta(seconds=600)  # the lease (5 s) ran out while this part went
            self.calls.append("UploadPart 2 denied")
            raise ClientError({"Error": {"Code": "AccessDenied"}}, "UploadPart")

    s3 = DeniedAfterExpiry()
    done = threading.Event()
    raised: list[BaseException] = []

    def real_engine(client: Any, job: Any, ledger: Any, **kw: Any) -> UploadResult:
        kw |= {"threshold": 5 * 1024 * 1024, "chunksize": 5 * 1024 * 1024, "concurrency": 1}
        try:
            return upload(s3, job, ledger, **kw)  # type: ignore[arg-type]
        except BaseException as exc:
            raised.append(exc)
            raise
        finally:
            worker.stop(0)  # no second claim of the expired request by this same worker
            done.set()

    class ClaimsOnce:
        """The store's queue, but this worker claims the request once: its claim loop would
        otherwise take its own expired lease back (upload.lease_renewed, as it should after
        an outage) if it polled between the clock's jump and the engine's lease check."""

        def __init__(self, queue: Any) -> None:
            self._queue = queue
            self.claimed = False

        def __getattr__(self, name: str) -> Any:
            return getattr(self._queue, name)

        def claim(self, *args: Any, **kwargs: Any) -> Any:
            if self.claimed:
                return None
            self.claimed = True
            return self._queue.claim(*args, **kwargs)

    worker = Worker(replace(store, queue=ClaimsOnce(store.queue)), uploader=real_engine)
    _run_until(worker, done)
    assert [type(e) for e in raised] == [LeaseLost]
    assert "AbortMultipartUpload" not in s3.calls
    row = _state(store, rid)
    assert (row.state, row.message) == ("running", "Uploading")  # neither failed nor retried
    # The next holder finds the checkpoint, so it can abort the upload when it fails too.
    claimed = store.queue.claim("next", 30)
    assert claimed is not None and claimed.id == rid and claimed.has_checkpoint
    checkpoint = store.ledger(rid, "next").load()
    assert checkpoint is not None and checkpoint.upload_id == "up-1"


def test_a_request_whose_workers_keep_dying_is_failed_not_reclaimed_forever(
    service: Service,
) -> None:
    (rid,) = _enqueue(service)
    # Deaths have their own limit, below max_attempts (3): an outage needs many attempts,
    # a file that kills its worker should not get as many.
    service.settings.max_lease_expiries = 2
    for n in range(2):  # each claimer dies: its lease runs out
        assert service.queue.claim(f"dead-{n}", 0.001) is not None
        time.sleep(0.005)
    fake = FakeUpload(lambda call: OK)
    _run(Worker(service, uploader=fake))
    row = _state(service, rid)
    assert fake.calls == []  # not handed to yet another worker
    assert (row.state, row.error_code, row.attempts) == ("failed", "WorkerDied", 3)
    assert row.message == "Upload failed: worker died while uploading (2 times)"


def test_a_release_at_shutdown_is_not_a_death(service: Service) -> None:
    (rid,) = _enqueue(service)
    for n in range(service.settings.max_attempts):
        assert service.queue.claim(f"polite-{n}", 30) is not None
        service.queue.release(rid, f"polite-{n}")
    _run(Worker(service, uploader=FakeUpload(lambda call: OK)))
    assert _state(service, rid).state == "succeeded"
