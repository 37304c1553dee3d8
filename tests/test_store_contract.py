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
from sqlalchemy import select, text

from vodpush.config import Settings
from vodpush.core import clock, records
from vodpush.core.accounts import AccountError, S3Settings
from vodpush.core.checkpoint import MultipartCheckpoint, PartRecord
from vodpush.core.clock import utcnow
from vodpush.core.filters import RequestFilter
from vodpush.core.requests import (
    IDEMPOTENCY_WINDOW_SECONDS,
    IdempotencyConflict,
    LeaseLost,
    NewRequest,
)
from vodpush.crypto import generate_key
from vodpush.persistence import listing
from vodpush.persistence.models import UploadRequest
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


def test_replayed_finds_the_request_of_a_signature_in_its_account_only(
    stores: Service,
) -> None:
    a, b = _account(stores, "a"), _account(stores, "b")
    new = NewRequest(a, 158, "sestore1/a/x", "x", "b", "private", {}, "", "R" * 44)
    assert stores.requests.replayed(a, "R" * 44) is None
    first = stores.requests.enqueue(new)
    assert stores.requests.replayed(a, "R" * 44) == first.id
    assert stores.requests.replayed(b, "R" * 44) is None
    assert stores.requests.replayed(a, "R" * 43) is None


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


# -- idempotency keys ------------------------------------------------------------------------

DAY = IDEMPOTENCY_WINDOW_SECONDS


def _keyed(account_id: int, key: str | None, digest: str, n: int, **changes: Any) -> NewRequest:
    """The n-th submit (its own signature) of one upload, with idempotency ``key`` and
    fields hash ``digest``."""
    return NewRequest(
        account_id=account_id,
        cdn_id=158,
        path="sestore1/jb/clip.mp4",
        destination_path="out/clip.mp4",
        bucket="b",
        acl="private",
        metadata={},
        callback="",
        signature=f"sig-{account_id}-{key}-{digest}-{n}",
        options={"storage_class": "STANDARD_IA"},
        idempotency_key=key,
        idempotency_hash=digest,
        **changes,
    )


def _age(s: Service, rid: int, seconds: float) -> None:
    """Move request ``rid``'s creation ``seconds`` back, as the store keeps it."""
    if s.engine is None:
        s.queue._t.requests[rid].created_at -= timedelta(seconds=seconds)  # type: ignore[attr-defined]
        return
    table = UploadRequest.__table__
    with s.engine.begin() as conn:
        created = conn.execute(select(table.c.created_at).where(table.c.id == rid)).scalar_one()
        conn.execute(
            table.update()
            .where(table.c.id == rid)
            .values(created_at=created - timedelta(seconds=seconds))
        )


def _count(s: Service, account_id: int) -> int:
    return len(s.requests.list_for_account(account_id, limit=1000, offset=0))


def test_an_idempotency_key_names_one_request_for_its_fields(stores: Service) -> None:
    a, b = _account(stores, "a"), _account(stores, "b")
    first = stores.requests.enqueue(_keyed(a, "order-1", "h1", 1))
    assert not first.replayed
    # Another submit (another signature) with the key and the same fields: the first id.
    again = stores.requests.enqueue(_keyed(a, "order-1", "h1", 2))
    assert (again.id, again.replayed) == (first.id, True)
    # Other fields under the key: refused, nothing queued.
    with pytest.raises(IdempotencyConflict):
        stores.requests.enqueue(_keyed(a, "order-1", "h2", 3))
    assert _count(stores, a) == 1
    # Keys are the account's own; no key is no rule; another key is another request.
    theirs = stores.requests.enqueue(_keyed(b, "order-1", "h2", 1))
    plain = [stores.requests.enqueue(_keyed(a, None, "", n)) for n in (4, 5)]
    other = stores.requests.enqueue(_keyed(a, "order-2", "h1", 6))
    ids = {first.id, theirs.id, other.id, *(p.id for p in plain)}
    assert len(ids) == 5 and not any(p.replayed for p in (theirs, other, *plain))
    # The signature replay rule stands beside it.
    replay = stores.requests.enqueue(_keyed(a, "order-1", "h1", 2))
    assert (replay.id, replay.replayed) == (first.id, True)
    # The options travel to the claim.
    claimed = stores.queue.claim("w", 30)
    assert claimed is not None and claimed.id == first.id
    assert claimed.options == {"storage_class": "STANDARD_IA"}


def test_an_idempotency_key_older_than_the_window_names_a_new_request(stores: Service) -> None:
    a = _account(stores)
    first = stores.requests.enqueue(_keyed(a, "k", "h1", 1)).id
    _age(stores, first, DAY - 60)
    assert stores.requests.enqueue(_keyed(a, "k", "h1", 2)).id == first  # still inside
    with pytest.raises(IdempotencyConflict):
        stores.requests.enqueue(_keyed(a, "k", "h2", 3))
    _age(stores, first, 120)  # now a day and a minute old
    second = stores.requests.enqueue(_keyed(a, "k", "h2", 4))  # even with other fields
    assert not second.replayed and second.id != first
    # The key is the new request's now; the old one keeps no claim to it.
    assert stores.requests.enqueue(_keyed(a, "k", "h2", 5)).id == second.id
    with pytest.raises(IdempotencyConflict):
        stores.requests.enqueue(_keyed(a, "k", "h1", 6))
    assert _count(stores, a) == 2


@pytest.mark.parametrize("expired", [False, True], ids=["fresh", "after-the-window"])
def test_concurrent_submits_with_one_key_queue_one_request(stores: Service, expired: bool) -> None:
    """Eight submits at once (each its own signature), with one key and the same fields:
    one request, whose id all eight get; also when an old request held the key."""
    a = _account(stores)
    old = None
    if expired:
        old = stores.requests.enqueue(_keyed(a, "k", "h0", 0)).id
        _age(stores, old, DAY + 60)
    start = threading.Barrier(8)
    answers: list[Any] = []
    errors: list[BaseException] = []

    def submit(n: int) -> None:
        start.wait()
        try:
            answers.append(stores.requests.enqueue(_keyed(a, "k", "h1", n + 1)))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=submit, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    assert len({answer.id for answer in answers}) == 1 and len(answers) == 8
    assert sum(not answer.replayed for answer in answers) == 1
    assert answers[0].id != old
    assert _count(stores, a) == (2 if expired else 1)


def test_the_memory_store_measures_the_key_window_on_its_own_clock(tmp_path: Path) -> None:
    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'unused.db'}",
        sestore_root=tmp_path,
        secret_key=generate_key(),
        secret_key_file=tmp_path / "unused.key",
    )
    now = [datetime(2031, 6, 1, 12, 0, 0)]
    s = Service.in_memory(settings, clock=lambda: now[0])
    a = _account(s)
    first = s.requests.enqueue(_keyed(a, "k", "h1", 1)).id
    now[0] += timedelta(seconds=DAY - 1)
    assert s.requests.enqueue(_keyed(a, "k", "h1", 2)).id == first
    now[0] += timedelta(seconds=1)  # exactly a day: the key is free
    assert s.requests.enqueue(_keyed(a, "k", "h1", 3)).id != first


# -- aws.status filters -----------------------------------------------------------------------

# Source paths a prefix must tell apart byte for byte: LIKE's wildcards and escape as plain
# characters, case, composed and decomposed accents, the code points around the surrogates
# and the last one (whose successor does not exist).
FILTER_PATHS = (
    "sestore1/jb/a%b.mp4",
    "sestore1/jb/axb.mp4",
    "sestore1/jb/a_b.mp4",
    "sestore1/jb/aXb.mp4",
    "sestore1/jb/a\\b.mp4",
    "sestore1/jb/a\\\\b.mp4",
    "sestore1/jb/A.mp4",
    "sestore1/jb/a.mp4",
    "sestore1/jb/a",
    "sestore1/jb/é.mp4",
    "sestore1/jb/e\u0301.mp4",
    "sestore1/jb/É.mp4",
    "sestore1/jb/\ud7ff.mp4",
    "sestore1/jb/\ue000.mp4",
    "sestore1/jb/\U0010ffff",
    "sestore1/jb/\U0010ffff\U0010ffff.mp4",
    "sestore1/jb/[x]*?.mp4",
    "sestore1/jbx/other.mp4",
)
EXTRA_PREFIXES = ("%", "_", "\\", "sestore1/jb/%", "sestore1/jb/_", "sestore1/jb/*", "s%")


def _new(account_id: int, n: int, path: str, bucket: str) -> NewRequest:
    return NewRequest(
        account_id=account_id,
        cdn_id=158,
        path=path,
        destination_path=f"out/{n}.mp4",
        bucket=bucket,
        acl="private",
        metadata={},
        callback="",
        signature=f"sig-{account_id}-{n}",
    )


def _as_time(value: datetime | str) -> datetime:
    return value if isinstance(value, datetime) else datetime.fromisoformat(value)


@pytest.fixture
def filtered(stores: Service) -> tuple[Service, int, list[Any]]:
    """Two accounts with the same paths and buckets; the first one's requests in every
    state a worker leaves them in. Returns the service, that account, and its rows."""
    a, b = _account(stores, "a"), _account(stores, "b")
    for n, path in enumerate(FILTER_PATHS):
        stores.requests.enqueue(_new(a, n, path, ("b-one", "b-two", "B-one")[n % 3]))
    for n, path in enumerate(FILTER_PATHS[:5]):
        stores.requests.enqueue(_new(b, 100 + n, path, "b-one"))
    # Only a's requests are claimed (b's are held while b is disabled), oldest first.
    stores.accounts.set_enabled(str(b), False)
    for n in range(12):
        claimed = stores.queue.claim("w", 30)
        assert claimed is not None and claimed.account_id == a
        if n % 4 == 0:
            _succeed(stores, claimed.id, "w")
        elif n % 4 == 1:
            stores.queue.fail(claimed.id, "w", message="Upload failed: no", http_status=403,
                              code="AccessDenied", has_callback=False)  # fmt: skip
        elif n % 4 == 2:
            stores.queue.retry_later(claimed.id, "w", delay=3600, cause="SlowDown",
                                     max_attempts=5, http_status=503, code="SlowDown")  # fmt: skip
    stores.accounts.set_enabled(str(b), True)
    rows = list(stores.requests.list_for_account(a, limit=1000, offset=0))
    assert {r.state for r in rows} == {"queued", "running", "retrying", "succeeded", "failed"}
    return stores, a, rows


def _listed(s: Service, account_id: int, filters: RequestFilter, **paging: Any) -> list[int]:
    paging.setdefault("limit", 1000)
    paging.setdefault("offset", 0)
    return [r.id for r in s.requests.list_for_account(account_id, filters=filters, **paging)]


def _check(s: Service, account_id: int, rows: list[Any], filters: RequestFilter) -> list[int]:
    """The listing and the count of ``filters`` are what RequestFilter.matches says."""
    expected = [r.id for r in rows if filters.matches(_Row(r))]
    assert _listed(s, account_id, filters) == expected, filters
    assert s.requests.count_for_account(account_id, filters=filters) == len(expected), filters
    return expected


class _Row:
    """A status row with its created time as a datetime (SQLite hands back text)."""

    def __init__(self, row: Any) -> None:
        self.state, self.bucket, self.path = row.state, row.bucket, row.path
        self.created_at = _as_time(row.created_at)


def test_path_prefix_is_an_exact_byte_prefix(filtered) -> None:
    s, a, rows = filtered
    prefixes = set(EXTRA_PREFIXES)
    for path in FILTER_PATHS:
        prefixes.update(path[:k] for k in range(len("sestore1/j"), len(path) + 2))
    for prefix in sorted(prefixes):
        expected = _check(s, a, rows, RequestFilter(path_prefix=prefix))
        assert expected == [r.id for r in rows if r.path.startswith(prefix)]
    # Wildcards are characters: "a%" is not "a" followed by anything.
    (percent,) = _check(s, a, rows, RequestFilter(path_prefix="sestore1/jb/a%"))
    assert s.requests.get(percent).path == "sestore1/jb/a%b.mp4"  # type: ignore[union-attr]
    assert len(_check(s, a, rows, RequestFilter(path_prefix="sestore1/jb/a_"))) == 1
    assert len(_check(s, a, rows, RequestFilter(path_prefix="sestore1/jb/a\\"))) == 2
    assert len(_check(s, a, rows, RequestFilter(path_prefix="sestore1/jb/A"))) == 1
    assert len(_check(s, a, rows, RequestFilter(path_prefix="sestore1/jb/\U0010ffff"))) == 2
    assert _check(s, a, rows, RequestFilter(path_prefix="%")) == []


def test_states_buckets_and_times_filter_alike_and_combine(filtered) -> None:
    s, a, rows = filtered
    states = ("queued", "running", "retrying", "succeeded", "failed", "canceled")
    for k in range(1, 4):
        for i in range(len(states) - k + 1):
            _check(s, a, rows, RequestFilter(states=tuple(sorted(states[i : i + k]))))
    assert _check(s, a, rows, RequestFilter(states=("canceled",))) == []
    for bucket in ("b-one", "B-one", "b-two", "b-on", "nope"):
        _check(s, a, rows, RequestFilter(bucket=bucket))
    times = sorted({_as_time(r.created_at) for r in rows})
    tick = timedelta(microseconds=1)
    for at in (times[0], times[len(times) // 2], times[-1]):
        for edge in (at - tick, at, at + tick):
            _check(s, a, rows, RequestFilter(created_from=edge))
            _check(s, a, rows, RequestFilter(created_before=edge))
    middle = times[len(times) // 2]
    # Inclusive from, exclusive before: [t, t + 1 us) is the requests created at t exactly.
    exactly = _check(s, a, rows, RequestFilter(created_from=middle, created_before=middle + tick))
    assert exactly and all(_as_time(s.requests.get(i).created_at) == middle for i in exactly)  # type: ignore[union-attr]
    found = [
        _check(
            s,
            a,
            rows,
            RequestFilter(
                states=tuple(sorted(pair)),
                created_from=times[1],
                created_before=times[-1],
                bucket=bucket,
                path_prefix="sestore1/jb/a",
            ),
        )
        for pair in (("failed", "queued"), ("retrying", "succeeded"), ("running", "queued"))
        for bucket in ("b-one", "b-two", "B-one")
    ]
    assert sum(map(len, found)) >= 3  # every condition at once, not only empty answers
    assert _check(s, a, rows, RequestFilter()) == [r.id for r in rows]


@pytest.mark.parametrize("probe", [None, 1, 4])
def test_filtered_pages_by_offset_and_by_keyset_and_one_id(filtered, probe, monkeypatch) -> None:
    s, a, rows = filtered
    if probe is not None:
        # The database stores' probes of range filters, as short as a few rows: each way
        # they find a page (the newest requests, from the newest match, every match).
        monkeypatch.setattr(listing, "PROBE_MIN", probe)
        monkeypatch.setattr(listing, "PROBE_PER_ROW", 1)
        monkeypatch.setattr(listing, "PROBE_MAX", probe)
    times = sorted({_as_time(r.created_at) for r in rows})
    for filters in (
        RequestFilter(),
        RequestFilter(states=("failed", "queued", "retrying")),
        RequestFilter(states=("queued",), path_prefix="sestore1/jb/a"),
        RequestFilter(bucket="b-one"),
        RequestFilter(path_prefix="sestore1/jb/a"),
        RequestFilter(path_prefix="sestore1/jb/\U0010ffff"),
        RequestFilter(created_from=times[2], created_before=times[9]),
        RequestFilter(created_before=times[4], path_prefix="sestore1/jb/"),
    ):
        expected = _check(s, a, rows, filters)
        for limit in (1, 2, 5):
            for offset in (0, 1, 3, len(expected)):
                page = _listed(s, a, filters, limit=limit, offset=offset)
                assert page == expected[offset : offset + limit], (filters, limit, offset)
            # Keyset: each page starts below the last id of the one before.
            pages, before = [], None
            while True:
                page = _listed(s, a, filters, limit=limit, before_id=before)
                if not page:
                    break
                pages.extend(page)
                before = page[-1]
            assert pages == expected
        cut = expected[len(expected) // 2] if expected else 1
        below = [i for i in expected if i < cut]
        assert _listed(s, a, filters, before_id=cut) == below
        for rid in (expected[:1] or [rows[0].id]) + [rows[-1].id]:
            one = _listed(s, a, filters, request_id=rid, limit=1, offset=5)
            assert one == ([rid] if rid in expected else [])
            assert s.requests.count_for_account(a, filters=filters, request_id=rid) == len(one)


def test_filters_never_show_another_accounts_requests(filtered) -> None:
    s, _, rows = filtered
    b = int(s.accounts.find("158/b").id)
    theirs = _listed(s, b, RequestFilter(bucket="b-one"))
    assert len(theirs) == 5 and not set(theirs) & {r.id for r in rows}
    assert _listed(s, b, RequestFilter(bucket="b-one"), request_id=rows[0].id) == []
    assert s.requests.count_for_account(b, filters=RequestFilter(path_prefix="s")) == 5
    assert _listed(s, b, RequestFilter(states=("queued",)), before_id=10**9) == theirs


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
    live = stores.queue.depth(live_only=True)  # what /metrics shows: no finished states
    assert {"queued", "retrying", "running", "callbacks_pending"} <= set(live)
    assert not {"succeeded", "failed", "canceled"} & set(live)
    assert stores.queue.oldest_due_seconds() == 0.0  # nothing waits


def test_oldest_due_counts_only_due_waiting_requests(stores: Service) -> None:
    first, later = _enqueue(stores, _account(stores), 2)
    assert stores.queue.claim("w", 30) is not None and stores.queue.claim("w", 30) is not None
    assert stores.queue.oldest_due_seconds() == 0.0  # both running
    stores.queue.retry_later(later, "w", delay=3600, cause="slow", max_attempts=16,
                             http_status=503, code="SlowDown")  # fmt: skip
    assert stores.queue.oldest_due_seconds() == 0.0  # retrying, not due for an hour
    stores.queue.release(first, "w")
    time.sleep(0.05)
    waited = stores.queue.oldest_due_seconds()
    assert 0.0 < waited < 30


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


# -- fairness between accounts ---------------------------------------------------------------


def _claim(s: Service, owner: str = "w", lease: float = 30) -> tuple[int, int]:
    """(account, request) of the next claim, which must find one."""
    claimed = s.queue.claim(owner, lease)
    assert claimed is not None
    return claimed.account_id, claimed.id


def test_one_accounts_backlog_does_not_hold_back_anothers_upload(stores: Service) -> None:
    big, small = _account(stores, "big"), _account(stores, "small")
    backlog = _enqueue(stores, big, 5)
    (late,) = _enqueue(stores, small)  # queued after the whole backlog
    # One upload at a time: each claimed request succeeds before the next claim.
    order = []
    while (claimed := stores.queue.claim("w", 30)) is not None:
        order.append(claimed.id)
        _succeed(stores, claimed.id, "w")
    assert order == [backlog[0], late, *backlog[1:]]


def test_accounts_take_turns_and_the_fewest_in_flight_goes_first(stores: Service) -> None:
    a, b, c = _account(stores, "a"), _account(stores, "b"), _account(stores, "c")
    ids = {account: _enqueue(stores, account, 3) for account in (a, b, c)}
    # Nothing in flight: round-robin, each account's oldest first.
    turns = []
    for _ in range(6):
        account, rid = _claim(stores)
        turns.append(account)
        _succeed(stores, rid, "w")
    assert turns == [a, b, c, a, b, c]
    # Uploads in flight come first: b's extra request goes before a, whose turn it would
    # be, because a has an upload in flight and b none.
    (extra,) = _enqueue(stores, b)
    assert _claim(stores) == (a, ids[a][2])
    assert _claim(stores) == (b, ids[b][2])
    _succeed(stores, ids[b][2], "w")
    assert _claim(stores) == (c, ids[c][2])
    assert _claim(stores) == (b, extra)
    assert stores.queue.claim("w", 30) is None


def test_an_accounts_limit_holds_its_work_and_not_the_others(stores: Service) -> None:
    limited, other = _account(stores, "limited"), _account(stores, "other")
    assert stores.accounts.find(str(limited)).max_in_flight is None
    record = stores.accounts.set_max_in_flight(str(limited), 2)
    assert record.max_in_flight == 2 and record.public()["max_in_flight"] == 2
    mine = _enqueue(stores, limited, 4)
    theirs = _enqueue(stores, other, 3)
    claims = [_claim(stores) for _ in range(5)]
    assert sorted(claims) == sorted(
        [(limited, mine[0]), (limited, mine[1]), *((other, rid) for rid in theirs)]
    )
    assert stores.queue.claim("w", 30) is None  # two in flight: the rest of it waits
    assert stores.queue.has_work()
    _succeed(stores, mine[0], "w")
    assert _claim(stores) == (limited, mine[2])  # a slot freed: the next one goes
    assert stores.queue.claim("w", 30) is None
    # A raised limit lets the rest go at the next claim; none takes every limit away.
    assert stores.accounts.set_max_in_flight("158/limited", 3).max_in_flight == 3
    assert _claim(stores) == (limited, mine[3])
    assert stores.accounts.set_max_in_flight(str(limited), None).max_in_flight is None
    assert stores.accounts.find(str(limited)).public()["max_in_flight"] is None


def test_a_lease_that_ran_out_is_not_in_flight_and_its_takeover_is(stores: Service) -> None:
    account = _account(stores)
    stores.accounts.set_max_in_flight(str(account), 1)
    first, second = _enqueue(stores, account, 2)
    assert _claim(stores, "w1", 0.001) == (account, first)
    time.sleep(0.01)  # w1 died: its upload is no longer in flight, and runnable again
    assert _claim(stores, "w2") == (account, first)  # the oldest runnable: taken over
    assert stores.queue.claim("w3", 30) is None  # and in flight again: the limit holds
    _succeed(stores, first, "w2")
    assert _claim(stores, "w3") == (account, second)


def test_a_limit_below_one_is_refused(stores: Service) -> None:
    account = str(_account(stores))
    for bad in (0, -1):
        with pytest.raises(AccountError, match="at least 1"):
            stores.accounts.set_max_in_flight(account, bad)
    with pytest.raises(AccountError, match="at most"):
        stores.accounts.set_max_in_flight(account, 10**9)
    with pytest.raises(AccountError, match="whole number"):
        stores.accounts.set_max_in_flight(account, True)  # type: ignore[arg-type]
    with pytest.raises(AccountError, match="no such account"):
        stores.accounts.set_max_in_flight("158/nobody", 3)
    assert stores.accounts.find(account).max_in_flight is None


def test_concurrent_claims_keep_every_accounts_limit(stores: Service) -> None:
    limited, other = _account(stores, "limited"), _account(stores, "other")
    stores.accounts.set_max_in_flight(str(limited), 3)
    mine, theirs = _enqueue(stores, limited, 15), _enqueue(stores, other, 15)
    got: list[tuple[int, int]] = []
    lock = threading.Lock()

    def work(owner: str) -> None:
        while (claimed := stores.queue.claim(owner, 30)) is not None:
            with lock:
                got.append((claimed.account_id, claimed.id))

    threads = [threading.Thread(target=work, args=(f"w{i}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(rid for account, rid in got if account == other) == theirs
    assert sorted(rid for account, rid in got if account == limited) == mine[:3]


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
            rid,
            msg_id=slow.msg_id,
            at=utcnow(),
            ok=False,
            http_status=None,
            error="timed out",
            duration=9.0,
            next_delay=60,
        )
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


# -- the callback's history and redelivery (aws.callbacks, aws.redeliver) --------------------

HOUR = 3600.0


def _delivered(s: Service, account_id: int, *, codes: tuple[int, ...] = (204,)) -> tuple[int, str]:
    """A request that succeeded and whose callback was POSTed once per code (the last one
    2xx: delivered); its id and webhook-id."""
    (rid,) = _enqueue(s, account_id, callback="http://127.0.0.1:9/cb")
    assert s.queue.claim("w", 30) is not None
    _succeed(s, rid, "w", has_callback=True)
    msg_id = ""
    for code in codes:
        due = s.queue.claim_callback(30)
        assert due is not None and due.id == rid
        msg_id = due.msg_id
        s.queue.record_callback(
            rid, msg_id=due.msg_id, at=utcnow(), ok=code < 300, http_status=code,
            error=None if code < 300 else f"HTTP {code}", duration=0.25, next_delay=0,
        )  # fmt: skip
    return rid, msg_id


def _redeliver(s: Service, account_id: int, rid: int, msg_id: str, **kwargs: Any) -> Any:
    return s.requests.redeliver_callback(
        account_id, rid, msg_id=msg_id, limit=kwargs.get("limit", 5),
        window=kwargs.get("window", HOUR),
    )  # fmt: skip


def test_the_callback_history_is_newest_first_bounded_and_only_the_owners(
    stores: Service,
) -> None:
    mine, theirs = _account(stores, "a"), _account(stores, "b")
    rid, msg_id = _delivered(stores, mine, codes=(500, 502, 204))
    history = stores.requests.callback_history(mine, rid, limit=100)
    assert history is not None
    assert (history.id, history.state, history.callback) == (
        rid,
        "succeeded",
        "http://127.0.0.1:9/cb",
    )
    assert (history.callback_state, history.callback_attempts, history.total) == ("delivered", 3, 3)
    assert (history.msg_id, history.last_error, history.next_at) == (msg_id, None, None)
    assert (history.redeliveries, history.last_redelivered) == (0, None)
    assert [(a.ok, a.http_status, a.error) for a in history.attempts] == [
        (True, 204, None),
        (False, 502, "HTTP 502"),
        (False, 500, "HTTP 500"),
    ]
    assert history.attempts[0].duration == 0.25
    entry = records.format_time(history.attempts[0].at)
    assert len(entry) == 19 and entry.startswith(str(utcnow().year))
    # Bounded: the newest, with the total of all.
    newest = stores.requests.callback_history(mine, rid, limit=2)
    assert newest is not None and newest.total == 3
    assert [a.http_status for a in newest.attempts] == [204, 502]
    # Another account's request is not there, exactly like one that does not exist.
    assert stores.requests.callback_history(theirs, rid, limit=100) is None
    assert stores.requests.callback_history(mine, 10**9, limit=100) is None
    # A request without a callback has an empty history.
    (plain,) = _enqueue(stores, mine)
    empty = stores.requests.callback_history(mine, plain, limit=100)
    assert empty is not None and (empty.callback_state, empty.total, empty.attempts) == (
        "none",
        0,
        (),
    )


def test_a_redelivery_is_a_new_delivery_due_now_with_the_history_kept(stores: Service) -> None:
    account = _account(stores)
    rid, first_id = _delivered(stores, account, codes=(500, 204))
    done = _redeliver(stores, account, rid, "msg_again")
    assert (done.outcome, done.callback_state, done.msg_id) == ("queued", "pending", "msg_again")
    assert done.at is not None
    history = stores.requests.callback_history(account, rid, limit=100)
    assert history is not None
    assert (history.callback_state, history.callback_attempts, history.msg_id) == (
        "pending",
        0,
        "msg_again",
    )
    assert history.next_at is not None and history.total == 2
    assert history.redeliveries == 1 and history.last_redelivered is not None
    # Due at once, for any deliverer, under its new id and a fresh schedule.
    due = stores.queue.claim_callback(30)
    assert due is not None and (due.id, due.attempts, due.msg_id) == (rid, 0, "msg_again")
    state = stores.queue.record_callback(
        rid, msg_id="msg_again", at=utcnow(), ok=True, http_status=200, error=None,
        duration=0.1, next_delay=None,
    )  # fmt: skip
    assert state == "delivered"
    after = stores.requests.callback_history(account, rid, limit=100)
    assert after is not None and (after.callback_attempts, after.total) == (1, 3)
    assert [a.http_status for a in after.attempts] == [200, 204, 500]
    assert first_id != "msg_again"
    # The same redelivery again (its webhook-id is the current one) changes nothing.
    again = _redeliver(stores, account, rid, "msg_again")
    assert (again.outcome, again.callback_state, again.msg_id) == (
        "replayed",
        "delivered",
        "msg_again",
    )
    still = stores.requests.callback_history(account, rid, limit=100)
    assert still is not None and (still.redeliveries, still.callback_state) == (1, "delivered")
    assert stores.queue.claim_callback(30) is None


def test_a_redelivery_is_refused_unless_finished_with_a_callback_and_none_pending(
    stores: Service,
) -> None:
    mine, theirs = _account(stores, "a"), _account(stores, "b")
    rid, _ = _delivered(stores, mine)
    assert _redeliver(stores, theirs, rid, "msg_x").outcome == "not_found"
    assert _redeliver(stores, mine, 10**9, "msg_x").outcome == "not_found"
    running, waiting = _enqueue(stores, mine, 2, callback="http://127.0.0.1:9/cb")
    assert stores.queue.claim("w", 30).id == running  # type: ignore[union-attr]
    refused = _redeliver(stores, mine, running, "msg_x")
    assert (refused.outcome, refused.state) == ("not_finished", "running")
    refused = _redeliver(stores, mine, waiting, "msg_x")
    assert (refused.outcome, refused.state) == ("not_finished", "queued")
    (plain,) = _enqueue(stores, mine)
    assert stores.queue.claim("w", 30).id == waiting  # type: ignore[union-attr]
    assert stores.queue.claim("w", 30).id == plain  # type: ignore[union-attr]
    _succeed(stores, plain, "w")
    assert _redeliver(stores, mine, plain, "msg_x").outcome == "no_callback"
    # Finished, its first delivery still pending: refused, with when it is next tried.
    stores.queue.fail(running, "w", message="no", http_status=None, code="X", has_callback=True)
    pending = _redeliver(stores, mine, running, "msg_x")
    assert (pending.outcome, pending.callback_state) == ("pending", "pending")
    assert pending.at is not None
    # A callback whose schedule was used up (failed) may be sent again, here that of a
    # failed request.
    due = stores.queue.claim_callback(30)
    assert due is not None and due.id == running
    stores.queue.record_callback(
        running, msg_id=due.msg_id, at=utcnow(), ok=False, http_status=None, error="refused",
        duration=0.0, next_delay=None,
    )  # fmt: skip
    assert _redeliver(stores, mine, running, "msg_x").outcome == "queued"
    # None of the refusals changed anything.
    history = stores.requests.callback_history(mine, rid, limit=100)
    assert history is not None and (history.callback_state, history.redeliveries) == (
        "delivered",
        0,
    )
    assert stores.requests.get(waiting).callback_state == "none"  # type: ignore[union-attr]


def _cancel(s: Service, rid: int) -> None:
    """A request stopped before it ran, as aws.cancel leaves it (no callback made due)."""
    if s.engine is None:
        s.queue._t.requests[rid].state = "canceled"  # type: ignore[attr-defined]
        return
    with s.engine.begin() as conn:
        conn.execute(
            text("UPDATE upload_requests SET state = 'canceled' WHERE id = :rid"), {"rid": rid}
        )


def test_the_callback_of_a_canceled_request_may_be_sent(stores: Service) -> None:
    account = _account(stores)
    (rid,) = _enqueue(stores, account, callback="http://127.0.0.1:9/cb")
    _cancel(stores, rid)
    done = _redeliver(stores, account, rid, "msg_canceled")
    assert (done.outcome, done.state, done.callback_state) == ("queued", "canceled", "pending")
    due = stores.queue.claim_callback(30)
    assert due is not None and (due.id, due.msg_id) == (rid, "msg_canceled")


def test_redeliveries_are_limited_within_the_window(stores: Service) -> None:
    account = _account(stores)
    rid, _ = _delivered(stores, account)
    for n in range(2):
        assert _redeliver(stores, account, rid, f"msg_{n}", limit=2).outcome == "queued"
        due = stores.queue.claim_callback(30)
        assert due is not None
        stores.queue.record_callback(
            rid, msg_id=due.msg_id, at=utcnow(), ok=True, http_status=204, error=None,
            duration=0.1, next_delay=None,
        )  # fmt: skip
    refused = _redeliver(stores, account, rid, "msg_2", limit=2)
    assert (refused.outcome, refused.redeliveries, refused.msg_id) == ("too_many", 2, "msg_1")
    history = stores.requests.callback_history(account, rid, limit=100)
    assert history is not None and history.last_redelivered is not None
    # Allowed again when the first of them leaves the window: an hour after it.
    first = history.last_redelivered  # the second; the first is a little earlier
    assert refused.at is not None
    later = _as_datetime(refused.at) - _as_datetime(first)
    assert timedelta(minutes=59) < later <= timedelta(hours=1)
    assert 3500 < refused.retry_after <= HOUR
    # With a window that the earlier ones have left, the next is allowed.
    assert _redeliver(stores, account, rid, "msg_2", limit=2, window=0.0).outcome == "queued"
    assert _redeliver(stores, account, rid, "msg_3", limit=2).outcome == "pending"


def _as_datetime(value: datetime | str) -> datetime:
    return value if isinstance(value, datetime) else datetime.fromisoformat(value)


def test_a_late_post_of_an_earlier_delivery_cannot_move_a_redelivery(stores: Service) -> None:
    account = _account(stores)
    (rid,) = _enqueue(stores, account, callback="http://127.0.0.1:9/cb")
    assert stores.queue.claim("w", 30) is not None
    _succeed(stores, rid, "w", has_callback=True)
    slow = stores.queue.claim_callback(-1)  # worker A: its POST outlives the lease
    fast = stores.queue.claim_callback(30)  # worker B delivers it
    assert slow is not None and fast is not None
    stores.queue.record_callback(
        rid, msg_id=fast.msg_id, at=utcnow(), ok=True, http_status=204, error=None,
        duration=0.1, next_delay=None,
    )  # fmt: skip
    assert _redeliver(stores, account, rid, "msg_redelivery").outcome == "queued"
    # A's POST (of the first delivery) comes back failed, with a schedule used up: it is in
    # the history, but neither ends the redelivery nor counts in its schedule.
    with pytest.raises(LeaseLost):
        stores.queue.record_callback(
            rid, msg_id=slow.msg_id, at=utcnow(), ok=False, http_status=None,
            error="timed out", duration=9.0, next_delay=None,
        )  # fmt: skip
    history = stores.requests.callback_history(account, rid, limit=100)
    assert history is not None
    assert (history.callback_state, history.callback_attempts, history.total) == ("pending", 0, 2)
    assert history.last_error is None and history.msg_id == "msg_redelivery"
    due = stores.queue.claim_callback(30)
    assert due is not None and (due.msg_id, due.attempts) == ("msg_redelivery", 0)


def test_of_redeliveries_at_the_same_moment_one_is_made(stores: Service) -> None:
    account = _account(stores)
    rid, _ = _delivered(stores, account)
    start = threading.Barrier(6)
    outcomes: list[str] = []

    def ask(n: int) -> None:
        start.wait(10)
        outcomes.append(_redeliver(stores, account, rid, f"msg_{n}").outcome)

    threads = [threading.Thread(target=ask, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(outcomes) == ["pending"] * 5 + ["queued"]
    history = stores.requests.callback_history(account, rid, limit=100)
    assert history is not None and history.redeliveries == 1


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
    # The multipart upload S3 completed into the object is gone at S3: not an orphan.
    (completed,) = _enqueue(stores, account)
    assert stores.queue.claim("w", 30) is not None
    stores.ledger(completed, "w", empty=True).begin(
        MultipartCheckpoint("up-completed", 5, 12, 99, True)
    )
    stores.queue.succeed(completed, "w", results={"ETag": '"x"'}, http_status=200,
                         sha256="ab" * 32, size=10, has_callback=False,
                         completed_upload="up-completed")  # fmt: skip
    assert stores.ledger(completed, "w").load() is None
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
