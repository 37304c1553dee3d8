"""Accounts as tenants, attacked the way a customer would: over HTTP against a live server,
a worker uploading to the moto S3 server process, real callback receivers.

- buckets belong to accounts: an account without S3 credentials of its own (the operator's
  default credentials reach every bucket) writes only to the buckets on its list;
- two accounts never share a sestore directory (usernames unique; a database from before
  that rule keeps running but reads no file for a shared username);
- a disabled account's uploads and callbacks are held, and go on when it is enabled;
- callbacks can be signed with a per-account webhook secret instead of the API secret.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, inspect, select, text
from standardwebhooks.webhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError as RefVerificationError

from tests.conftest import PG_ADMIN_URL, _pg_url, s3_client
from tests.conftest import run_cli as cli
from tests.s3server import MotoServer, TcpProxy
from tests.test_worker import Receiver, run_worker
from tests.wire import call
from vodpush.cli import main
from vodpush.config import Settings
from vodpush.crypto import SecretBox, generate_key
from vodpush.persistence import db
from vodpush.persistence.models import UploadRequest
from vodpush.service import Service
from vodpush.webhooks import WebhookVerificationError, standard_webhooks_secret, verify
from vodpush.worker.runner import Worker


@dataclass
class Creds:
    cdn: int
    username: str
    api_key: str
    api_secret: str
    id: int


def make(
    service: Service,
    root: Path,
    username: str,
    *,
    cdn: int = 158,
    s3: Any = None,
    buckets: tuple[str, ...] = (),
) -> Creds:
    created = service.accounts.create(cdn=cdn, username=username, s3=s3)
    if buckets:
        service.accounts.allow_buckets(created["api_key"], list(buckets))
    (root / "sestore1" / username).mkdir(exist_ok=True)
    return Creds(**created)


def put_file(root: Path, username: str, name: str, data: bytes) -> str:
    path = root / "sestore1" / username / name
    path.write_bytes(data)
    return f"sestore1/{username}/{name}"


def upload(url: str, creds: Creds, path: str, bucket: str, key: str, **extra: Any) -> dict:
    fields = {"acl": "private", **extra}
    return call(url, creds, "aws.upload", path=path, destination_path=key, bucket=bucket, **fields)


def new_bucket(s3: MotoServer, prefix: str) -> str:
    name = f"{prefix}-{uuid.uuid4().hex[:12]}"
    s3_client(s3).create_bucket(Bucket=name)
    return name


def keys(s3: MotoServer, bucket: str) -> list[str]:
    listed = s3_client(s3).list_objects_v2(Bucket=bucket)
    return [o["Key"] for o in listed.get("Contents", [])]


def row(service: Service, request_id: int) -> Any:
    t = UploadRequest.__table__
    with service.engine.connect() as conn:
        return conn.execute(select(t).where(t.c.id == request_id)).one()


def statuses(url: str, creds: Creds) -> list[dict]:
    answer = call(url, creds, "aws.status", limit=100)
    assert answer["status"] == "success", answer
    return answer["data"]


@pytest.fixture
def operator_s3(monkeypatch: pytest.MonkeyPatch, s3: MotoServer) -> MotoServer:
    """The operator's default credentials (boto3's AWS_* environment) reach the moto server,
    and every bucket on it, as an installation's default credentials reach its buckets."""
    env = {
        "AWS_ENDPOINT_URL": s3.url,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": "/dev/null",
        "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    return s3


# -- 1. buckets belong to accounts ----------------------------------------------------------


def test_account_without_credentials_cannot_write_outside_its_buckets(
    live_server, service, sestore_root, operator_s3
):
    s3 = operator_s3
    victim_bucket = new_bucket(s3, "tenant-a")
    operator_bucket = new_bucket(s3, "operator")
    own = f"b{uuid.uuid4().hex[:8]}"
    b_bucket = new_bucket(s3, own)
    # A has its own credentials; B has none (operator defaults) and may use own-*.
    make(service, sestore_root, "alice", s3=s3.settings(), buckets=(victim_bucket,))
    mallory = make(service, sestore_root, "mallory", buckets=(f"{own}-*",))
    path = put_file(sestore_root, "mallory", "payload.mp4", b"mallory was here")

    attacks = [
        (victim_bucket, "private"),
        (victim_bucket, "public-read"),  # ... and make it public
        (operator_bucket, "public-read"),
        (f"{own}x-other", "private"),  # near the pattern, not on it
    ]
    for bucket, acl in attacks:
        answer = upload(live_server.url, mallory, path, bucket, "owned.mp4", acl=acl)
        assert answer["status"] == "failure", answer
        assert answer["code"] == "0005"
        assert bucket in answer["message"] and "operator" in answer["message"]
    assert statuses(live_server.url, mallory) == []  # nothing was queued

    answer = upload(live_server.url, mallory, path, b_bucket, "mine.mp4", acl="public-read")
    assert answer["status"] == "success", answer
    run_worker(service)

    assert keys(s3, victim_bucket) == []
    assert keys(s3, operator_bucket) == []
    assert keys(s3, b_bucket) == ["mine.mp4"]
    body = s3_client(s3).get_object(Bucket=b_bucket, Key="mine.mp4")["Body"].read()
    assert body == b"mallory was here"
    [record] = statuses(live_server.url, mallory)
    assert record["state"] == "succeeded"


def test_empty_list_without_credentials_uploads_nowhere(
    live_server, service, sestore_root, operator_s3
):
    bucket = new_bucket(operator_s3, "anything")
    nobody = make(service, sestore_root, "nobody")
    path = put_file(sestore_root, "nobody", "a.mp4", b"x")
    answer = upload(live_server.url, nobody, path, bucket, "a.mp4")
    assert answer["status"] == "failure" and answer["code"] == "0005"
    assert bucket in answer["message"] and "may not write to any bucket" in answer["message"]
    run_worker(service)
    assert keys(operator_s3, bucket) == []


def test_own_credentials_with_empty_list_reach_their_buckets_and_a_list_still_applies(
    live_server, service, sestore_root, s3
):
    first, second = new_bucket(s3, "own-one"), new_bucket(s3, "own-two")
    owner = make(service, sestore_root, "owner", s3=s3.settings())
    path = put_file(sestore_root, "owner", "v.mp4", b"own credentials")
    assert upload(live_server.url, owner, path, first, "v.mp4")["status"] == "success"
    run_worker(service)
    assert keys(s3, first) == ["v.mp4"]

    # A non-empty list applies to accounts with their own credentials too.
    service.accounts.allow_buckets(owner.api_key, ["own-one-*"])
    answer = upload(live_server.url, owner, path, second, "v.mp4")
    assert answer["status"] == "failure" and answer["code"] == "0005"
    assert second in answer["message"]
    assert upload(live_server.url, owner, path, first, "w.mp4")["status"] == "success"
    run_worker(service)
    assert keys(s3, second) == []
    assert sorted(keys(s3, first)) == ["v.mp4", "w.mp4"]


def test_bucket_disallowed_after_submit_is_refused_at_claim_without_s3_call(
    live_server, service, sestore_root, operator_s3, monkeypatch, cli_env
):
    s3 = operator_s3
    # The operator's endpoint goes through a proxy, so every S3 connection is seen.
    proxy = TcpProxy(s3.port).start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    try:
        bucket = new_bucket(s3, "revoked")
        tenant = make(service, sestore_root, "tenant", buckets=("revoked-*",))
        path = put_file(sestore_root, "tenant", "r.mp4", b"queued before the revocation")
        answer = upload(live_server.url, tenant, path, bucket, "r.mp4", acl="public-read")
        assert answer["status"] == "success", answer
        request_id = answer["data"]["id"]

        assert main(["account", "disallow-bucket", tenant.api_key, "revoked-*"]) == 0
        run_worker(service)

        done = row(service, request_id)
        assert done.state == "failed"
        assert done.error_code == "BucketNotAllowed"
        assert bucket in done.message and "operator" in done.message
        assert done.attempts == 1
        assert proxy._sockets == []  # not one connection to S3
        assert keys(s3, bucket) == []

        # The same path works once allowed again: the proxy did see that upload.
        service.accounts.allow_buckets(tenant.api_key, [bucket])
        answer = upload(live_server.url, tenant, path, bucket, "r2.mp4")
        assert answer["status"] == "success", answer
        run_worker(service)
        assert proxy._sockets != []
        assert keys(s3, bucket) == ["r2.mp4"]
    finally:
        proxy.stop()


# -- 2. usernames name directories ----------------------------------------------------------


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def empty_database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database with no schema at all (PostgreSQL: a new one, not the migrated template)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'old.db'}"
        return
    request.getfixturevalue("pg_template")  # skips, or fails under CI, without PostgreSQL
    name = f"vodpush_old_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    yield _pg_url(name)
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def test_database_with_shared_usernames_upgrades_and_refuses_until_renamed(
    empty_database_url, sestore_root, s3, tmp_path, monkeypatch, capsys, caplog
):
    """Two accounts with one username on different CDNs (allowed before 0003) both read
    sestore1/jb/. After the upgrade the service runs, refuses to read files for either,
    and works again once the operator renames one."""
    key = generate_key()
    box = SecretBox(key)
    engine = db.make_engine(empty_database_url)
    db.upgrade(engine, "0002")
    now = "2026-11-20 10:00:00.000000"
    secrets = {}
    with engine.begin() as conn:
        for account_id, cdn in ((1, 100), (2, 200)):
            secrets[account_id] = f"{account_id:064x}"
            conn.execute(
                text(
                    "INSERT INTO accounts (id, cdn, username, api_key, api_secret_enc, enabled, "
                    "s3_endpoint_url, s3_region, s3_access_key_id, s3_secret_access_key_enc, "
                    "s3_checksums, created_at, updated_at) VALUES (:id, :cdn, 'jb', :key, "
                    ":secret, true, :endpoint, 'us-east-1', 'testing', :s3secret, true, "
                    ":now, :now)"
                ),
                {
                    "id": account_id,
                    "cdn": cdn,
                    "key": f"KEY{account_id:029d}",
                    "secret": box.encrypt(secrets[account_id]),
                    "endpoint": s3.url,
                    "s3secret": box.encrypt("testing"),
                    "now": now,
                },
            )
        bucket = new_bucket(s3, "shared")
        # A request account 2 queued before the upgrade, for a file in sestore1/jb/.
        conn.execute(
            text(
                "INSERT INTO upload_requests (account_id, cdn_id, path, destination_path, "
                "bucket, acl, metadata_json, callback, signature, state, message, "
                "http_status, created_at, updated_at, attempts, not_before, bytes_done) "
                "VALUES (2, 200, 'sestore1/jb/secret.mp4', 'stolen.mp4', :bucket, "
                "'private', '{}', '', 'sig-old', 'queued', 'Queued', 0, :now, :now, 0, "
                ":now, 0)"
            ),
            {"bucket": bucket, "now": now},
        )
    if engine.dialect.name == "postgresql":
        with engine.begin() as conn:
            conn.execute(text("SELECT setval('accounts_id_seq', 2)"))
    engine.dispose()
    (sestore_root / "sestore1" / "jb").mkdir()
    path = put_file(sestore_root, "jb", "secret.mp4", b"whose file is this?")

    settings = Settings(
        database_url=empty_database_url,
        sestore_root=sestore_root,
        secret_key=key,
        secret_key_file=tmp_path / "unused.key",
        poll_interval=0.1,
    )
    service = Service.open(settings)  # upgrades to head: must not fail
    try:
        assert any(getattr(r, "action", None) == "migrate.shared_usernames" for r in caplog.records)
        with service.engine.connect() as conn:
            indexes = {ix["name"] for ix in inspect(conn).get_indexes("accounts")}
        assert "ix_accounts_username" not in indexes
        assert all(a.username_shared for a in service.accounts.list())

        from tests.conftest import LiveServer
        from vodpush.api.app import create_app

        server = LiveServer(create_app(service))
        server.start()
        try:
            one = Creds(100, "jb", f"KEY{1:029d}", secrets[1], 1)
            two = Creds(200, "jb", f"KEY{2:029d}", secrets[2], 2)
            for creds in (one, two):
                answer = upload(server.url, creds, path, bucket, "again.mp4")
                assert answer["status"] == "failure" and answer["code"] == "0005"
                assert "rename" in answer["message"]
            run_worker(service)
            old = row(service, 1)
            assert old.state == "failed" and old.error_code == "UsernameShared"
            assert "rename" in old.message
            assert keys(s3, bucket) == []

            monkeypatch.setenv("VODPUSH_DATABASE_URL", empty_database_url)
            monkeypatch.setenv("VODPUSH_SECRET_KEY", key)
            code, _, err = cli(capsys, "migrate")
            assert code == 0 and "shared by several accounts: jb" in err
            code, out, _ = cli(capsys, "account", "list", "--json")
            assert code == 0 and [a["username_shared"] for a in json.loads(out)] == [True, True]
            code, out, err = cli(capsys, "account", "rename", "200/jb", "jb-two")
            assert code == 0, err
            assert json.loads(out)["username"] == "jb-two"
            with service.engine.connect() as conn:
                unique = {ix["name"]: ix["unique"] for ix in inspect(conn).get_indexes("accounts")}
            assert unique.get("ix_accounts_username")  # created once the data allows it
            code, out, err = cli(capsys, "account", "rename", "200/jb-two", "jb")
            assert code == 1 and "exists" in err

            # The account keeping the name works again; the renamed one cannot reach
            # sestore1/jb/ any more.
            answer = upload(server.url, one, path, bucket, "mine.mp4")
            assert answer["status"] == "success", answer
            two.username = "jb-two"
            answer = upload(server.url, two, path, bucket, "stolen.mp4")
            assert answer["status"] == "failure" and answer["code"] == "0007"
            run_worker(service)
            assert keys(s3, bucket) == ["mine.mp4"]
        finally:
            server.stop()
    finally:
        service.close()


def test_username_unique_across_cdns(cli_env, capsys):
    assert cli(capsys, "account", "create", "--cdn", "1", "--username", "jb")[0] == 0
    code, _, err = cli(capsys, "account", "create", "--cdn", "2", "--username", "jb")
    assert code == 1 and "username 'jb' exists" in err and "cdn 1" in err
    # A trailing newline is not a username ("$" would have let it through).
    code, _, err = cli(capsys, "account", "create", "--cdn", "2", "--username", "kim\n")
    assert code == 1 and "username" in err


# -- 3. a disabled account stops ------------------------------------------------------------


def test_disabled_account_uploads_are_held_and_resume_on_enable(
    live_server, service, s3_account, s3, bucket, sestore_root, cli_env, capsys
):
    ids = []
    for n in range(3):
        path = put_file(sestore_root, "jb", f"held{n}.mp4", f"clip {n}".encode())
        answer = upload(live_server.url, s3_account, path, bucket, f"held{n}.mp4")
        assert answer["status"] == "success", answer
        ids.append(answer["data"]["id"])
    assert cli(capsys, "account", "disable", s3_account.api_key)[0] == 0

    run_worker(service)  # a burst worker finds nothing it may take, and exits
    assert keys(s3, bucket) == []
    assert [row(service, i).state for i in ids] == ["queued"] * 3
    assert [row(service, i).attempts for i in ids] == [0] * 3
    depth = json.loads(cli(capsys, "status", "--json")[1])
    assert depth["queued"] == 3 and depth["held_account_disabled"] == 3
    answer = call(live_server.url, s3_account, "aws.status")
    assert answer["status"] == "failure" and answer["code"] == "0005"

    # A running worker leaves them alone, and takes them as soon as the account is enabled.
    worker = Worker(service)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        time.sleep(1.0)  # ten poll intervals
        assert keys(s3, bucket) == []
        assert cli(capsys, "account", "enable", s3_account.api_key)[0] == 0
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(keys(s3, bucket)) < 3:
            time.sleep(0.1)
    finally:
        worker.stop(grace=0)
        thread.join(10)
    assert sorted(keys(s3, bucket)) == ["held0.mp4", "held1.mp4", "held2.mp4"]
    assert [row(service, i).state for i in ids] == ["succeeded"] * 3
    assert json.loads(cli(capsys, "status", "--json")[1])["held_account_disabled"] == 0


def test_disabled_account_callbacks_are_held_and_go_out_on_enable(
    live_server, service, s3_account, bucket, sestore_root, cli_env, capsys
):
    receiver = Receiver()  # not listening yet: the first delivery fails
    path = put_file(sestore_root, "jb", "cb.mp4", b"callback")
    answer = upload(live_server.url, s3_account, path, bucket, "cb.mp4", callback=receiver.url)
    assert answer["status"] == "success", answer
    request_id = answer["data"]["id"]
    worker = Worker(service)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and row(service, request_id).callback_attempts < 1:
            time.sleep(0.05)
        assert cli(capsys, "account", "disable", s3_account.api_key)[0] == 0
        time.sleep(0.5)  # a delivery already under way (refused at once) has ended
        receiver.start()
        attempts = row(service, request_id).callback_attempts
        time.sleep(1.5)  # five times the retry delay (0.3 s)
        held = row(service, request_id)
        assert receiver.received == []
        assert held.callback_state == "pending" and held.callback_attempts == attempts
        depth = json.loads(cli(capsys, "status", "--json")[1])
        assert depth["callbacks_held_account_disabled"] == 1

        assert cli(capsys, "account", "enable", s3_account.api_key)[0] == 0
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not receiver.received:
            time.sleep(0.05)
    finally:
        worker.stop(grace=0)
        thread.join(10)
        receiver.stop()
    assert len(receiver.received) == 1
    headers, body = receiver.received[0]
    assert Webhook(standard_webhooks_secret(s3_account.api_secret)).verify(body, headers)
    assert row(service, request_id).callback_state == "delivered"


# -- 4. a webhook secret apart from the API secret ------------------------------------------


def test_callbacks_signed_with_the_account_webhook_secret(
    live_server, service, s3_account, bucket, sestore_root, cli_env, capsys
):
    code, out, _ = cli(capsys, "account", "rotate-webhook-secret", s3_account.api_key)
    assert code == 0
    whsec = json.loads(out)["webhook_secret"]
    assert whsec.startswith("whsec_")
    code, out, _ = cli(capsys, "account", "list", "--json")
    assert whsec not in out and json.loads(out)[0]["own_webhook_secret"] is True
    with service.engine.connect() as conn:
        stored = conn.execute(text("SELECT * FROM accounts")).mappings().one()
    assert whsec not in json.dumps({k: str(v) for k, v in stored.items()})

    receiver = Receiver().start()
    try:
        path = put_file(sestore_root, "jb", "wh.mp4", b"webhook")
        answer = upload(live_server.url, s3_account, path, bucket, "wh.mp4", callback=receiver.url)
        assert answer["status"] == "success", answer
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not receiver.received:
            run_worker(service)
        assert len(receiver.received) == 1
        headers, body = receiver.received[0]
        # The relay holding only the webhook secret verifies, with either library ...
        assert Webhook(whsec).verify(body, headers)["id"] == answer["data"]["id"]
        verify(whsec, headers, body)
        # ... and the API secret no longer does.
        with pytest.raises(RefVerificationError):
            Webhook(standard_webhooks_secret(s3_account.api_secret)).verify(body, headers)
        with pytest.raises(WebhookVerificationError):
            verify(s3_account.api_secret, headers, body)

        # --clear goes back to the API secret.
        code, out, _ = cli(capsys, "account", "rotate-webhook-secret", "--clear", "158/jb")
        assert code == 0 and json.loads(out)["webhook_secret"] == "api_secret"
        answer = upload(live_server.url, s3_account, path, bucket, "wh2.mp4", callback=receiver.url)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and len(receiver.received) < 2:
            run_worker(service)
        headers, body = receiver.received[1]
        verify(s3_account.api_secret, headers, body)
        with pytest.raises(WebhookVerificationError):
            verify(whsec, headers, body)
    finally:
        receiver.stop()


def test_migration_0003_downgrades_and_upgrades_again(empty_database_url):
    from alembic import command
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from vodpush.persistence.models import Base

    engine = db.make_engine(empty_database_url)
    try:
        db.upgrade(engine)
        command.downgrade(db.alembic_config(engine), "0002")
        with engine.connect() as conn:
            columns = {c["name"] for c in inspect(conn).get_columns("accounts")}
        assert "allowed_buckets" not in columns and "webhook_secret_enc" not in columns
        db.upgrade(engine)
        with engine.connect() as conn:
            assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
    finally:
        engine.dispose()
