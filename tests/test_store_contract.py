"""One contract for every store (core.ports): the same tests run on the in-memory stores
(vodpush.memory), SQLite and PostgreSQL (which must be there under CI=true). A store that
passes here can stand in for another; the runner's tests (test_runner.py) rely on that."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from vodpush.config import Settings
from vodpush.core import clock, records
from vodpush.core.accounts import AccountError, S3Settings
from vodpush.core.checkpoint import MultipartCheckpoint, PartRecord
from vodpush.core.clock import utcnow
from vodpush.core.requests import LeaseLost, NewRequest
from vodpush.crypto import generate_key
from vodpush.service import Service

# "!" is in no key, token or hex alphabet: the secret cannot appear in repr by chance.
S3_SECRET = "s3-secret!value"


@pytest.fixture(params=["memory", "sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def stores(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Service]:
    """A Service on one kind of store, fresh and empty."""
    url = f"sqlite:///{tmp_path / 'unused.db'}"  # the in-memory stores open no database
    if request.param != "memory":
        url = request.getfixturevalue("pg_url" if request.param == "postgresql" else "sqlite_url")
    settings = Settings(
        database_url=url,
        sestore_root=tmp_path,
        secret_key=generate_key(),
        secret_key_file=tmp_path / "unused.key",
    )
    service = Service.in_memory(settings) if request.param == "memory" else Service.open(settings)
    yield service
    service.close()


def _account(s: Service, username: str = "jb") -> int:
    return int(s.accounts.create(cdn=158, username=username)["id"])


def _enqueue(s: Service, account_id: int, n: int = 1, *, callback: str = "") -> list[int]:
    ids = []
    for _ in range(n):
        new = NewRequest(
            account_id=account_id,
            cdn_id=158,
            path=f"sestore1/jb/{len(ids)}.mp4",
            destination_path=f"out/{len(ids)}.mp4",
            bucket="b",
            acl="private",
            metadata={"title": "café"},
            callback=callback,
            signature=f"sig-{account_id}-{utcnow().isoformat()}-{len(ids)}",
        )
        ids.append(s.requests.enqueue(new).id)
    return ids


def _succeed(s: Service, rid: int, owner: str, *, has_callback: bool = False) -> None:
    s.queue.succeed(
        rid,
        owner,
        results={"ETag": '"x"'},
        http_status=200,
        sha256="ab" * 32,
        size=10,
        has_callback=has_callback,
    )


# -- requests --------------------------------------------------------------------------------


def test_enqueue_once_per_signature_and_account(stores: Service) -> None:
    a, b = _account(stores, "a"), _account(stores, "b")
    new = NewRequest(a, 158, "sestore1/a/x", "x", "b", "private", {}, "", "S" * 44)
    first = stores.requests.enqueue(new)
    again = stores.requests.enqueue(new)
    assert not first.replayed and again.replayed and again.id == first.id
    # The same signature under another account is another request.
    other = stores.requests.enqueue(NewRequest(**{**new.__dict__, "account_id": b}))
    assert not other.replayed and other.id != first.id


def test_list_pages_newest_first_and_never_shows_another_account(stores: Service) -> None:
    a, b = _account(stores, "a"), _account(stores, "b")
    mine = _enqueue(stores, a, 5)
    theirs = _enqueue(stores, b, 2)
    page = stores.requests.list_for_account(a, limit=2, offset=0)
    assert [r.id for r in page] == mine[::-1][:2]
    assert [r.id for r in stores.requests.list_for_account(a, limit=10, offset=4)] == mine[:1]
    assert stores.requests.list_for_account(a, limit=10, offset=0, request_id=theirs[0]) == []
    one = stores.requests.list_for_account(b, limit=10, offset=0, request_id=theirs[0])
    entry = records.render(one[0])
    assert entry["id"] == theirs[0] and entry["state"] == "queued"
    assert entry["message"] == records.QUEUED_MESSAGE and entry["metadata"] == {"title": "café"}
    assert records.render(stores.requests.get(mine[0]))["destination_path"] == "out/0.mp4"
    assert stores.requests.get(10**9) is None


# -- claims and leases -----------------------------------------------------------------------


def test_claim_takes_the_oldest_and_counts_the_attempt(stores: Service) -> None:
    ids = _enqueue(stores, _account(stores), 2)
    first = stores.queue.claim("w1", 30)
    second = stores.queue.claim("w2", 30)
    assert first is not None and second is not None
    assert (first.id, second.id) == (ids[0], ids[1])
    assert first.attempts == 1 and first.metadata == {"title": "café"}
    assert not first.has_checkpoint
    assert stores.queue.claim("w3", 30) is None
    row = stores.requests.get(first.id)
    assert row is not None and row.state == "running" and row.message == records.UPLOADING_MESSAGE
    stores.queue.heartbeat(first.id, "w1", 30, bytes_done=5, bytes_total=10)
    row = stores.requests.get(first.id)
    assert row is not None and (row.bytes_done, row.bytes_total) == (5, 10)
    with pytest.raises(LeaseLost):
        stores.queue.heartbeat(first.id, "w2", 30)


def test_an_expired_lease_is_taken_over_and_every_write_of_the_loser_raises(
    stores: Service,
) -> None:
    (rid,) = _enqueue(stores, _account(stores))
    lost = stores.queue.claim("w1", -1)  # already expired
    taken = stores.queue.claim("w2", 30)
    assert lost is not None and taken is not None and taken.id == rid and taken.attempts == 2
    writes: list[Any] = [
        lambda: stores.queue.heartbeat(rid, "w1", 30),
        lambda: _succeed(stores, rid, "w1"),
        lambda: stores.queue.fail(rid, "w1", message="m", http_status=None, code=None,
                                  has_callback=False),
        lambda: stores.queue.retry_later(rid, "w1", delay=0, cause="m", max_attempts=5,
                                         http_status=None, code=None),
        lambda: stores.queue.release(rid, "w1"),
        lambda: stores.ledger(rid, "w1").begin(MultipartCheckpoint("u", 5, 10, 1, True)),
    ]  # fmt: skip
    for write in writes:
        with pytest.raises(LeaseLost):
            write()
    row = stores.requests.get(rid)
    assert row is not None and row.state == "running" and row.attempts == 2
    stores.queue.heartbeat(rid, "w2", 30)  # the winner's lease is untouched


def test_outcomes(stores: Service) -> None:
    ok, bad = _enqueue(stores, _account(stores), 2)
    assert stores.queue.claim("w", 30) is not None and stores.queue.claim("w", 30) is not None
    _succeed(stores, ok, "w")
    stores.queue.fail(bad, "w", message="Upload failed: no", http_status=403, code="AccessDenied",
                      has_callback=False)  # fmt: skip
    done, failed = records.render(stores.requests.get(ok)), records.render(stores.requests.get(bad))
    assert done["state"] == "succeeded" and done["message"] == records.SUCCESS_MESSAGE
    assert done["results"]["ETag"] == '"x"' and done["status"] == 200
    assert (done["bytes_done"], done["sha256"]) == (10, "ab" * 32)
    assert failed["state"] == "failed" and failed["error_code"] == "AccessDenied"
    assert failed["status"] == 403 and failed["callback_state"] == "none"
    with pytest.raises(LeaseLost):  # finished: no longer leased by anyone
        stores.queue.heartbeat(ok, "w", 30)
    depth = stores.queue.depth()
    assert (depth["succeeded"], depth["failed"], depth["queued"], depth["running"]) == (1, 1, 0, 0)
    assert not stores.queue.has_work()


def test_retry_later_is_due_by_time_and_release_does_not_count(stores: Service) -> None:
    later, now = _enqueue(stores, _account(stores), 2)
    assert stores.queue.claim("w", 30).id == later  # type: ignore[union-attr]
    assert stores.queue.claim("w", 30).id == now  # type: ignore[union-attr]
    at = stores.queue.retry_later(later, "w", delay=3600, cause="S3 said SlowDown",
                                  max_attempts=16, http_status=503, code="SlowDown")  # fmt: skip
    stores.queue.retry_later(now, "w", delay=0, cause="S3 did not answer in time",
                             max_attempts=16, http_status=None, code="RequestTimeout")  # fmt: skip
    row = stores.requests.get(later)
    assert row is not None and row.state == "retrying" and row.error_code == "SlowDown"
    shown = records.render(row)
    assert shown["state"] == "retrying" and shown["next_attempt_at"] == records.format_time(at)
    assert shown["next_attempt_at"] > records.format_time(utcnow() + timedelta(minutes=59))
    # When, which attempt comes next, and what went wrong.
    assert shown["message"] == (
        f"Retrying at {records.format_time(at)} UTC (attempt 2 of 16): S3 said SlowDown"
    )
    assert stores.queue.depth()["retrying"] == 2
    again = stores.queue.claim("w", 30)
    assert again is not None and again.id == now and again.attempts == 2
    assert stores.queue.claim("w", 30) is None  # the other is not due for an hour
    assert stores.queue.has_work()
    stores.queue.release(now, "w")
    row = stores.requests.get(now)
    assert row is not None and row.state == "queued" and row.attempts == 1
    assert row.message == records.QUEUED_MESSAGE
    assert stores.queue.claim("w", 30).attempts == 2  # type: ignore[union-attr]


def test_a_retry_after_a_database_error_does_not_count_the_attempt(stores: Service) -> None:
    (rid,) = _enqueue(stores, _account(stores))
    assert stores.queue.claim("w", 30).attempts == 1  # type: ignore[union-attr]
    stores.queue.retry_later(rid, "w", delay=0, cause="the database was unavailable",
                             max_attempts=5, http_status=None, code="StoreUnavailable",
                             refund_attempt=True)  # fmt: skip
    row = stores.requests.get(rid)
    assert row is not None and (row.state, row.attempts) == ("retrying", 0)
    assert row.error_code == "StoreUnavailable"
    # The next attempt is still the first: the message says so.
    assert "(attempt 1 of 5): the database was unavailable" in row.message
    assert stores.queue.claim("w", 30).attempts == 1  # type: ignore[union-attr]


def test_a_claim_that_takes_over_an_expired_lease_counts_it(stores: Service) -> None:
    (rid,) = _enqueue(stores, _account(stores))
    first = stores.queue.claim("w1", 0.001)
    assert first is not None and first.lease_expiries == 0
    time.sleep(0.01)
    second = stores.queue.claim("w2", 30)  # w1's lease ran out: it died or hung
    assert second is not None and second.id == rid and second.lease_expiries == 1
    stores.queue.release(rid, "w2")  # a graceful release is not an expiry
    third = stores.queue.claim("w3", 30)
    assert third is not None and third.lease_expiries == 1


def test_a_worker_taking_back_its_own_expired_lease_counts_nothing(stores: Service) -> None:
    # Its heartbeats could not reach the database for a while; the upload went on.
    (rid,) = _enqueue(stores, _account(stores))
    assert stores.queue.claim("w1", 0.001).attempts == 1  # type: ignore[union-attr]
    time.sleep(0.01)
    again = stores.queue.claim("w1", 0.001)
    assert again is not None and again.id == rid
    assert (again.attempts, again.lease_expiries) == (1, 0)
    time.sleep(0.01)
    other = stores.queue.claim("w2", 30)  # another worker's takeover does count
    assert other is not None and (other.attempts, other.lease_expiries) == (2, 1)


def test_a_disabled_accounts_requests_and_callbacks_are_held(stores: Service) -> None:
    held, other = _account(stores, "held"), _account(stores, "other")
    (rid,) = _enqueue(stores, held)
    (cb,) = _enqueue(stores, held, callback="http://127.0.0.1:9/cb")
    assert stores.queue.claim("w", 30).id == rid  # type: ignore[union-attr]
    assert stores.queue.claim("w", 30).id == cb  # type: ignore[union-attr]
    _succeed(stores, cb, "w", has_callback=True)
    stores.queue.release(rid, "w")
    stores.accounts.set_enabled(str(held), False)
    assert stores.queue.claim("w", 30) is None and stores.queue.claim_callback(30) is None
    depth = stores.queue.depth()
    assert depth["held_account_disabled"] == 1 and depth["callbacks_held_account_disabled"] == 1
    assert not stores.queue.has_work()
    (mine,) = _enqueue(stores, other)
    assert stores.queue.claim("w", 30).id == mine  # type: ignore[union-attr]
    stores.accounts.set_enabled(str(held), True)
    assert stores.queue.claim("w", 30).id == rid  # type: ignore[union-attr]
    assert stores.queue.claim_callback(30).id == cb  # type: ignore[union-attr]


def test_concurrent_claims_never_hand_one_request_to_two_workers(stores: Service) -> None:
    ids = _enqueue(stores, _account(stores), 12)
    got: list[int] = []
    lock = threading.Lock()

    def work(owner: str) -> None:
        while (claimed := stores.queue.claim(owner, 30)) is not None:
            with lock:
                got.append(claimed.id)

    threads = [threading.Thread(target=work, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(got) == ids


# -- callbacks -------------------------------------------------------------------------------


def test_callbacks_are_due_claimed_and_recorded(stores: Service) -> None:
    (rid,) = _enqueue(stores, _account(stores), callback="http://127.0.0.1:9/cb")
    assert stores.queue.claim_callback(30) is None  # nothing finished yet
    assert stores.queue.claim("w", 30) is not None
    _succeed(stores, rid, "w", has_callback=True)
    assert stores.queue.depth()["callbacks_pending"] == 1 and stores.queue.has_work()
    due = stores.queue.claim_callback(30)
    # The delivery id was fixed when the callback became due (issue 9: no longer None here).
    assert due is not None and (due.id, due.attempts) == (rid, 0)
    assert due.msg_id.startswith("msg_")
    assert due.callback == "http://127.0.0.1:9/cb"
    assert stores.queue.claim_callback(30) is None  # leased to the first deliverer
    state = stores.queue.record_callback(
        rid, msg_id=due.msg_id, at=utcnow(), ok=False, http_status=500, error="HTTP 500",
        duration=0.1, next_delay=0,
    )  # fmt: skip
    assert state == "pending"
    again = stores.queue.claim_callback(30)
    assert again is not None and (again.attempts, again.msg_id) == (1, due.msg_id)
    state = stores.queue.record_callback(
        rid, msg_id=due.msg_id, at=utcnow(), ok=True, http_status=204, error=None,
        duration=0.1, next_delay=None,
    )  # fmt: skip
    assert state == "delivered"
    attempts = stores.queue.callback_attempts(rid)
    assert [(a["ok"], a["http_status"]) for a in attempts] == [(False, 500), (True, 204)]
    entry = records.render(stores.requests.get(rid))
    assert entry["callback_state"] == "delivered" and entry["callback_attempts"] == 2
    assert stores.queue.depth()["callbacks_pending"] == 0 and not stores.queue.has_work()


def _stored_msg_id(s: Service, rid: int) -> str | None:
    """The webhook-id as the store keeps it, read without claiming the callback."""
    if s.engine is None:
        return s.queue._t.requests[rid].callback_msg_id  # type: ignore[attr-defined]
    with s.engine.connect() as conn:
        return conn.execute(
            text("SELECT callback_msg_id FROM upload_requests WHERE id = :rid"), {"rid": rid}
        ).scalar_one()


def _clear_msg_id(s: Service, rid: int) -> None:
    """A callback made due by a version that left the id to the first attempt."""
    if s.engine is None:
        s.queue._t.requests[rid].callback_msg_id = None  # type: ignore[attr-defined]
        return
    with s.engine.begin() as conn:
        conn.execute(
            text("UPDATE upload_requests SET callback_msg_id = NULL WHERE id = :rid"),
            {"rid": rid},
        )


def test_the_callback_id_is_fixed_when_due_and_kept_by_every_claim(stores: Service) -> None:
    account = _account(stores)
    ok_rid, failed_rid, plain_rid = _enqueue(stores, account, 3, callback="http://127.0.0.1:9/cb")
    for _ in range(3):
        assert stores.queue.claim("w", 30) is not None
    assert _stored_msg_id(stores, ok_rid) is None  # not due yet: no id
    _succeed(stores, ok_rid, "w", has_callback=True)
    stores.queue.fail(failed_rid, "w", message="no", http_status=None, code="X", has_callback=True)
    _succeed(stores, plain_rid, "w", has_callback=False)
    fixed = {rid: _stored_msg_id(stores, rid) for rid in (ok_rid, failed_rid)}
    # Set by succeed/fail themselves, before any claim or POST; one id per delivery.
    assert all(m is not None and m.startswith("msg_") for m in fixed.values())
    assert len(set(fixed.values())) == 2 and _stored_msg_id(stores, plain_rid) is None

    # Every claim (each a new worker) and every attempt sees the same id; recording
    # attempts does not change it.
    seen: dict[int, set[str]] = {ok_rid: set(), failed_rid: set()}
    for _ in range(3):
        claimed = [stores.queue.claim_callback(30), stores.queue.claim_callback(30)]
        assert stores.queue.claim_callback(30) is None
        for due in claimed:
            assert due is not None
            seen[due.id].add(due.msg_id)
            state = stores.queue.record_callback(
                due.id, msg_id=due.msg_id, at=utcnow(), ok=False, http_status=500,
                error="HTTP 500", duration=0.1, next_delay=0,
            )  # fmt: skip
            assert state == "pending"
    assert seen == {rid: {m} for rid, m in fixed.items()}
    assert {rid: _stored_msg_id(stores, rid) for rid in fixed} == fixed


def test_a_callback_due_without_an_id_gets_one_at_its_first_claim(stores: Service) -> None:
    (rid,) = _enqueue(stores, _account(stores), callback="http://127.0.0.1:9/cb")
    assert stores.queue.claim("w", 30) is not None
    _succeed(stores, rid, "w", has_callback=True)
    _clear_msg_id(stores, rid)
    first = stores.queue.claim_callback(-1)
    assert first is not None and first.msg_id.startswith("msg_")
    assert _stored_msg_id(stores, rid) == first.msg_id
    second = stores.queue.claim_callback(-1)  # another worker: the first id sticks
    assert second is not None and second.msg_id == first.msg_id


def test_an_attempt_made_after_the_callback_lease_moved_on_is_kept(stores: Service) -> None:
    (rid,) = _enqueue(stores, _account(stores), callback="http://127.0.0.1:9/cb")
    assert stores.queue.claim("w", 30) is not None
    _succeed(stores, rid, "w", has_callback=True)
    slow = stores.queue.claim_callback(-1)  # worker A: its POST outlives the lease
    fast = stores.queue.claim_callback(30)  # worker B takes the callback over
    assert slow is not None and fast is not None and slow.msg_id == fast.msg_id
    state = stores.queue.record_callback(
        rid, msg_id=fast.msg_id, at=utcnow(), ok=True, http_status=204, error=None,
        duration=0.1, next_delay=None,
    )  # fmt: skip
    assert state == "delivered"
    # A's attempt comes in late: the POST was made, so it is recorded; the state it would
    # set is refused (the callback is delivered, not pending).
    with pytest.raises(LeaseLost):
        stores.queue.record_callback(
            rid, msg_id=slow.msg_id, at=utcnow(), ok=False, http_status=None,
            error="timed out", duration=9.0, next_delay=60,
        )  # fmt: skip
    attempts = stores.queue.callback_attempts(rid)
    assert [(a["ok"], a["http_status"], a["error"]) for a in attempts] == [
        (True, 204, None),
        (False, None, "timed out"),
    ]
    entry = records.render(stores.requests.get(rid))
    assert (entry["callback_state"], entry["callback_attempts"]) == ("delivered", 2)
    assert entry["callback_error"] is None
    assert stores.queue.depth()["callbacks_pending"] == 0 and not stores.queue.has_work()


def test_a_permanent_callback_failure_ends_the_schedule(stores: Service) -> None:
    (rid,) = _enqueue(stores, _account(stores), callback="http://127.0.0.1:9/cb")
    assert stores.queue.claim("w", 30) is not None
    stores.queue.fail(rid, "w", message="no", http_status=None, code="X", has_callback=True)
    due = stores.queue.claim_callback(30)
    assert due is not None
    state = stores.queue.record_callback(
        rid, msg_id=due.msg_id, at=utcnow(), ok=False, http_status=None, error="refused address",
        duration=0.0, next_delay=0, permanent=True,
    )  # fmt: skip
    assert state == "failed"
    assert records.render(stores.requests.get(rid))["callback_error"] == "refused address"


# -- the part ledger -------------------------------------------------------------------------


def test_the_ledger_keeps_parts_for_the_next_lease_holder(stores: Service) -> None:
    (rid,) = _enqueue(stores, _account(stores))
    first = stores.queue.claim("w1", -1)
    assert first is not None and not first.has_checkpoint
    ledger = stores.ledger(rid, "w1", empty=True)
    assert ledger.load() is None
    ledger.begin(
        MultipartCheckpoint(
            "up-1", 5, 12, 99, True, {1: PartRecord("e0", "c0", 5)}, ctime_ns=98, inode=7
        )
    )
    ledger.part_done(2, PartRecord("e2", None, 5))
    ledger.part_done(1, PartRecord("e1", "c1", 5))  # a part sent again overwrites
    loaded = ledger.load()
    assert loaded is not None and loaded.upload_id == "up-1" and loaded.mtime_ns == 99
    assert (loaded.ctime_ns, loaded.inode) == (98, 7)  # the file's identity, for a resume
    assert loaded.parts == {1: PartRecord("e1", "c1", 5), 2: PartRecord("e2", None, 5)}

    second = stores.queue.claim("w2", 30)  # the lease of w1 had run out
    assert second is not None and second.id == rid and second.has_checkpoint
    resumed = stores.ledger(rid, "w2", empty=not second.has_checkpoint)
    assert resumed.load() == loaded
    resumed.clear()
    assert resumed.load() is None and stores.ledger(rid, "w2").load() is None
    resumed.begin(MultipartCheckpoint("up-2", 5, 12, 99, True))
    _succeed(stores, rid, "w2")  # the outcome drops the checkpoint with its parts
    assert stores.ledger(rid, "w2").load() is None


def test_a_loser_cannot_touch_the_new_holders_checkpoint(stores: Service) -> None:
    """A worker frozen past its lease and thawed: its part records and checkpoint clears
    are refused (LeaseLost) and the new holder's checkpoint stays as it was."""
    (rid,) = _enqueue(stores, _account(stores))
    assert stores.queue.claim("w1", -1) is not None  # already run out
    loser = stores.ledger(rid, "w1", empty=True)
    loser.begin(MultipartCheckpoint("up-1", 5, 15, 99, True, {1: PartRecord("e1", "c1", 5)}))
    with pytest.raises(LeaseLost):  # still ours, but run out: no final S3 call
        loser.confirm()
    assert stores.queue.claim("w2", 30) is not None
    winner = stores.ledger(rid, "w2")
    winner.part_done(2, PartRecord("e2", "c2", 5))
    before = winner.load()
    for write in (
        lambda: loser.part_done(3, PartRecord("x3", "y3", 5)),
        lambda: loser.part_done(2, PartRecord("x2", "y2", 5)),
        loser.clear,
        loser.confirm,
    ):
        with pytest.raises(LeaseLost):
            write()
    after = winner.load()
    assert after is not None and after == before and after.upload_id == "up-1"
    assert after.parts == {1: PartRecord("e1", "c1", 5), 2: PartRecord("e2", "c2", 5)}
    winner.confirm()  # the holder's lease is live
    winner.clear()
    assert winner.load() is None


def _worker_clock_ahead(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    """Every vodpush module's view of the Python clock runs ``seconds`` ahead."""
    real = clock.utcnow

    def ahead() -> datetime:
        return real() + timedelta(seconds=seconds)

    for name, module in list(sys.modules.items()):
        if name.startswith("vodpush") and getattr(module, "utcnow", None) is real:
            monkeypatch.setattr(module, "utcnow", ahead)


def test_a_worker_clock_ahead_cannot_steal_a_live_lease(
    stores: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Leases run on the store's clock: a worker whose clock is 15 s ahead sees a renewed
    10 s lease as live, as it is."""
    (rid,) = _enqueue(stores, _account(stores))
    assert stores.queue.claim("w1", 10) is not None
    stores.queue.heartbeat(rid, "w1", 10)
    _worker_clock_ahead(monkeypatch, 15)
    assert clock.utcnow() > utcnow() + timedelta(seconds=14)  # the lie is in place
    assert stores.queue.claim("w2", 10) is None
    stores.queue.heartbeat(rid, "w1", 10)  # still w1's, renewed
    stores.ledger(rid, "w1").confirm()
    row = stores.requests.get(rid)
    assert row is not None and row.state == "running" and row.attempts == 1


def test_a_worker_clock_ahead_moves_no_due_time(
    stores: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Due times come from the store's clock: with every caller's clock 15 s ahead, a new
    request is due at once (not 15 s late), a retry comes 30 s after the store's now (not
    45 s), and a callback is due, leased and due again by the store's clock."""
    account = _account(stores)
    _worker_clock_ahead(monkeypatch, 15)
    before = utcnow()  # this module's utcnow is the true clock, as the database's
    (cb,) = _enqueue(stores, account, callback="http://127.0.0.1:9/cb")
    (rid,) = _enqueue(stores, account)
    first, second = stores.queue.claim("w", 30), stores.queue.claim("w", 30)
    assert first is not None and second is not None and (first.id, second.id) == (cb, rid)
    created = stores.requests.get(rid)
    assert created is not None
    assert records.format_time(created.created_at) <= records.format_time(utcnow())

    at = stores.queue.retry_later(rid, "w", delay=30, cause="S3 said SlowDown", max_attempts=3,
                                  http_status=503, code="SlowDown")  # fmt: skip
    after = utcnow()
    assert before + timedelta(seconds=29) <= at <= after + timedelta(seconds=31)
    assert stores.queue.claim("w", 30) is None

    _succeed(stores, cb, "w", has_callback=True)
    due = stores.queue.claim_callback(30)
    assert due is not None and due.id == cb
    assert stores.queue.claim_callback(30) is None  # leased for 30 s of the store's clock
    stores.queue.record_callback(
        cb, msg_id=due.msg_id, at=utcnow(), ok=False, http_status=500, error="HTTP 500",
        duration=0.1, next_delay=10,
    )  # fmt: skip
    assert stores.queue.claim_callback(30) is None  # due in 10 s, not 5 s ago


def test_the_memory_stores_keep_their_own_clock(tmp_path: Path) -> None:
    """The in-memory stores measure every due time and lease on their own clock (as a
    database does), here set five years from the real one and moved by hand."""
    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'unused.db'}",
        sestore_root=tmp_path,
        secret_key=generate_key(),
        secret_key_file=tmp_path / "unused.key",
    )
    now = [datetime(2031, 6, 1, 12, 0, 0)]
    s = Service.in_memory(settings, clock=lambda: now[0])

    def move(seconds: float) -> None:
        now[0] += timedelta(seconds=seconds)

    account = _account(s)
    (cb,) = _enqueue(s, account, callback="http://127.0.0.1:9/cb")
    (rid,) = _enqueue(s, account)
    entry = records.render(s.requests.get(rid))
    assert entry["created"] == "2031-06-01 12:00:00"
    assert s.queue.claim("w", 3600) is not None and s.queue.claim("w", 3600) is not None

    at = s.queue.retry_later(rid, "w", delay=90, cause="could not connect to the S3 endpoint",
                             max_attempts=16, http_status=None,
                             code="EndpointConnectionError")  # fmt: skip
    assert at == datetime(2031, 6, 1, 12, 1, 30)
    entry = records.render(s.requests.get(rid))
    assert (entry["state"], entry["next_attempt_at"]) == ("retrying", "2031-06-01 12:01:30")
    assert entry["message"] == (
        "Retrying at 2031-06-01 12:01:30 UTC (attempt 2 of 16): "
        "could not connect to the S3 endpoint"
    )
    assert entry["error_code"] == "EndpointConnectionError"
    move(89)
    assert s.queue.claim("w", 3600) is None
    move(1)
    again = s.queue.claim("w", 3600)
    assert again is not None and again.id == rid and again.attempts == 2

    _succeed(s, cb, "w", has_callback=True)
    due = s.queue.claim_callback(30)
    assert due is not None and s.queue.claim_callback(30) is None
    move(31)  # the deliverer died: its lease ran out
    due = s.queue.claim_callback(30)
    assert due is not None and due.id == cb
    s.queue.record_callback(
        cb, msg_id=due.msg_id, at=now[0], ok=False, http_status=500, error="HTTP 500",
        duration=0.1, next_delay=600,
    )  # fmt: skip
    move(599)
    assert s.queue.claim_callback(30) is None
    move(1)
    assert s.queue.claim_callback(30) is not None


# -- accounts --------------------------------------------------------------------------------


def test_accounts(stores: Service) -> None:
    creds = stores.accounts.create(
        cdn=158, username="jb", s3=S3Settings(access_key_id="AK", secret_access_key=S3_SECRET)
    )
    account = stores.accounts.by_api_key(creds["api_key"])
    assert account is not None and account.id == creds["id"] and account.enabled
    assert stores.accounts.api_secret(account) == creds["api_secret"]
    assert stores.accounts.webhook_secret(account) == creds["api_secret"]
    assert account.s3.secret_access_key == S3_SECRET and S3_SECRET not in repr(account)
    assert stores.accounts.find("158/jb").id == stores.accounts.find(str(account.id)).id
    assert stores.accounts.by_id(10**6) is None and stores.accounts.by_api_key("nope") is None
    with pytest.raises(AccountError, match="exists"):
        stores.accounts.create(cdn=7, username="jb")
    with pytest.raises(AccountError, match="no such account"):
        stores.accounts.find("158/nobody")
    other = stores.accounts.create(cdn=158, username="other")
    with pytest.raises(AccountError, match="exists"):
        stores.accounts.rename(str(other["id"]), "jb")
    assert stores.accounts.rename(str(other["id"]), "renamed").username == "renamed"
    assert stores.accounts.allow_buckets("158/jb", ["a-*", "b"]).allowed_buckets == ("a-*", "b")
    with pytest.raises(AccountError, match="matches a-"):
        stores.accounts.disallow_buckets("158/jb", ["a-1"])
    assert stores.accounts.disallow_buckets("158/jb", ["b"]).allowed_buckets == ("a-*",)
    rotated = stores.accounts.rotate_webhook_secret("158/jb")
    assert rotated["webhook_secret"].startswith("whsec_")
    account = stores.accounts.find("158/jb")
    assert stores.accounts.webhook_secret(account) == rotated["webhook_secret"]
    new = stores.accounts.rotate_secret("158/jb")["api_secret"]
    assert stores.accounts.api_secret(stores.accounts.find("158/jb")) == new != creds["api_secret"]
    assert not stores.accounts.set_enabled("158/jb", False).enabled
    assert [a.username for a in stores.accounts.list()] == ["jb", "renamed"]
    assert stores.accounts.ensure_unique_usernames() == []


# -- orphaned multipart uploads --------------------------------------------------------------


def _orphan(s: Service, account_id: int, upload_id: str, *, owner: str = "w") -> int:
    """A request that began a multipart upload, then failed without aborting it."""
    (rid,) = _enqueue(s, account_id)
    claimed = s.queue.claim(owner, 30)
    assert claimed is not None and claimed.id == rid
    s.ledger(rid, owner, empty=True).begin(MultipartCheckpoint(upload_id, 5, 12, 99, True))
    s.queue.fail(rid, owner, message="Upload failed: S3 is down", http_status=None,
                 code="EndpointConnectionError", has_callback=False)  # fmt: skip
    return rid


def test_an_outcome_records_an_unaborted_checkpoint_as_an_orphan(stores: Service) -> None:
    account = _account(stores)
    before = utcnow() - timedelta(seconds=5)
    failed = _orphan(stores, account, "up-failed")
    (orphan,) = stores.orphans.list()
    assert (orphan.account_id, orphan.request_id, orphan.bucket, orphan.key) == (
        account, failed, "b", "out/0.mp4",
    )  # fmt: skip
    assert (orphan.upload_id, orphan.attempts, orphan.last_error) == ("up-failed", 0, None)
    assert before < orphan.created_at == orphan.next_at < utcnow() + timedelta(seconds=5)
    row = stores.requests.get(failed)
    assert row is not None and row.state == "failed"
    assert stores.ledger(failed, "w").load() is None  # the checkpoint went with the outcome

    # A single PUT that succeeded after a failed abort of an earlier checkpoint: the same.
    (done,) = _enqueue(stores, account)
    assert stores.queue.claim("w", 30) is not None
    stores.ledger(done, "w", empty=True).begin(MultipartCheckpoint("up-left", 5, 12, 99, True))
    _succeed(stores, done, "w")
    # Without a checkpoint (completed, or aborted and cleared) there is nothing to record.
    (clean,) = _enqueue(stores, account)
    assert stores.queue.claim("w", 30) is not None
    ledger = stores.ledger(clean, "w", empty=True)
    ledger.begin(MultipartCheckpoint("up-aborted", 5, 12, 99, True))
    ledger.clear()
    stores.queue.fail(clean, "w", message="no", http_status=403, code="AccessDenied",
                      has_callback=False)  # fmt: skip
    assert [(o.request_id, o.upload_id) for o in stores.orphans.list()] == [
        (failed, "up-failed"),
        (done, "up-left"),
    ]
    assert stores.orphans.count() == 2


def test_give_up_moves_the_checkpoint_to_the_orphans_at_once(stores: Service) -> None:
    account = _account(stores)
    (rid,) = _enqueue(stores, account)
    assert stores.queue.claim("w", 30) is not None
    ledger = stores.ledger(rid, "w", empty=True)
    ledger.begin(MultipartCheckpoint("up-1", 5, 12, 99, True, {1: PartRecord("e1", None, 5)}))
    ledger.give_up()  # the source changed and S3 refused the abort: start a new upload
    assert ledger.load() is None and stores.ledger(rid, "w").load() is None
    ledger.begin(MultipartCheckpoint("up-2", 5, 12, 100, True))
    ledger.give_up()
    ledger.give_up()  # nothing left to give up: no write, no error
    # The same upload id given up again (a retry that met the same checkpoint) is one row.
    ledger.begin(MultipartCheckpoint("up-1", 5, 12, 99, True))
    stores.queue.fail(rid, "w", message="no", http_status=None, code="X", has_callback=False)
    assert [(o.request_id, o.upload_id) for o in stores.orphans.list()] == [
        (rid, "up-1"),
        (rid, "up-2"),
    ]


def test_only_the_lease_holder_records_an_orphan(stores: Service) -> None:
    (rid,) = _enqueue(stores, _account(stores))
    assert stores.queue.claim("w1", -1) is not None  # already run out
    stores.ledger(rid, "w1", empty=True).begin(MultipartCheckpoint("up-1", 5, 12, 99, True))
    assert stores.queue.claim("w2", 30) is not None  # taken over: the checkpoint is w2's
    for write in (
        stores.ledger(rid, "w1").give_up,
        lambda: stores.queue.fail(rid, "w1", message="m", http_status=None, code=None,
                                  has_callback=False),
        lambda: _succeed(stores, rid, "w1"),
    ):  # fmt: skip
        with pytest.raises(LeaseLost):
            write()
    assert stores.orphans.list() == []  # nothing recorded by the loser, not even rolled in
    loaded = stores.ledger(rid, "w2").load()
    assert loaded is not None and loaded.upload_id == "up-1"  # the holder resumes it


def test_orphans_are_claimed_when_due_and_wait_after_a_failed_abort(stores: Service) -> None:
    account = _account(stores)
    _orphan(stores, account, "up-1")
    _orphan(stores, account, "up-2")
    first = stores.orphans.claim(300)
    second = stores.orphans.claim(300)
    assert first is not None and second is not None
    assert (first.upload_id, first.attempts, second.upload_id) == ("up-1", 1, "up-2")
    assert first.next_at > utcnow() + timedelta(seconds=250)  # leased
    assert stores.orphans.claim(300) is None  # both held
    assert stores.orphans.retry_later(first.id, delay=-1, error="S3 connection error")
    assert stores.orphans.retry_later(second.id, delay=3600, error="S3 error AccessDenied")
    again = stores.orphans.claim(300)
    assert again is not None and (again.id, again.attempts) == (first.id, 2)
    assert again.last_error == "S3 connection error"
    assert stores.orphans.claim(300) is None  # the other waits an hour
    # On demand (vodpush reap): the one named, due or not.
    forced = stores.orphans.claim(300, orphan_id=second.id)
    assert forced is not None and forced.attempts == 2 and forced.last_error.endswith("Denied")  # type: ignore[union-attr]
    assert stores.orphans.aborted(first.id) and not stores.orphans.aborted(first.id)
    assert not stores.orphans.retry_later(first.id, delay=1, error="late")  # confirmed gone
    assert stores.orphans.claim(300, orphan_id=first.id) is None
    assert [o.upload_id for o in stores.orphans.list()] == ["up-2"]
    assert stores.orphans.count() == 1


def test_concurrent_orphan_claims_never_hand_one_to_two_reapers(stores: Service) -> None:
    account = _account(stores)
    for n in range(12):
        _orphan(stores, account, f"up-{n}")
    expected = sorted(o.id for o in stores.orphans.list())
    got: list[int] = []
    lock = threading.Lock()

    def reap() -> None:
        while (orphan := stores.orphans.claim(300)) is not None:
            with lock:
                got.append(orphan.id)

    threads = [threading.Thread(target=reap) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(got) == expected
