"""The runner and a cancel, on the in-memory stores with a fake transfer step and a fake S3
client (tests/test_runner.py's way): the upload is told to stop at the next heartbeat, and
once it has stopped the worker aborts the multipart upload the cancel handed over."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import pytest

from tests.test_runner import FakeUpload, _enqueue, _state, service  # noqa: F401
from vodpush.core.checkpoint import MultipartCheckpoint
from vodpush.core.records import CANCELED_BY_CUSTOMER
from vodpush.service import Service
from vodpush.transfer import UploadInterrupted, UploadResult
from vodpush.worker.runner import HEARTBEAT_SECONDS, Worker


class FakeS3:
    def __init__(self, *, refuse: bool = False) -> None:
        self.aborted: list[tuple[str, str, str]] = []
        self.refuse = refuse

    def abort_multipart_upload(self, *, Bucket: str, Key: str, UploadId: str) -> dict[str, Any]:
        if self.refuse:
            from botocore.exceptions import EndpointConnectionError

            raise EndpointConnectionError(endpoint_url="http://127.0.0.1:9")
        self.aborted.append((Bucket, Key, UploadId))
        return {}


def _uploading(started: threading.Event, stopped: list[float]) -> Any:
    def upload(call: dict[str, Any]) -> UploadResult:
        call["ledger"].begin(MultipartCheckpoint("up-1", 5, 15, 99, True))
        started.set()
        began = time.monotonic()
        while not call["should_stop"]() and time.monotonic() - began < 10:
            time.sleep(0.01)
        stopped.append(time.monotonic() - began)
        raise UploadInterrupted()

    return upload


def _actions(caplog: pytest.LogCaptureFixture) -> list[str | None]:
    return [getattr(record, "action", None) for record in caplog.records]


def _wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


@pytest.mark.parametrize("s3_answers", [True, False])
def test_a_canceled_upload_stops_at_the_next_heartbeat_and_is_aborted(
    service: Service,  # noqa: F811
    s3_answers: bool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    (rid,) = _enqueue(service)
    s3 = FakeS3(refuse=not s3_answers)
    started, stopped = threading.Event(), []
    worker = Worker(
        service, uploader=FakeUpload(_uploading(started, stopped)), clients=lambda account: s3
    )
    caplog.set_level(logging.INFO, logger="vodpush.worker.runner")
    thread = threading.Thread(target=worker.run)
    thread.start()
    try:
        assert started.wait(10)
        canceled_at = time.monotonic()
        change = service.requests.cancel(rid, account_id=None, message=CANCELED_BY_CUSTOMER)
        assert change.changed
        _wait(lambda: "upload.canceled" in _actions(caplog), 5, "the worker to see the cancel")
        _wait(lambda: not worker._active, 5, "the upload slot to be freed")
        took = time.monotonic() - canceled_at
        assert took <= HEARTBEAT_SECONDS + 0.5, took
    finally:
        worker.stop(0)
        thread.join(10)
    assert len(stopped) == 1
    assert _state(service, rid).state == "canceled"
    assert "upload.lease_lost" not in _actions(caplog)
    if s3_answers:
        assert s3.aborted == [("b", "out/0", "up-1")]
        assert service.orphans.count() == 0
    else:
        # S3 did not confirm: the orphan stays for the reaper, due again after a backoff.
        (orphan,) = service.orphans.list(request_id=rid)
        assert orphan.upload_id == "up-1" and orphan.attempts == 1 and orphan.last_error
