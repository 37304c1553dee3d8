"""Network partitions (issue 9, item 10): two worker hosts, each a network namespace joined
to this machine by a veth pair, share one PostgreSQL; host A is cut off (its veth down:
neither the database nor S3 nor the callback receiver answers it) in the middle of an
upload. Host B takes the request over when A's lease runs out and finishes it; when A's
link comes back, A finds it lost the lease and writes no outcome, completes no upload and
sends no callback. The database, the moto S3 server and the receiver listen on 127.0.0.1;
each host reaches them through forwarders bound to its veth's address in the root
namespace (tests/netns.py). Runs as root; skipped when namespaces cannot be made (failed
under CI=true)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import select, text
from sqlalchemy.engine import make_url
from standardwebhooks.webhooks import Webhook

from tests import netns
from tests.conftest import IN_CI, Creds, LiveServer, MiB, s3_client
from tests.faults import wait_for, worker_env
from tests.s3server import MotoServer
from tests.test_callback_ids import ScriptedReceiver
from tests.wire import call
from vodpush.api.app import create_app
from vodpush.config import Settings
from vodpush.core.accounts import S3Settings
from vodpush.crypto import generate_key
from vodpush.persistence.models import UploadRequest
from vodpush.service import Service
from vodpush.webhooks import standard_webhooks_secret

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.integration]

SIZE = 40 * MiB  # eight 5 MiB parts


def part_request(number: int) -> re.Pattern[bytes]:
    return re.compile(rb"^PUT \S*[?&]partNumber=" + str(number).encode() + rb"[&\s]")


COMPLETE_REQUEST = re.compile(rb"^POST \S*[?&]uploadId=")


@dataclass
class Site:
    """One worker host: its namespace, its forwarders, its worker process and log."""

    host: netns.Host
    log: Path
    forwarders: dict[str, netns.Forwarder] = field(default_factory=dict)
    worker: subprocess.Popen[bytes] | None = None

    def events_all(self) -> list[dict[str, Any]]:
        """The worker's log lines that name an action."""
        out = []
        for line in self.log.read_text().splitlines() if self.log.exists() else []:
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if "action" in entry:
                out.append(entry)
        return out

    def events(self, action: str) -> list[dict[str, Any]]:
        return [e for e in self.events_all() if e["action"] == action]

    def actions(self) -> set[str]:
        return {e["action"] for e in self.events_all()}


class Partition:
    """The setting of one test: PostgreSQL, moto, a receiver, the API, two hosts."""

    def __init__(self, pg_url: str, s3: MotoServer, root: Path, hosts: list[netns.Host]) -> None:
        try:
            self._start(pg_url, s3, root, hosts)
        except BaseException:
            self.close()
            raise

    def _start(self, pg_url: str, s3: MotoServer, root: Path, hosts: list[netns.Host]) -> None:
        self.pg_url = pg_url
        self.s3 = s3
        self.root = root
        sestore = root / "stores"
        (sestore / "sestore1" / "part").mkdir(parents=True)
        self.settings = Settings(
            database_url=pg_url,
            sestore_root=sestore,
            secret_key=generate_key(),
            secret_key_file=root / "unused.key",
            callback_allow_private=True,
        )
        self.service = Service.open(self.settings)
        # No endpoint here: each host names its own forwarder (AWS_ENDPOINT_URL_S3).
        created = self.service.accounts.create(
            cdn=1,
            username="part",
            s3=S3Settings(region="us-east-1", access_key_id="testing", secret_access_key="testing"),
        )
        self.service.accounts.allow_buckets(created["api_key"], ["*"])
        self.creds = Creds(**created)
        self.api = LiveServer(create_app(self.service), self.settings)
        self.api.start()
        self.receiver = ScriptedReceiver([])
        self.bucket = f"partition-{os.getpid()}-{int(time.time() * 1000)}"
        client = s3_client(s3)
        client.create_bucket(Bucket=self.bucket)
        # With versioning on, every completed upload of the key is a version: S3 counts.
        client.put_bucket_versioning(
            Bucket=self.bucket, VersioningConfiguration={"Status": "Enabled"}
        )
        self.sites = [Site(host, root / f"{host.name}.log") for host in hosts]
        self.a, self.b = self.sites
        # The callback URL is one for both: B's address; A reaches it by its default route.
        self.hook = netns.Forwarder(self.b.host.host_ip, self.receiver.port).start()
        self.callback_url = f"http://{self.b.host.host_ip}:{self.hook.port}/hook"

    def forward(self, site: Site, *, on_s3_request: netns.RequestHook | None = None) -> None:
        pg_port = make_url(self.pg_url).port or 5432
        site.forwarders["db"] = netns.Forwarder(site.host.host_ip, pg_port).start()
        site.forwarders["s3"] = netns.Forwarder(
            site.host.host_ip, self.s3.port, on_request=on_s3_request
        ).start()

    def start_worker(self, site: Site) -> None:
        db_url = (
            make_url(self.pg_url)
            .set(host=site.host.host_ip, port=site.forwarders["db"].port)
            .render_as_string(hide_password=False)
        )
        env = worker_env(
            self.service,
            VODPUSH_DATABASE_URL=db_url,
            AWS_ENDPOINT_URL_S3=f"http://{site.host.host_ip}:{site.forwarders['s3'].port}",
            VODPUSH_CALLBACK_ALLOW_PRIVATE="true",
            VODPUSH_CALLBACK_TIMEOUT="2",
            VODPUSH_CALLBACK_SCHEDULE="[0.5, 0.5, 0.5]",
        )
        site.worker = subprocess.Popen(
            site.host.argv(sys.executable, "-m", "vodpush", "worker"),
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=site.log.open("wb"),
        )

    def queue_upload(self, name: str = "movie.mp4") -> tuple[int, bytes]:
        data = os.urandom(SIZE)
        (self.settings.sestore_root / "sestore1" / "part" / name).write_bytes(data)
        answer = call(
            self.api.url,
            self.creds,
            "aws.upload",
            path=f"sestore1/part/{name}",
            destination_path=name,
            bucket=self.bucket,
            acl="private",
            callback=self.callback_url,
        )
        assert answer["status"] == "success", answer
        return answer["data"]["id"], data

    def row(self, request_id: int) -> Any:
        with self.service.engine.connect() as conn:
            return conn.execute(
                select(UploadRequest.__table__).where(UploadRequest.id == request_id)
            ).first()

    def stop_worker(self, site: Site) -> int | None:
        proc, site.worker = site.worker, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                # A connection that was silent through the cut may wait for TCP's next
                # retransmission (its backoff grows with the cut) before it ends.
                return proc.wait(90)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
                return None
        return proc.returncode

    def close(self) -> None:
        """Stop whatever was started (also after a failure half-way through __init__)."""
        for site in getattr(self, "sites", []):
            self.stop_worker(site)
            for forwarder in site.forwarders.values():
                forwarder.stop()
        for name in ("hook", "receiver", "api"):
            if hasattr(self, name):
                getattr(self, name).stop()
        if hasattr(self, "service"):
            self.service.close()

    # -- the outcome, checked the same way by every test --------------------------------

    def assert_uploaded_once(self, request_id: int, data: bytes, key: str) -> None:
        """One outcome (succeeded, by B), one object version, no multipart upload left,
        one callback delivery; A noticed it lost the lease and recorded nothing."""
        row = self.row(request_id)
        assert row.state == "succeeded", row.message
        assert (row.callback_state, row.callback_attempts) == ("delivered", 1)
        assert row.lease_expiries == 1  # A's lease ran out once; B took it over

        client = s3_client(self.s3)
        versions = client.list_object_versions(Bucket=self.bucket).get("Versions", [])
        assert [(v["Key"], v["IsLatest"]) for v in versions] == [(key, True)]
        assert client.list_multipart_uploads(Bucket=self.bucket).get("Uploads", []) == []
        assert client.get_object(Bucket=self.bucket, Key=key)["Body"].read() == data

        record = call(self.api.url, self.creds, "aws.status", id=request_id)["data"][0]
        assert record["message"] == "Successfully Uploaded to AWS"
        assert record["results"]["VersionId"] == versions[0]["VersionId"]

        # Exactly one POST, one webhook-id, signed for this account, saying succeeded.
        assert len(self.receiver.received) == 1, self.receiver.ids()
        assert len(set(self.receiver.ids())) == 1
        hook = Webhook(standard_webhooks_secret(self.creds.api_secret))
        headers, body = self.receiver.received[0]
        payload = hook.verify(body, headers)
        assert payload["message"] == "Successfully Uploaded to AWS"
        assert payload["results"]["VersionId"] == versions[0]["VersionId"]

        # B finished it; A only claimed it and then noticed the loss.
        assert len(self.b.events("upload.succeeded")) == 1
        assert len(self.a.events("upload.claimed")) == 1
        assert self.a.events("upload.lease_lost"), sorted(self.a.actions())
        outcomes = {"upload.succeeded", "upload.failed", "upload.retry", "upload.released"}
        assert not self.a.actions() & outcomes, sorted(self.a.actions())
        # (A may log that it could not reach the database to look for due callbacks.)
        assert not [e for e in self.a.events_all() if e["message"] == "callback attempt"]


@pytest.fixture
def hosts() -> Iterator[list[netns.Host]]:
    reason = netns.unavailable()
    if reason is not None:
        if IN_CI:
            pytest.fail(f"{reason} (required under CI=true)")
        pytest.skip(reason)
    made = netns.make_hosts(2)
    try:
        for host in made:
            host.create()
        yield made
    finally:
        for host in made:
            host.delete()


@pytest.fixture
def partition(pg_url: str, s3: MotoServer, tmp_path: Path, hosts) -> Iterator[Partition]:
    setting = Partition(pg_url, s3, tmp_path, hosts)
    try:
        yield setting
    finally:
        setting.close()


def _log_time(entry: dict[str, Any]) -> float:
    return datetime.fromisoformat(entry["time"]).timestamp()


def start_both(partition: Partition, request_id: int) -> None:
    """A first; B as soon as A holds the lease (B starts while A uploads, and can only
    take the request over once A's lease has run out)."""
    partition.start_worker(partition.a)
    wait_for(lambda: partition.row(request_id).lease_owner, 60, "A to claim the request")
    partition.start_worker(partition.b)


def b_finishes(partition: Partition, request_id: int, timeout: float = 90) -> None:
    wait_for(lambda: partition.row(request_id).state == "succeeded", timeout, "B to finish")
    wait_for(lambda: partition.receiver.received, 30, "the callback")


def a_comes_back(partition: Partition, then: Callable[[], None] | None = None) -> None:
    """Restore A's link; A must find out it lost the lease, then stop cleanly."""
    a = partition.a
    a.host.restore()
    if then is not None:
        then()
    wait_for(lambda: a.events("upload.lease_lost"), 90, "A to notice it lost the lease")
    # Figures for the docs (pytest -s shows them): cut -> B's claim, restore -> A's notice.
    claimed = _log_time(partition.b.events("upload.claimed")[0])
    noticed = _log_time(a.events("upload.lease_lost")[0])
    print(
        f"\ntakeover {claimed - a.host.cut_at:.1f} s after the cut, "
        f"lease loss noticed {noticed - a.host.restored_at:.1f} s after the restore"
    )
    # Whatever A still had in hand it has given up: it stops at once, sending nothing.
    assert partition.stop_worker(a) == 0
    assert partition.stop_worker(partition.b) == 0


def test_cut_off_mid_upload_the_other_host_takes_over_and_the_first_records_nothing(
    partition: Partition,
):
    a = partition.a
    cut = threading.Event()

    def cut_at_part_3(conn: netns.Connection, line: bytes) -> None:
        # Parts 1 and 2 are stored and recorded; part 3 is on its way.
        if part_request(3).match(line) and not cut.is_set():
            a.host.cut()
            cut.set()

    partition.forward(a, on_s3_request=cut_at_part_3)
    partition.forward(partition.b)
    request_id, data = partition.queue_upload()
    start_both(partition, request_id)
    wait_for(cut.is_set, 60, "host A to reach part 3")

    b_finishes(partition, request_id)
    (done,) = partition.b.events("upload.succeeded")
    assert 0 < done["parts_sent"] < done["parts_total"] == 8  # B resumed A's upload

    a_comes_back(partition)
    partition.assert_uploaded_once(request_id, data, "movie.mp4")


@pytest.mark.parametrize("lost", ["answer", "request"])
def test_cut_off_in_the_complete_window(partition: Partition, lost: str):
    """A passed its last lease check (DbLedger.confirm) and sent CompleteMultipartUpload;
    then it is cut off. "answer": S3 completed the upload and A never hears back, so B
    finds no upload to resume (S3 forgets a completed one) but the object in place: it
    must record that, not upload the file a second time. "request": the request is held
    in the network and reaches S3 after B completed the upload; S3 answers it as the
    upload it already completed, and A, back, finds its lease gone."""
    a = partition.a
    held: list[netns.Connection] = []

    def hold_complete(conn: netns.Connection, line: bytes) -> None:
        if COMPLETE_REQUEST.match(line) and not held:
            if lost == "answer":
                conn.hold_response()
            else:
                conn.hold_request()
                a.host.cut()
            held.append(conn)

    partition.forward(a, on_s3_request=hold_complete)
    partition.forward(partition.b)
    request_id, data = partition.queue_upload()
    start_both(partition, request_id)
    wait_for(lambda: held, 90, "A's CompleteMultipartUpload")
    (conn,) = held
    if lost == "answer":
        wait_for(conn.response_held.is_set, 30, "S3's answer to it")
        a.host.cut()
        # S3 holds the object; nobody has recorded it.
        assert (
            len(
                s3_client(partition.s3)
                .list_object_versions(Bucket=partition.bucket)
                .get("Versions", [])
            )
            == 1
        )

    b_finishes(partition, request_id)
    (done,) = partition.b.events("upload.succeeded")
    if lost == "answer":
        assert done["parts_sent"] == 0  # found complete: nothing sent again
    # "answer": the connection is reset once A is back (the answer is lost for good);
    # "request": the held request goes on to S3, late.
    a_comes_back(partition, then=conn.reset if lost == "answer" else conn.release)
    partition.assert_uploaded_once(request_id, data, "movie.mp4")


def _locks_waited_on(service: Service) -> int:
    with service.engine.connect() as conn:
        return conn.execute(
            text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock' AND query LIKE '%FOR UPDATE%'"
            )
        ).scalar_one()


@pytest.mark.parametrize("server", ["keeps", "forgets"])
def test_cut_off_mid_transaction(partition: Partition, server: str):
    """A is cut off while a transaction of its is open on the server: the statement that
    records part 2 (it locks the request's row first) is made to wait on a row lock the
    test holds, A is cut off, and the lock is let go.

    "keeps": the server goes on with A's statement and A's transaction stays open, its
    COMMIT never coming, holding the row: every claim skips a locked row, so without an
    idle-in-transaction timeout on the server no other worker could ever take over.
    "forgets": the server side forgets A's connections while A is away (a restart, a NAT
    or proxy that dropped them; here the forwarder resets them, and the reset is lost on
    the cut link), so A, back, waits for an answer that never comes: without TCP
    keepalives it would wait forever and never find out it lost the lease."""
    a = partition.a
    locker = psycopg.connect(
        make_url(partition.pg_url).set(drivername="postgresql").render_as_string(False)
    )
    ids: list[int] = []
    locked = threading.Event()

    def lock_at_part_2(conn: netns.Connection, line: bytes) -> None:
        if part_request(2).match(line) and not locked.is_set():
            locker.execute("SELECT id FROM upload_requests WHERE id = %s FOR UPDATE", ids)
            locked.set()

    try:
        partition.forward(a, on_s3_request=lock_at_part_2)
        partition.forward(partition.b)
        request_id, data = partition.queue_upload()
        ids.append(request_id)
        start_both(partition, request_id)
        wait_for(locked.is_set, 60, "A to reach part 2")
        wait_for(lambda: _locks_waited_on(partition.service), 60, "A to wait on the lock")
        a.host.cut()
        if server == "forgets":
            a.forwarders["db"].reset_all()
        locker.rollback()

        b_finishes(partition, request_id)
        a_comes_back(partition)
        partition.assert_uploaded_once(request_id, data, "movie.mp4")
    finally:
        locker.close()


def test_database_connections_are_set_up_to_survive_a_partition(pg_url: str) -> None:
    """What the partition tests rely on, seen on a real connection: keepalives on its
    socket, the server's idle-in-transaction timeout, and a URL that overrides either."""
    from vodpush.persistence import db

    def socket_and_timeout(url: str) -> tuple[int, int, str]:
        engine = db.make_engine(url)
        try:
            with engine.connect() as conn:
                timeout = conn.execute(text("SHOW idle_in_transaction_session_timeout")).scalar()
                raw = conn.connection.driver_connection
                sock = socket.socket(fileno=os.dup(raw.fileno()))  # type: ignore[union-attr]
                with sock:
                    return (
                        sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
                        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
                        str(timeout),
                    )
        finally:
            engine.dispose()

    assert socket_and_timeout(pg_url) == (1, 10, "5s")
    overridden = f"{pg_url}?keepalives_idle=30&options=-c%20statement_timeout%3D1000"
    assert socket_and_timeout(overridden) == (1, 30, "0")
