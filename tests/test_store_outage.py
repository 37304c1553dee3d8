"""A database that does not answer for a while, in the fast tier: which errors count as
passing (StoreUnavailable), on a real SQLite file held locked by another connection; and the
worker runner on the in-memory stores with store calls that fail for a while (a fake store
in front of the real in-memory one, as test_runner.py has a fake transfer step). The real
faults (killed PostgreSQL connections, a PostgreSQL restart, SQLite busy under a worker
process) are in test_db_faults.py. The last tests run the S3 engine on the moto process with
a ledger whose database is away."""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psycopg
import pytest
from psycopg import errors as pg_errors
from sqlalchemy import create_engine
from sqlalchemy import exc as sa_exc

from tests.conftest import LiveServer, MiB, s3_client
from tests.wire import envelope, php_style, post
from vodpush import metrics
from vodpush.api.app import create_app
from vodpush.config import Settings
from vodpush.core.checkpoint import MemoryLedger, MultipartCheckpoint, PartRecord
from vodpush.core.requests import LeaseLost, NewRequest, StoreUnavailable
from vodpush.crypto import generate_key
from vodpush.persistence import db, dialect
from vodpush.persistence.accounts import AccountStore
from vodpush.persistence.queue import QueueStore
from vodpush.persistence.requests import RequestStore
from vodpush.service import Service
from vodpush.transfer import UploadJob, UploadResult, abandon_quietly, upload
from vodpush.worker.outage import FailureLog, persist
from vodpush.worker.runner import Worker

OK = UploadResult(
    results={"ETag": '"e"', "Bucket": "b", "Key": "k"},
    http_status=200,
    sha256="ab" * 32,
    size=10,
    parts_sent=1,
    parts_total=1,
)

# -- which errors pass ---------------------------------------------------------------------


def _wrapped(orig: BaseException, **kw: Any) -> sa_exc.DBAPIError:
    return sa_exc.DBAPIError.instance("SELECT 1", {}, orig, type(orig), **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("error", "passes"),
    [
        (pg_errors.AdminShutdown("terminating connection due to administrator command"), True),
        (pg_errors.CrashShutdown("terminating connection because of crash"), True),
        (pg_errors.CannotConnectNow("the database system is starting up"), True),
        (pg_errors.ConnectionFailure("connection failure"), True),  # class 08
        (pg_errors.SerializationFailure("could not serialize access"), True),
        (pg_errors.DeadlockDetected("deadlock detected"), True),
        (pg_errors.TooManyConnections("too many clients already"), True),
        (psycopg.OperationalError("connection failed: Connection refused"), True),  # no state
        (psycopg.InterfaceError("the connection is closed"), True),
        (pg_errors.UniqueViolation("duplicate key"), False),
        (pg_errors.UndefinedTable("relation does not exist"), False),
        (pg_errors.QueryCanceled("canceling statement due to statement timeout"), False),
        (pg_errors.DiskFull("could not extend file"), False),
        (ValueError("a bug"), False),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else str(v),
)
def test_postgresql_errors_that_pass(error: BaseException, passes: bool) -> None:
    pg = dialect.POSTGRESQL
    assert pg.unavailable(error) is passes
    if isinstance(error, psycopg.Error):
        assert pg.unavailable(_wrapped(error)) is passes  # as SQLAlchemy raises it


def test_sqlalchemy_errors_that_pass() -> None:
    # SQLAlchemy saw the connection die, whatever the driver said.
    odd = _wrapped(pg_errors.InternalError_("?"), connection_invalidated=True)
    assert dialect.POSTGRESQL.unavailable(odd)
    assert dialect.SQLITE.unavailable(sa_exc.TimeoutError("QueuePool limit reached"))
    assert not dialect.SQLITE.unavailable(_wrapped(sqlite3.IntegrityError("UNIQUE failed")))
    assert not dialect.SQLITE.unavailable(_wrapped(sqlite3.OperationalError("no such table: x")))
    assert dialect.SQLITE.unavailable(_wrapped(sqlite3.OperationalError("database is locked")))


def test_the_translation_names_the_cause_for_the_operator() -> None:
    engine = create_engine("postgresql+psycopg://u@127.0.0.1/d")  # never connects
    error = db.unavailable(engine, _wrapped(pg_errors.AdminShutdown("terminating connection")))
    assert isinstance(error, StoreUnavailable)
    assert str(error) == "database unavailable: AdminShutdown: terminating connection"
    assert db.unavailable(engine, _wrapped(pg_errors.UniqueViolation("dup"))) is None


@pytest.fixture
def locked_sqlite(tmp_path: Path) -> Iterator[tuple[Service, Callable[[], Any]]]:
    """A migrated SQLite database whose busy timeout is 0.2 s, and ``lock()``: a context in
    which another connection holds its write lock (BEGIN IMMEDIATE)."""
    url = f"sqlite:///{tmp_path / 'v.db'}?timeout=0.2"
    settings = Settings(
        database_url=url,
        sestore_root=tmp_path,
        secret_key=generate_key(),
        secret_key_file=tmp_path / "k",
    )
    service = Service.open(settings)

    class Lock:
        def __enter__(self) -> None:
            self.conn = sqlite3.connect(tmp_path / "v.db", isolation_level=None)
            self.conn.execute("BEGIN IMMEDIATE")

        def __exit__(self, *exc: object) -> None:
            self.conn.execute("COMMIT")
            self.conn.close()

    yield service, Lock
    service.close()


def test_sqlite_busy_is_store_unavailable_and_passes(
    locked_sqlite: tuple[Service, Callable[[], Any]],
) -> None:
    service, lock = locked_sqlite
    account = service.accounts.create(cdn=1, username="jb")
    rid = service.requests.enqueue(
        NewRequest(account["id"], 1, "sestore1/jb/a", "a", "b", "private", {}, "", "sig")
    ).id
    with lock():
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="database is locked") as raised:
            service.queue.claim("w", 30)
        assert time.monotonic() - started < 5  # the URL's busy timeout, not the default 30 s
        assert isinstance(raised.value.__cause__, sa_exc.OperationalError)
        # Readers are not held up (WAL): aws.status and the worker's reads still work.
        assert service.requests.get(rid) is not None
        assert service.accounts.by_id(account["id"]) is not None
    claimed = service.queue.claim("w", 30)  # the lock is gone: the same call works
    assert claimed is not None and claimed.id == rid
    with lock(), pytest.raises(StoreUnavailable):
        service.ledger(rid, "w").part_done(1, PartRecord(etag='"e"', checksum_sha256=None, size=5))


@pytest.mark.integration
def test_the_api_answers_busy_while_the_database_is_away_and_a_resend_queues_once(
    locked_sqlite: tuple[Service, Callable[[], Any]], caplog: pytest.LogCaptureFixture
) -> None:
    """aws.upload over HTTP while SQLite is locked past its busy timeout: code 1000 with a
    retry_after, no traceback logged; the same signed body sent again afterwards queues the
    file once."""
    service, lock = locked_sqlite
    created = service.accounts.create(cdn=1, username="jb")
    service.accounts.allow_buckets(created["api_key"], ["vod-bucket"])
    (service.settings.sestore_root / "sestore1" / "jb").mkdir(parents=True)
    (service.settings.sestore_root / "sestore1" / "jb" / "a.mp4").write_bytes(b"v")
    creds = SimpleNamespace(cdn=1, **{k: created[k] for k in ("api_key", "api_secret")})
    payload = envelope(creds, "aws.upload", path="sestore1/jb/a.mp4", destination_path="a.mp4",
                       bucket="vod-bucket", acl="private")  # fmt: skip
    body = php_style(payload, created["api_secret"])
    server = LiveServer(create_app(service), service.settings)
    server.start()
    try:
        with lock():
            answer = post(server.url, body).json()
        assert (answer["status"], answer["code"]) == ("failure", "1000"), answer
        assert answer["retry_after"] == 2.0 and "send the same request again" in answer["message"]
        first = post(server.url, body).json()
        again = post(server.url, body).json()
    finally:
        server.stop()
    assert first["status"] == "success" and again["data"] == first["data"]
    assert len(service.requests.list_for_account(created["id"], limit=10, offset=0)) == 1
    assert not [r for r in caplog.records if r.exc_info], "no traceback for an outage"


def test_stores_are_built_on_the_translating_helpers() -> None:
    # Every store call reaches the database through db.read / db.write_transaction /
    # PreparedQuery (which translate); a bare engine.connect() would not.
    import inspect

    for module in (QueueStore, AccountStore, RequestStore):
        source = inspect.getsource(inspect.getmodule(module))  # type: ignore[arg-type]
        assert "engine.connect()" not in source, module


# -- persist and FailureLog ------------------------------------------------------------------


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_persist_retries_with_a_capped_backoff_then_gives_up() -> None:
    t = FakeTime()
    calls = []

    def down() -> None:
        calls.append(t.now)
        raise StoreUnavailable("database unavailable: test")

    with pytest.raises(StoreUnavailable):
        persist("succeed", down, budget=10, sleep=t.sleep, clock=t.clock)
    assert t.slept[:6] == [0.1, 0.2, 0.4, 0.8, 1.6, 2.0]
    assert max(t.slept) == 2.0 and sum(t.slept) == pytest.approx(10)
    assert len(calls) == len(t.slept) + 1


def test_persist_returns_once_the_database_answers_and_never_retries_other_errors() -> None:
    t = FakeTime()
    answers: list[Any] = [StoreUnavailable("x"), StoreUnavailable("x"), "done"]

    def flaky() -> Any:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    assert persist("fail", flaky, budget=10, sleep=t.sleep, clock=t.clock) == "done"
    for error in (LeaseLost("taken over"), ValueError("bug")):

        def broken(error: Exception = error) -> None:
            raise error

        with pytest.raises(type(error)):
            persist("fail", broken, budget=10, sleep=t.sleep, clock=t.clock)
    stop = threading.Event()
    stop.set()
    with pytest.raises(StoreUnavailable):  # give_up: the stop grace is over
        persist("fail", lambda: flaky_down(), budget=10, give_up=stop.is_set, sleep=t.sleep)


def flaky_down() -> None:
    raise StoreUnavailable("down")


def test_failure_log_logs_an_outage_at_a_sane_rate(caplog: pytest.LogCaptureFixture) -> None:
    t = FakeTime()
    failures = FailureLog("heartbeat", action="worker.heartbeat_error", every=30, clock=t.clock)
    caplog.set_level(logging.INFO, logger="vodpush.worker.outage")
    for _ in range(60):  # a minute of heartbeats, one a second
        failures.failed(StoreUnavailable("database unavailable: refused"), request_id=1)
        t.now += 1
    failures.ok()
    failures.ok()
    lines = [(r.action, getattr(r, "failures", None)) for r in caplog.records]  # type: ignore[attr-defined]
    assert lines == [
        ("worker.heartbeat_error", 1),
        ("worker.heartbeat_error", 31),
        ("store.recovered", 60),
    ]
    assert all(r.exc_info is None for r in caplog.records)  # no traceback for an outage
    caplog.clear()
    failures.failed(RuntimeError("a bug"))
    assert caplog.records[0].exc_info is not None and caplog.records[0].levelname == "ERROR"


def test_metrics_are_served_while_the_database_is_down() -> None:
    class Down:
        def depth(self, *, live_only: bool = False) -> dict[str, int]:
            raise StoreUnavailable("database unavailable: refused")

        def oldest_due_seconds(self) -> float:
            raise StoreUnavailable("database unavailable: refused")

    text = metrics.render(Down()).decode()
    assert "vodpush_database_up 0.0" in text and "vodpush_queue_depth{" not in text
    assert "vodpush_store_unavailable_total" in text


# -- the runner on stores that fail for a while ---------------------------------------------


class Flaky:
    """A store in front of a real one: the calls named in ``fail`` raise StoreUnavailable,
    each for its next N calls (or all of them, with N < 0, until ``heal``)."""

    def __init__(self, store: Any) -> None:
        self._store = store
        self._lock = threading.Lock()
        self.fail: dict[str, int] = {}
        self.raised: dict[str, int] = {}
        self.calls: dict[str, list[dict[str, Any]]] = {}

    def heal(self, name: str) -> None:
        with self._lock:
            self.fail.pop(name, None)

    def __getattr__(self, name: str) -> Any:
        real = getattr(self._store, name)
        if not callable(real):
            return real

        def call(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                self.calls.setdefault(name, []).append(kwargs)
                left = self.fail.get(name, 0)
                if left:
                    self.fail[name] = left - 1 if left > 0 else left
                    self.raised[name] = self.raised.get(name, 0) + 1
                    raise StoreUnavailable(f"database unavailable: test outage in {name}")
            return real(*args, **kwargs)

        return call


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
        retry_window=0,  # a schedule of seconds
        max_attempts=3,
        lease_seconds=5,
        shutdown_grace=0.2,
    )
    svc = Service.in_memory(settings)
    yield svc
    svc.close()


def _enqueue(service: Service) -> int:
    account = service.accounts.create(cdn=1, username="jb")["id"]
    service.accounts.allow_buckets(str(account), ["b"])
    new = NewRequest(account, 1, "sestore1/jb/0", "out/0", "b", "private", {}, "", "s0")
    return service.requests.enqueue(new).id


def _flaky(service: Service) -> tuple[Service, Flaky]:
    queue = Flaky(service.queue)
    return replace(service, queue=queue), queue


def _run(worker: Worker, timeout: float = 20) -> None:
    thread = threading.Thread(target=worker.run, kwargs={"burst": True})
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        worker.stop(0)
        thread.join(5)
        pytest.fail("the worker did not finish its burst")


class Transfer:
    """The transfer step: each call runs the next behaviour (the last one repeats)."""

    def __init__(self, *behaviours: Callable[[dict[str, Any]], UploadResult]) -> None:
        self.behaviours = list(behaviours)
        self.calls: list[dict[str, Any]] = []

    def __call__(self, client: Any, job: Any, ledger: Any, **kw: Any) -> UploadResult:
        call = {"ledger": ledger, **kw}
        self.calls.append(call)
        return self.behaviours[min(len(self.calls), len(self.behaviours)) - 1](call)


def _actions(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [getattr(r, "action", "") for r in caplog.records]


@pytest.fixture(autouse=True)
def _info_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="vodpush")


def test_an_outcome_write_rides_out_an_outage(
    service: Service, caplog: pytest.LogCaptureFixture
) -> None:
    rid = _enqueue(service)
    svc, queue = _flaky(service)
    queue.fail["succeed"] = 3
    transfer = Transfer(lambda call: OK)
    _run(Worker(svc, uploader=transfer))
    row = svc.requests.get(rid)
    assert (row.state, row.attempts, len(transfer.calls)) == ("succeeded", 1, 1)
    assert queue.raised == {"succeed": 3} and len(queue.calls["succeed"]) == 4
    assert _actions(caplog).count("store.retry") == 1  # one line for the call, not a try


def test_a_database_error_in_the_transfer_is_retried_and_costs_no_attempt(
    service: Service,
) -> None:
    rid = _enqueue(service)
    svc, queue = _flaky(service)

    def store_down(call: dict[str, Any]) -> UploadResult:
        raise StoreUnavailable("database unavailable: part_done")  # as the engine lets it out

    # More database errors than max_attempts (3): a database is never a reason to fail.
    transfer = Transfer(store_down, store_down, store_down, store_down, lambda call: OK)
    _run(Worker(svc, uploader=transfer))
    row = svc.requests.get(rid)
    assert (row.state, row.attempts, len(transfer.calls)) == ("succeeded", 1, 5)
    retries = queue.calls["retry_later"]
    assert len(retries) == 4 and all(r["refund_attempt"] for r in retries)
    assert all(r["code"] == "StoreUnavailable" for r in retries)
    assert retries[0]["cause"] == "the database was unavailable"


def test_part_ledger_calls_ride_out_an_outage(service: Service) -> None:
    rid = _enqueue(service)
    failures = {"part_done": 2, "begin": 1}

    class FlakyLedger:
        def __init__(self, ledger: Any) -> None:
            self._ledger = ledger

        def __getattr__(self, name: str) -> Any:
            real = getattr(self._ledger, name)

            def call(*args: Any) -> Any:
                if failures.get(name):
                    failures[name] -= 1
                    raise StoreUnavailable(f"database unavailable: {name}")
                return real(*args)

            return call

    svc = replace(service, ledger=lambda *a, **kw: FlakyLedger(service.ledger(*a, **kw)))
    checkpoint = MultipartCheckpoint(
        upload_id="u", chunksize=5, size=10, mtime_ns=1, checksums=False
    )

    def multipart(call: dict[str, Any]) -> UploadResult:
        call["ledger"].begin(checkpoint)
        call["ledger"].part_done(1, PartRecord(etag='"1"', checksum_sha256=None, size=5))
        call["ledger"].part_done(2, PartRecord(etag='"2"', checksum_sha256=None, size=5))
        loaded = call["ledger"].load()
        assert loaded is not None and sorted(loaded.parts) == [1, 2]
        return OK

    transfer = Transfer(multipart)
    _run(Worker(svc, uploader=transfer))
    row = svc.requests.get(rid)
    assert (row.state, row.attempts, len(transfer.calls)) == ("succeeded", 1, 1)
    assert failures == {"part_done": 0, "begin": 0}


def test_an_outcome_not_recorded_leaves_the_request_leased_never_failed(
    service: Service, caplog: pytest.LogCaptureFixture
) -> None:
    rid = _enqueue(service)
    service.settings.lease_seconds = 1  # the budget of an outcome write
    svc, queue = _flaky(service)
    queue.fail["succeed"] = -1  # the database stays away for longer than the lease
    transfer = Transfer(lambda call: OK)
    worker = Worker(svc, uploader=transfer)
    thread = threading.Thread(target=worker.run)
    thread.start()
    deadline = time.monotonic() + 10
    while "upload.not_recorded" not in _actions(caplog) and time.monotonic() < deadline:
        time.sleep(0.02)
    worker.stop(0)
    thread.join(10)
    assert "upload.not_recorded" in _actions(caplog)
    row = svc.requests.get(rid)
    assert (row.state, row.message) == ("running", "Uploading")  # leased: not failed
    assert "fail" not in queue.calls and "retry_later" not in queue.calls


def test_a_lease_that_ran_out_during_an_outage_is_taken_back_by_the_same_upload(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Heartbeats fail until the lease has run out; the worker's own next claim takes the
    request back. The upload running here goes on: no second attempt beside it."""
    now = [datetime(2026, 1, 1)]
    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'unused.db'}",
        sestore_root=tmp_path,
        secret_key=generate_key(),
        secret_key_file=tmp_path / "unused.key",
        poll_interval=0.05,
        lease_seconds=5,
    )
    service = Service.in_memory(settings, clock=lambda: now[0])
    rid = _enqueue(service)
    svc, queue = _flaky(service)
    queue.fail["heartbeat"] = -1
    taken_back = threading.Event()

    def slow(call: dict[str, Any]) -> UploadResult:
        now[0] += timedelta(seconds=60)  # the lease ran out (by the database's clock)
        deadline = time.monotonic() + 10
        while "upload.lease_renewed" not in _actions(caplog) and time.monotonic() < deadline:
            time.sleep(0.02)
        taken_back.set()
        queue.heal("heartbeat")
        return OK

    transfer = Transfer(slow)
    _run(Worker(svc, uploader=transfer))
    assert taken_back.is_set() and "upload.lease_renewed" in _actions(caplog)
    row = svc.requests.get(rid)
    assert (row.state, len(transfer.calls)) == ("succeeded", 1)


# -- the S3 engine with a ledger whose database is away --------------------------------------


class LedgerDown(MemoryLedger):
    """The in-memory ledger, with the named calls failing as a database that is away."""

    def __init__(self, *down: str) -> None:
        super().__init__()
        self.down = set(down)

    def __getattribute__(self, name: str) -> Any:
        if name in object.__getattribute__(self, "down"):

            def unavailable(*args: Any) -> Any:
                raise StoreUnavailable(f"database unavailable: {name}")

            return unavailable
        return super().__getattribute__(name)


def test_cleanup_that_meets_the_database_keeps_the_checkpoint_and_says_so() -> None:
    # abandon() must not report a clean-up it could not record; the caller retries later
    # instead of failing the request and forgetting the multipart upload's id.
    ledger = LedgerDown("load")
    job = UploadJob(source=Path("/nonexistent"), bucket="b", key="k")
    with pytest.raises(StoreUnavailable):
        abandon_quietly(client=None, job=job, ledger=ledger)  # type: ignore[arg-type]


def test_a_completed_upload_stands_when_its_checkpoint_cannot_be_cleared(
    s3: Any, bucket: str, tmp_path: Path
) -> None:
    """CompleteMultipartUpload succeeded while the ledger's database was away: the upload
    is done (an error here would make the request upload the file again), and its
    checkpoint is left for the caller's record of the success to drop."""
    data = os.urandom(6 * MiB)
    (tmp_path / "clip.mp4").write_bytes(data)
    client = s3_client(s3)
    job = UploadJob(source=tmp_path / "clip.mp4", bucket=bucket, key="clip.mp4")
    ledger = LedgerDown("clear")
    result = upload(client, job, ledger, threshold=5 * MiB, chunksize=5 * MiB, concurrency=2)
    assert (result.size, result.parts_total) == (len(data), 2)
    assert client.get_object(Bucket=bucket, Key="clip.mp4")["Body"].read() == data
    assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    assert ledger.load() is not None


def test_a_stop_with_the_database_hanging_still_returns_within_its_bound(
    service: Service, caplog: pytest.LogCaptureFixture
) -> None:
    """At give_up_at the worker hands back an upload stuck in an S3 call; the hand-back's
    database write never answers (a partitioned server): run() returns anyway, the
    request left to its lease."""
    rid = _enqueue(service)
    svc, queue = _flaky(service)
    in_s3, hang = threading.Event(), threading.Event()
    release = queue.__getattr__("release")

    def release_hangs(*args: Any, **kwargs: Any) -> None:
        hang.wait(60)
        release(*args, **kwargs)

    queue.release = release_hangs  # type: ignore[attr-defined]

    def stuck(call: dict[str, Any]) -> UploadResult:
        in_s3.set()
        hang.wait(60)  # an S3 call that does not return, deaf to should_stop
        return OK

    worker = Worker(svc, uploader=Transfer(stuck))
    thread = threading.Thread(target=worker.run)
    thread.start()
    try:
        assert in_s3.wait(10)
        stopped = time.monotonic()
        worker.stop(0.2)
        thread.join(15)
        took = time.monotonic() - stopped
        assert not thread.is_alive()
        # grace + SETTLE_SECONDS + HAND_BACK_SECONDS, with room for a loaded machine.
        assert took < 0.2 + 2 + 1.5 + 1.3, took
        assert "worker.give_up_unfinished" in _actions(caplog)
        row = svc.requests.get(rid)
        assert row is not None and row.state == "running"  # left to its lease
    finally:
        hang.set()
        thread.join(10)
