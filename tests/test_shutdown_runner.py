"""The stopping worker's bounds on the in-memory stores: the deadline arithmetic, an upload
whose S3 call never returns handed back at give-up time, the lease guard refusing whatever
its thread does afterwards, and an upload in its final call never handed back. The real
processes, signals and S3 faults are in tests/test_shutdown.py."""

from __future__ import annotations

import math
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests import test_runner
from tests.test_runner import OK, FakeUpload, RecordingS3, _enqueue, _state
from vodpush.core.checkpoint import PartRecord
from vodpush.core.requests import LeaseLost
from vodpush.service import Service
from vodpush.transfer import UploadError, UploadResult, upload
from vodpush.worker.runner import Worker
from vodpush.worker.shutdown import (
    NOT_STOPPING,
    SETTLE_SECONDS,
    deadline_after,
    give_up_at,
    time_left,
)

MiB = 1024 * 1024
service = test_runner.service  # the in-memory Service fixture


def test_deadline_arithmetic() -> None:
    assert deadline_after(100.0, 5.0) == 105.0
    assert deadline_after(100.0, 0.0) == 100.0
    # A second stop brings the deadline nearer, never later.
    assert deadline_after(101.0, 60.0, current=105.0) == 105.0
    assert deadline_after(101.0, 1.0, current=105.0) == 102.0
    assert deadline_after(100.0, 5.0, current=NOT_STOPPING) == 105.0
    for bad in (-1.0, math.nan):
        with pytest.raises(ValueError):
            deadline_after(100.0, bad)
    assert give_up_at(105.0) == 105.0 + SETTLE_SECONDS
    assert give_up_at(NOT_STOPPING) == math.inf  # no stop: wait for everything
    assert time_left(107.0, 105.5) == 1.5
    assert time_left(107.0, 108.0) == 0.0
    assert time_left(math.inf, 1e9) == math.inf
    # The promise of docs: with the default grace, gone SETTLE_SECONDS after it.
    assert SETTLE_SECONDS <= 3


def _start(worker: Worker) -> threading.Thread:
    thread = threading.Thread(target=worker.run)
    thread.start()
    return thread


def _stop_and_time(worker: Worker, thread: threading.Thread, grace: float) -> float:
    began = time.monotonic()
    worker.stop(grace=grace)
    thread.join(grace + SETTLE_SECONDS + 5)
    took = time.monotonic() - began
    assert not thread.is_alive(), "run() still waits for an upload that never returns"
    return took


def test_an_upload_stuck_in_s3_is_handed_back_and_its_thread_refused_later(
    service: Service,
) -> None:
    (rid,) = _enqueue(service)
    started, go, after = threading.Event(), threading.Event(), threading.Event()
    refused: list[str] = []

    def stuck(call: dict[str, Any]) -> UploadResult:
        started.set()
        go.wait(30)  # an S3 call that ignores should_stop: it never returns in time
        ledger = call["ledger"]
        for name, write in (
            ("part_done", lambda: ledger.part_done(2, PartRecord('"e"', None, 5))),
            ("confirm", ledger.confirm),
        ):
            try:
                write()
            except LeaseLost:
                refused.append(name)
        after.set()
        return OK  # the runner's succeed() meets LeaseLost too

    worker = Worker(service, uploader=FakeUpload(stuck))
    thread = _start(worker)
    assert started.wait(10)
    took = _stop_and_time(worker, thread, grace=0.2)
    assert took < 0.2 + SETTLE_SECONDS + 1.5, took
    row = _state(service, rid)
    assert (row.state, row.attempts) == ("queued", 0)

    go.set()  # the stuck call returns after the hand-back
    assert after.wait(10)
    time.sleep(0.2)  # the runner handles the returned result
    assert refused == ["part_done", "confirm"]
    row = _state(service, rid)
    assert (row.state, row.attempts) == ("queued", 0)
    claimed = service.queue.claim("next", 30)
    assert claimed is not None and claimed.id == rid


def test_the_real_engine_never_completes_a_handed_back_upload(
    service: Service, tmp_path: Path
) -> None:
    """The last part's UploadPart hangs past the give-up time; when it returns, the lease
    guard stops the engine before it records the part or calls CompleteMultipartUpload."""
    (rid,) = _enqueue(service)
    (tmp_path / "sestore1" / "jb").mkdir(parents=True)
    (tmp_path / "sestore1" / "jb" / "0").write_bytes(b"v" * (6 * MiB))
    sending, go, done = threading.Event(), threading.Event(), threading.Event()
    raised: list[BaseException] = []

    class HangingLastPart(RecordingS3):
        def upload_part(self, **kw: Any) -> dict[str, Any]:
            if kw["PartNumber"] == 2:
                sending.set()
                go.wait(30)
            return super().upload_part(**kw)

    s3 = HangingLastPart()

    def real_engine(client: Any, job: Any, ledger: Any, **kw: Any) -> UploadResult:
        kw |= {"threshold": 5 * MiB, "chunksize": 5 * MiB, "concurrency": 1}
        try:
            return upload(s3, job, ledger, **kw)  # type: ignore[arg-type]
        except BaseException as exc:
            raised.append(exc)
            raise
        finally:
            done.set()

    worker = Worker(service, uploader=real_engine)
    thread = _start(worker)
    assert sending.wait(10)
    _stop_and_time(worker, thread, grace=0)
    assert _state(service, rid).state == "queued"
    go.set()
    assert done.wait(10)
    assert [type(e) for e in raised] == [LeaseLost]
    assert "CompleteMultipartUpload" not in s3.calls and "AbortMultipartUpload" not in s3.calls
    row = _state(service, rid)
    assert (row.state, row.attempts) == ("queued", 0)
    # The next holder resumes the same upload from part 1, the only part recorded.
    assert service.queue.claim("next", 30) is not None
    checkpoint = service.ledger(rid, "next").load()
    assert checkpoint is not None and sorted(checkpoint.parts) == [1]


def test_an_upload_in_its_final_call_is_not_handed_back(service: Service) -> None:
    """Past ledger.confirm() the final S3 call may land at any moment: handing the request
    back would have the next worker upload the object a second time. It keeps its lease."""
    (rid,) = _enqueue(service)
    committing, go = threading.Event(), threading.Event()

    def completing(call: dict[str, Any]) -> UploadResult:
        call["ledger"].confirm()
        committing.set()
        go.wait(30)  # CompleteMultipartUpload, slow to answer
        return OK

    worker = Worker(service, uploader=FakeUpload(completing))
    thread = _start(worker)
    assert committing.wait(10)
    _stop_and_time(worker, thread, grace=0)
    assert _state(service, rid).state == "running"
    service.queue.heartbeat(rid, worker.owner, 30)  # still this worker's lease
    go.set()  # the call lands: the success is recorded, once
    deadline = time.monotonic() + 10
    while _state(service, rid).state == "running" and time.monotonic() < deadline:
        time.sleep(0.02)
    assert (_state(service, rid).state, _state(service, rid).attempts) == ("succeeded", 1)


def test_a_transient_error_while_stopping_hands_the_request_back_uncounted(
    service: Service,
) -> None:
    (rid,) = _enqueue(service)
    started = threading.Event()

    def s3_goes_away(call: dict[str, Any]) -> UploadResult:
        started.set()
        deadline = time.monotonic() + 10
        while not worker._stopping.is_set() and time.monotonic() < deadline:
            time.sleep(0.01)
        raise UploadError("could not connect to the S3 endpoint", transient=True)

    worker = Worker(service, uploader=FakeUpload(s3_goes_away))
    thread = _start(worker)
    assert started.wait(10)
    _stop_and_time(worker, thread, grace=30)  # well within the grace
    row = _state(service, rid)
    assert (row.state, row.attempts) == ("queued", 0), row.message


def test_the_daemon_pool_runs_reports_and_skips_cancelled_work() -> None:
    from vodpush.transfer.threads import DaemonPool

    gate = threading.Event()
    with DaemonPool(1, name="pool-under-test") as pool:
        assert all(t.daemon for t in threading.enumerate() if t.name.startswith("pool-under-test-"))
        blocked = pool.submit(gate.wait, 10)
        queued = pool.submit(lambda: "never")
        assert queued.cancel()  # still queued behind the blocked call: skipped
        gate.set()
        assert blocked.result(10) is True
        assert pool.submit(lambda x: x * 2, 21).result(10) == 42
        failed = pool.submit(lambda: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            failed.result(10)
    assert not any(t.name.startswith("pool-under-test-") for t in threading.enumerate())  # joined
    with pytest.raises(RuntimeError):
        pool.submit(print)


def test_a_signal_never_runs_stop_inside_a_lock_the_main_thread_holds() -> None:
    """`vodpush worker` runs its loop on the main thread, where signal handlers run: a stop()
    that takes a lock the interrupted loop holds (its Event's) must not run there."""
    import os
    import signal

    from vodpush.cli.common import stop_on_signals

    lock = threading.Lock()
    called: list[bool] = []
    done = threading.Event()

    def stop() -> None:
        got = lock.acquire(timeout=2)  # run inside the lock, this would wait in vain
        called.append(got)
        if got:
            lock.release()
        done.set()

    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        stop_on_signals(stop)
        with lock:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.3)  # the handler has run by now, inside the lock
        assert done.wait(10)
        assert called == [True]
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)
