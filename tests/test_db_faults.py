"""Database faults under a real worker process (`python -m vodpush worker`) uploading to the
moto S3 process: PostgreSQL connections killed mid-upload (pg_terminate_backend, with new
connections refused for a moment so that each kill bites), a PostgreSQL server stopped and
started again mid-upload (a throwaway cluster of this test's own, never the shared one),
SQLite's write lock held by another connection past the busy timeout, and a callback whose
record meets a killed connection. Each must end with the request succeeded once: one object
version, no multipart upload left, no "internal error", one callback id."""

from __future__ import annotations

import contextlib
import glob
import hashlib
import http.server
import os
import shutil
import sqlite3
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, func, select, text
from sqlalchemy.engine import make_url

from tests.conftest import IN_CI, PG_ADMIN_URL, MiB, free_port, s3_client
from tests.faults import log_events, queue_file, start_worker, wait_for, worker_env
from vodpush.config import Settings
from vodpush.core.requests import NewRequest, StoreUnavailable
from vodpush.crypto import generate_key
from vodpush.persistence.models import UploadPart, UploadRequest
from vodpush.service import Service

pytestmark = pytest.mark.slow

# -- helpers -----------------------------------------------------------------------------


def _try(read: Callable[[], Any]) -> Any:
    """A read of the test's own, which the fault may refuse too: None then."""
    try:
        return read()
    except StoreUnavailable:
        return None


def parts_stored(service: Service, request_id: int) -> int:
    def count() -> int:
        with service.database().connect() as conn:
            return conn.execute(
                select(func.count()).where(UploadPart.request_id == request_id)
            ).scalar_one()

    try:
        return count()
    except Exception:  # refused or killed by the fault: not known now
        return -1


def request_rows(service: Service) -> list[Any]:
    with service.database().connect() as conn:
        return conn.execute(select(UploadRequest.__table__)).all()


class Bucket:
    """What the S3 server holds for one bucket: object versions (versioning is on, so every
    PUT or completed upload of a key adds one) and multipart uploads not completed."""

    def __init__(self, s3: Any, name: str) -> None:
        self.client = s3_client(s3)
        self.name = name
        self.client.put_bucket_versioning(
            Bucket=name, VersioningConfiguration={"Status": "Enabled"}
        )

    def counts(self) -> tuple[int, int]:
        versions = self.client.list_object_versions(Bucket=self.name).get("Versions", [])
        uploads = self.client.list_multipart_uploads(Bucket=self.name).get("Uploads", [])
        return len(versions), len(uploads)

    def body(self, key: str) -> bytes:
        return self.client.get_object(Bucket=self.name, Key=key)["Body"].read()


def assert_clean_success(
    service: Service, bucket: Bucket, request_id: int, key: str, data: bytes, log: Path
) -> Any:
    """The request succeeded once: one version, no multipart upload, nothing failed or
    crashed, and no "internal error" in its record or the worker's log."""
    rows = request_rows(service)
    assert len(rows) == 1  # no request lost or added
    (row,) = rows
    assert (row.id, row.state) == (request_id, "succeeded"), row.message
    assert bucket.counts() == (1, 0)  # one object version, no multipart upload left
    assert hashlib.sha256(bucket.body(key)).digest() == hashlib.sha256(data).digest()
    text_log = log.read_text()
    assert "internal error" not in text_log.lower() and "internal error" not in row.message
    assert not log_events(log, "upload.crashed") and not log_events(log, "upload.failed")
    assert len(log_events(log, "upload.succeeded")) == 1
    return row


def store_events(log: Path) -> list[dict[str, Any]]:
    """The worker's lines about a database that did not answer (the fault reached it)."""
    actions = ("store.retry", "worker.heartbeat_error", "worker.claim_error", "upload.retry")
    return [e for action in actions for e in log_events(log, action)]


class PgFaults:
    """Faults on one PostgreSQL database, from an administrator's connection to another
    database of the same server: kill every connection to it, refuse new ones."""

    def __init__(self, admin_url: str, database: str) -> None:
        self.engine = create_engine(admin_url, isolation_level="AUTOCOMMIT")
        self.database = database
        self.killed = 0

    def kill(self) -> int:
        with self.engine.connect() as conn:
            killed = conn.execute(
                text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE datname = :d AND pid <> pg_backend_pid()"
                ),
                {"d": self.database},
            ).scalar_one()
        self.killed += killed
        return killed

    def refuse(self, refused: bool = True) -> None:
        with self.engine.connect() as conn:
            conn.execute(
                text(f'ALTER DATABASE "{self.database}" ALLOW_CONNECTIONS {not refused!s}')
            )

    def close(self) -> None:
        self.refuse(False)
        self.engine.dispose()


@pytest.fixture
def pg_faults(service: Service) -> Iterator[PgFaults]:
    faults = PgFaults(PG_ADMIN_URL, make_url(service.settings.database_url).database or "")
    yield faults
    faults.close()


@contextlib.contextmanager
def running_worker(env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    worker = start_worker(env, log, "--burst")
    try:
        yield worker
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait(10)


# -- (a) killed connections ------------------------------------------------------------------


@pytest.mark.postgres
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_connections_killed_mid_upload_pause_it_and_it_succeeds_once(
    service, s3_account, s3, bucket, sestore_root, tmp_path, pg_faults
):
    store = Bucket(s3, bucket)
    assert store.counts() == (0, 0)
    rid, data = queue_file(service, s3_account, sestore_root, "killed.mp4", 100 * MiB, bucket)
    log = tmp_path / "worker.log"
    with running_worker(worker_env(service), log) as worker:
        wait_for(lambda: parts_stored(service, rid) >= 2, 60, "two stored parts")
        rounds = 0
        while worker.poll() is None and rounds < 3:
            # Every connection killed and new ones refused for a second (the pool's check
            # on checkout cannot replace them), then killed again and again for a moment.
            pg_faults.refuse()
            pg_faults.kill()
            time.sleep(1.0)
            pg_faults.refuse(False)
            until = time.monotonic() + 0.5
            while time.monotonic() < until:
                pg_faults.kill()
                time.sleep(0.05)
            rounds += 1
        assert worker.wait(120) == 0
    assert rounds >= 1 and pg_faults.killed >= 1
    assert store_events(log), "the faults never reached the worker"
    row = assert_clean_success(service, store, rid, "killed.mp4", data, log)
    # The upload paused and went on: never restarted, no attempt counted twice.
    assert (row.attempts, row.lease_expiries) == (1, 0)


# -- (b) a PostgreSQL restart ----------------------------------------------------------------


def _pg_bindir() -> str | None:
    configured = os.environ.get("VODPUSH_TEST_PG_BINDIR")
    if configured:
        return configured
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return str(Path(found[-1]).parent)
    initdb = shutil.which("initdb")
    return str(Path(initdb).parent) if initdb else None


class Cluster:
    """A throwaway PostgreSQL server of this test's own, in a temporary directory, on a
    free loopback port (trust auth): it may be stopped and started at will."""

    def __init__(self, bindir: str) -> None:
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="vodpush-pg-"))
        self.data = self.root / "data"
        self.sockets = self.root / "sockets"
        self.sockets.mkdir()
        self.port = free_port()
        self.log = self.root / "server.log"
        # The server refuses to run as root: as root, run it as the postgres user.
        self._as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self._as:
            shutil.chown(self.root, "postgres")
            shutil.chown(self.sockets, "postgres")
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/vodpush"

    def _run(self, tool: str, *args: str, timeout: float = 60) -> None:
        command = [*self._as, str(Path(self.bindir) / tool), *args]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"{tool} failed: {done.stdout[-2000:]}{done.stderr[-2000:]}")

    def init(self) -> None:
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "--no-sync")
        self.start()
        admin = create_engine(
            self.url.rsplit("/", 1)[0] + "/postgres", isolation_level="AUTOCOMMIT"
        )
        with admin.connect() as conn:
            conn.execute(text("CREATE DATABASE vodpush"))
        admin.dispose()

    def start(self) -> None:
        options = f"-p {self.port} -k {self.sockets} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run("pg_ctl", "start", "-w", "-D", str(self.data), "-l", str(self.log), "-o", options)

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "stop", "-w", "-D", str(self.data), "-m", mode)

    def destroy(self) -> None:
        with contextlib.suppress(Exception):
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def own_postgres() -> Iterator[Cluster]:
    bindir = _pg_bindir()
    if bindir is None or not Path(bindir, "initdb").exists():
        reason = "PostgreSQL server binaries (initdb, pg_ctl) not found"
        if IN_CI:
            pytest.fail(f"{reason} (required under CI=true)")
        pytest.skip(reason)
    cluster = Cluster(bindir)
    try:
        cluster.init()
        yield cluster
    finally:
        cluster.destroy()


def test_a_postgresql_restart_mid_upload_ends_in_one_success(
    own_postgres, s3, sestore_root, tmp_path
):
    service = Service.open(
        Settings(
            database_url=own_postgres.url, sestore_root=sestore_root, secret_key=generate_key()
        )
    )
    try:
        created = service.accounts.create(cdn=1, username="restart", s3=s3.settings())
        name = f"restart-{int(time.time() * 1000)}"
        s3_client(s3).create_bucket(Bucket=name)
        store = Bucket(s3, name)

        class Account:
            id = created["id"]
            cdn = 1
            username = "restart"

        rid, data = queue_file(service, Account, sestore_root, "restart.mp4", 40 * MiB, name)
        log = tmp_path / "worker.log"
        with running_worker(worker_env(service), log) as worker:
            wait_for(lambda: parts_stored(service, rid) >= 2, 60, "two stored parts")
            own_postgres.stop("fast")
            # Down for longer than the lease (5 s): heartbeats fail, the lease runs out.
            down_until = time.monotonic() + 8
            while time.monotonic() < down_until:
                assert worker.poll() is None, "the worker died with the database"
                time.sleep(0.2)
            own_postgres.start()
            assert worker.wait(120) == 0
        assert store_events(log), "the restart never reached the worker"
        row = assert_clean_success(service, store, rid, "restart.mp4", data, log)
        assert row.attempts >= 1
    finally:
        service.close()


# -- (c) SQLite busy ---------------------------------------------------------------------------


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_sqlite_locked_past_the_busy_timeout_mid_upload_still_succeeds(
    service, s3_account, s3, bucket, sestore_root, tmp_path
):
    store = Bucket(s3, bucket)
    rid, data = queue_file(service, s3_account, sestore_root, "busy.mp4", 30 * MiB, bucket)
    database = make_url(service.settings.database_url).database or ""
    log = tmp_path / "worker.log"
    # The worker waits 1 s for the write lock (``?timeout=``), then meets "database is locked".
    env = worker_env(service, VODPUSH_DATABASE_URL=f"{service.settings.database_url}?timeout=1")

    def locked() -> list[dict[str, Any]]:
        return [e for e in store_events(log) if "locked" in str(e.get("error", ""))]

    with running_worker(env, log) as worker:
        wait_for(lambda: parts_stored(service, rid) >= 2, 60, "two stored parts")
        holder = sqlite3.connect(database, isolation_level=None)
        try:
            # Another program writes, until the worker has waited out its busy timeout
            # against it and said so.
            holder.execute("BEGIN IMMEDIATE")
            wait_for(locked, 60, "the lock to reach the worker")
            assert worker.poll() is None
        finally:
            holder.execute("COMMIT")
            holder.close()
        assert worker.wait(120) == 0
    assert locked(), "the lock never reached the worker"
    assert_clean_success(service, store, rid, "busy.mp4", data, log)


# -- (d) a callback recorded through a killed connection ---------------------------------------


class Receiver(http.server.ThreadingHTTPServer):
    """A customer's webhook endpoint: records each POST; ``on_post`` runs before it
    answers 200."""

    def __init__(self, on_post: Callable[[], None]) -> None:
        self.posts: list[dict[str, str]] = []
        self.on_post = on_post
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                server.posts.append(dict(self.headers))
                server.on_post()
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/hook"


@pytest.mark.postgres
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_callback_recorded_through_a_killed_connection_is_sent_once(
    service, s3_account, s3, bucket, sestore_root, tmp_path, pg_faults
):
    store = Bucket(s3, bucket)
    down: list[threading.Timer] = []

    def database_goes_away() -> None:
        # The POST was received: now the worker's connections die and, for 3 s, no new
        # one is let in, so that recording the attempt meets the fault.
        if down:
            return
        pg_faults.refuse()
        pg_faults.kill()
        timer = threading.Timer(3.0, pg_faults.refuse, args=(False,))
        down.append(timer)
        timer.start()

    receiver = Receiver(database_goes_away)
    try:
        path = sestore_root / "sestore1" / s3_account.username / "cb.mp4"
        data = os.urandom(200_000)
        path.write_bytes(data)
        rid = service.requests.enqueue(
            NewRequest(
                account_id=s3_account.id,
                cdn_id=s3_account.cdn,
                path=f"sestore1/{s3_account.username}/cb.mp4",
                destination_path="cb.mp4",
                bucket=bucket,
                acl="private",
                metadata={},
                callback=receiver.url,
                signature=f"test-cb-{time.time()}",
            )
        ).id
        log = tmp_path / "worker.log"
        env = worker_env(service, VODPUSH_CALLBACK_ALLOW_PRIVATE="true")
        with running_worker(env, log) as worker:
            assert worker.wait(120) == 0
        for timer in down:
            timer.join()
    finally:
        receiver.shutdown()
        receiver.server_close()
    assert down, "the callback was never sent"
    recorded = [e for e in log_events(log, "store.retry") if e["operation"] == "record_callback"]
    assert recorded, "the fault never reached the callback's record"
    row = assert_clean_success(service, store, rid, "cb.mp4", data, log)
    ids = {post["webhook-id"] for post in receiver.posts}
    assert (len(receiver.posts), len(ids)) == (1, 1)  # sent once, one webhook-id
    assert (row.callback_state, row.callback_attempts) == ("delivered", 1)
    assert row.callback_msg_id in ids
    attempts = service.queue.callback_attempts(rid)
    assert [a["ok"] for a in attempts] == [True]
