"""The store contract of aws.cancel, aws.retry and the request history (core.ports
RequestStorePort.cancel, .retry, .events), on the in-memory stores, SQLite and PostgreSQL:
the same fixture and helpers as tests/test_store_contract.py."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest

from tests import test_store_contract as contract
from tests.test_store_contract import _account, _enqueue, _succeed
from vodpush.core import records
from vodpush.core.checkpoint import MultipartCheckpoint, PartRecord
from vodpush.core.clock import utcnow
from vodpush.core.requests import LeaseLost, StateChange
from vodpush.service import Service

BY_CUSTOMER = records.CANCELED_BY_CUSTOMER
stores = contract.stores  # the same fixture: memory, SQLite, PostgreSQL


def _events(s: Service, rid: int) -> list[tuple[str, str, int]]:
    return [(e.event, e.state, e.attempts) for e in s.requests.events(rid)]


def _fail(s: Service, rid: int, owner: str, *, has_callback: bool = False) -> None:
    s.queue.fail(rid, owner, message="Upload failed: no bucket", http_status=404,
                 code="NoSuchBucket", has_callback=has_callback)  # fmt: skip


def test_a_queued_request_is_canceled_once_and_never_claimed(stores: Service) -> None:
    account = _account(stores)
    (rid,) = _enqueue(stores, account, callback="http://127.0.0.1:9/hook")
    change = stores.requests.cancel(rid, account_id=account, message=BY_CUSTOMER)
    assert change == StateChange(found="queued", changed=True)
    row = stores.requests.get(rid)
    assert row is not None and (row.state, row.message) == ("canceled", BY_CUSTOMER)
    shown = records.render(row)
    # Its callback is due now, with the canceled record.
    assert (shown["callback_state"], shown["status"], shown["error_code"]) == ("pending", 0, None)
    due = stores.queue.claim_callback(30)
    assert due is not None and due.id == rid and due.msg_id.startswith("msg_")
    assert stores.queue.claim("w", 30) is None
    assert not stores.queue.has_work()  # nothing to upload, and the callback is claimed
    # A second cancel: it has finished (canceled).
    again = stores.requests.cancel(rid, account_id=account, message=BY_CUSTOMER)
    assert again == StateChange(found="canceled", changed=False)
    assert _events(stores, rid) == [("queued", "queued", 0), ("canceled", "canceled", 0)]
    (canceled,) = [e for e in stores.requests.events(rid) if e.event == "canceled"]
    assert canceled.message == BY_CUSTOMER and canceled.request_id == rid
    assert stores.queue.depth()["canceled"] == 1


def test_another_accounts_request_and_an_unknown_one_look_the_same(stores: Service) -> None:
    mine, theirs = _account(stores, "a"), _account(stores, "b")
    (rid,) = _enqueue(stores, theirs)
    nothing = StateChange(found=None, changed=False)
    assert stores.requests.cancel(rid, account_id=mine, message=BY_CUSTOMER) == nothing
    assert stores.requests.cancel(10**9, account_id=mine, message=BY_CUSTOMER) == nothing
    assert stores.requests.retry(rid, account_id=mine) == nothing
    assert stores.requests.retry(10**9, account_id=None) == nothing
    row = stores.requests.get(rid)
    assert row is not None and row.state == "queued"  # untouched
    assert stores.requests.events(10**9) == []
    # The operator (no account) reaches every account's request.
    operator = stores.requests.cancel(rid, account_id=None, message=records.CANCELED_BY_OPERATOR)
    assert operator.changed
    assert stores.requests.get(rid).message == records.CANCELED_BY_OPERATOR  # type: ignore[union-attr]


def test_finished_requests_are_not_canceled(stores: Service) -> None:
    account = _account(stores)
    ok, bad = _enqueue(stores, account, 2)
    assert stores.queue.claim("w", 30) is not None and stores.queue.claim("w", 30) is not None
    _succeed(stores, ok, "w")
    _fail(stores, bad, "w")
    for rid, state in ((ok, "succeeded"), (bad, "failed")):
        change = stores.requests.cancel(rid, account_id=account, message=BY_CUSTOMER)
        assert change == StateChange(found=state, changed=False)
        assert stores.requests.get(rid).state == state  # type: ignore[union-attr]


def test_a_running_request_is_canceled_and_its_worker_can_write_nothing(stores: Service) -> None:
    account = _account(stores)
    (rid,) = _enqueue(stores, account)
    assert stores.queue.claim("w", 30) is not None
    ledger = stores.ledger(rid, "w", empty=True)
    ledger.begin(MultipartCheckpoint("up-1", 5, 15, 99, True, {1: PartRecord("e1", "c1", 5)}))
    change = stores.requests.cancel(rid, account_id=account, message=BY_CUSTOMER)
    assert change == StateChange(found="running", changed=True)
    row = stores.requests.get(rid)
    assert row is not None and row.state == "canceled"
    # The checkpoint went to the orphans in the same write: its upload id is not lost.
    (orphan,) = stores.orphans.list()
    assert (orphan.request_id, orphan.upload_id, orphan.key) == (rid, "up-1", "out/0.mp4")
    assert stores.orphans.list(request_id=rid) == [orphan]
    assert stores.orphans.list(request_id=rid + 1) == []
    # Due when the lease runs out: no reaper aborts it under the worker's parts in flight;
    # the worker takes it by its id as soon as they are done.
    assert orphan.next_at > utcnow() + timedelta(seconds=20)
    assert stores.orphans.claim(60) is None
    assert stores.orphans.claim(60, orphan_id=orphan.id) is not None
    assert stores.ledger(rid, "w").load() is None
    # The worker finds its lease gone at every write, and its final S3 call is refused.
    for write in (
        lambda: stores.queue.heartbeat(rid, "w", 30, bytes_done=5, bytes_total=15),
        lambda: ledger.part_done(2, PartRecord("e2", "c2", 5)),
        ledger.confirm,
        ledger.clear,
        ledger.give_up,
        lambda: _succeed(stores, rid, "w"),
        lambda: _fail(stores, rid, "w"),
        lambda: stores.queue.release(rid, "w"),
    ):
        with pytest.raises(LeaseLost):
            write()
    row = stores.requests.get(rid)
    assert row is not None and (row.state, row.bytes_done) == ("canceled", 0)
    assert stores.orphans.count() == 1 and stores.queue.claim("w2", 30) is None


def test_a_request_in_its_final_s3_call_is_not_canceled(stores: Service) -> None:
    account = _account(stores)
    (rid,) = _enqueue(stores, account)
    assert stores.queue.claim("w", 30) is not None
    ledger = stores.ledger(rid, "w", empty=True)
    ledger.confirm()  # PutObject or CompleteMultipartUpload goes next
    assert stores.requests.get(rid).message == records.FINISHING_MESSAGE  # type: ignore[union-attr]
    change = stores.requests.cancel(rid, account_id=account, message=BY_CUSTOMER)
    assert change == StateChange(found="running", changed=False, finishing=True)
    _succeed(stores, rid, "w")  # the worker's outcome stands
    assert stores.requests.get(rid).state == "succeeded"  # type: ignore[union-attr]

    # A worker that died in its final call: once its lease has run out, it can be canceled.
    (dead,) = _enqueue(stores, account)
    assert stores.queue.claim("w", 0.2) is not None
    stores.ledger(dead, "w", empty=True).confirm()
    for _ in range(200):
        change = stores.requests.cancel(dead, account_id=account, message=BY_CUSTOMER)
        if not change.finishing:
            break
        time.sleep(0.01)
    assert change == StateChange(found="running", changed=True)


def test_a_retrying_request_is_canceled_with_its_checkpoint_to_the_reaper(
    stores: Service,
) -> None:
    account = _account(stores)
    (rid,) = _enqueue(stores, account)
    assert stores.queue.claim("w", 30) is not None
    stores.ledger(rid, "w", empty=True).begin(MultipartCheckpoint("up-kept", 5, 15, 99, True))
    stores.queue.retry_later(rid, "w", delay=0, cause="S3 said SlowDown", max_attempts=5,
                             http_status=503, code="SlowDown")  # fmt: skip
    change = stores.requests.cancel(rid, account_id=account, message=BY_CUSTOMER)
    assert change == StateChange(found="retrying", changed=True)
    assert stores.queue.claim("w", 30) is None  # due, but canceled
    (kept,) = stores.orphans.list()
    assert kept.upload_id == "up-kept"
    claimed = stores.orphans.claim(60)  # nobody sends its parts: due at once
    assert claimed is not None and claimed.id == kept.id
    assert _events(stores, rid) == [
        ("queued", "queued", 0),
        ("retrying", "retrying", 1),
        ("canceled", "canceled", 1),
    ]
    row = stores.requests.get(rid)
    assert row is not None and (row.error_code, row.http_status) == (None, 0)


def test_retry_queues_a_failed_request_again_from_scratch(stores: Service) -> None:
    account = _account(stores)
    (rid,) = _enqueue(stores, account, callback="http://127.0.0.1:9/hook")
    stores.queue.claim("w1", -1)  # dies: its lease runs out at once
    assert stores.queue.claim("w2", 30).lease_expiries == 1  # type: ignore[union-attr]
    _fail(stores, rid, "w2", has_callback=True)
    first = stores.queue.claim_callback(30)
    assert first is not None
    stores.queue.record_callback(rid, msg_id=first.msg_id, at=utcnow(), ok=True,
                                 http_status=204, error=None, duration=0.1,
                                 next_delay=None)  # fmt: skip
    change = stores.requests.retry(rid, account_id=account)
    assert change == StateChange(found="failed", changed=True)
    shown = records.render(stores.requests.get(rid))
    assert (shown["state"], shown["message"], shown["attempts"]) == ("queued", "Queued", 0)
    assert (shown["status"], shown["error_code"], shown["bytes_done"]) == (0, None, 0)
    assert (shown["callback_state"], shown["callback_attempts"]) == ("none", 0)
    assert stores.queue.claim_callback(30) is None  # the next one comes when it finishes
    assert stores.queue.has_work()
    claimed = stores.queue.claim("w3", 30)  # due now
    assert claimed is not None and claimed.id == rid
    assert (claimed.attempts, claimed.lease_expiries) == (1, 0)
    _succeed(stores, rid, "w3", has_callback=True)
    second = stores.queue.claim_callback(30)
    assert second is not None and second.msg_id != first.msg_id  # not deduplicated away
    assert _events(stores, rid) == [
        ("queued", "queued", 0),
        ("failed", "failed", 2),
        ("retried", "queued", 0),
        ("succeeded", "succeeded", 1),
    ]
    failed = stores.requests.events(rid)[1]
    assert (failed.error_code, failed.message) == ("NoSuchBucket", "Upload failed: no bucket")
    # The history keeps the callback attempts too.
    assert len(stores.queue.callback_attempts(rid)) == 1


def test_retry_of_a_canceled_request_and_refusals(stores: Service) -> None:
    account = _account(stores)
    queued, running, done, canceled = _enqueue(stores, account, 4)
    assert stores.queue.claim("w", 30).id == queued  # type: ignore[union-attr]
    stores.queue.release(queued, "w")
    for _ in range(3):
        assert stores.queue.claim("w", 30) is not None
    _succeed(stores, done, "w")
    stores.requests.cancel(canceled, account_id=account, message=BY_CUSTOMER)
    for rid, state in ((queued, "running"), (running, "running"), (done, "succeeded")):
        assert stores.requests.retry(rid, account_id=account) == StateChange(state, False)
    assert stores.requests.retry(canceled, account_id=account) == StateChange("canceled", True)
    row = stores.requests.get(canceled)
    assert row is not None and (row.state, row.attempts) == ("queued", 0)
    assert stores.requests.retry(canceled, account_id=account) == StateChange("queued", False)
    assert [e[0] for e in _events(stores, canceled)] == ["queued", "canceled", "retried"]


def test_cancel_and_a_finishing_worker_race_and_exactly_one_wins(stores: Service) -> None:
    """The worker's success and the customer's cancel at the same moment, many times over:
    each request ends succeeded (the cancel was refused) or canceled (the worker's write
    raised LeaseLost), never both or neither."""
    account = _account(stores)
    ids = _enqueue(stores, account, 12)
    for _ in ids:
        assert stores.queue.claim("w", 30) is not None
    outcomes: dict[int, tuple[bool, StateChange]] = {}

    def race(rid: int) -> None:
        start = threading.Barrier(2)
        won: list[bool] = []

        def finish() -> None:
            start.wait()
            try:
                _succeed(stores, rid, "w")
                won.append(True)
            except LeaseLost:
                won.append(False)

        worker = threading.Thread(target=finish)
        worker.start()
        start.wait()
        change = stores.requests.cancel(rid, account_id=account, message=BY_CUSTOMER)
        worker.join(30)
        outcomes[rid] = (won[0], change)

    for rid in ids:
        race(rid)
    for rid, (succeeded, change) in outcomes.items():
        state = stores.requests.get(rid).state  # type: ignore[union-attr]
        assert succeeded != change.changed, (rid, succeeded, change)
        assert state == ("succeeded" if succeeded else "canceled")
        if succeeded:
            assert change == StateChange(found="succeeded", changed=False)
