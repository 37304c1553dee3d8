"""Shared fixtures: databases (SQLite and a fresh PostgreSQL database per test), a live
vodpush API on a loopback port, accounts and a sestore tree."""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
import uvicorn
from sqlalchemy import create_engine, text

from tests.iam import IamS3, start_iam_s3
from tests.pgdatabases import Databases
from tests.s3server import MotoServer
from vodpush.api.app import create_app
from vodpush.api.connections import server_config
from vodpush.cli import main
from vodpush.config import Settings
from vodpush.crypto import generate_key
from vodpush.persistence import db
from vodpush.service import Service

PG_ADMIN_URL = os.environ.get(
    "VODPUSH_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
IN_CI = os.environ.get("CI", "").lower() == "true"
# An S3 client built without credentials would ask the EC2 instance metadata service
# (169.254.169.254) for some: tests talk to loopback only.
os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
_TEMPLATE_DB = f"vodpush_template_{os.getpid()}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- PostgreSQL ---------------------------------------------------------------------------


def _pg_available() -> str | None:
    """None when PostgreSQL answers, else the reason it does not."""
    try:
        engine = create_engine(PG_ADMIN_URL, connect_args={"connect_timeout": 3})
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        engine.dispose()
    except Exception as exc:
        return f"PostgreSQL not reachable at {PG_ADMIN_URL}: {type(exc).__name__}"
    return None


@pytest.fixture(scope="session")
def pg_template() -> Iterator[Databases]:
    """A migrated template database, and the test databases copied from it."""
    reason = _pg_available()
    if reason is not None:
        if IN_CI:
            pytest.fail(f"{reason} (required under CI=true)")
        pytest.skip(reason)
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{_TEMPLATE_DB}"'))
        conn.execute(text(f'CREATE DATABASE "{_TEMPLATE_DB}"'))
    url = _pg_url(_TEMPLATE_DB)
    engine = db.make_engine(url)
    db.upgrade(engine)
    engine.dispose()
    databases = Databases(PG_ADMIN_URL, _TEMPLATE_DB)
    yield databases
    databases.close()
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{_TEMPLATE_DB}" WITH (FORCE)'))
    admin.dispose()


def _pg_url(name: str) -> str:
    return PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name


@pytest.fixture
def pg_url(pg_template: Databases) -> Iterator[str]:
    """A fresh database of this test's own: migrated, empty, a name no test had before
    (tests/pgdatabases.py)."""
    name = pg_template.take()
    yield pg_template.url(name)
    pg_template.give_back(name)


# -- SQLite --------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def _sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated SQLite file; each test gets a copy (migrating takes 0.1 to 0.3 s)."""
    path = tmp_path_factory.mktemp("sqlite-template") / "vodpush.db"
    engine = db.make_engine(f"sqlite:///{path}")
    db.upgrade(engine)
    engine.dispose()  # the last connection closed: the WAL is checkpointed into the file
    assert not path.with_name(path.name + "-wal").exists()
    return path


@pytest.fixture
def sqlite_url(_sqlite_template: Path, tmp_path: Path) -> str:
    """A fresh, migrated SQLite database of this test's own: a copy of the template."""
    path = tmp_path / "vodpush.db"
    shutil.copyfile(_sqlite_template, path)
    path.chmod(0o600)  # as vodpush creates it
    return f"sqlite:///{path}"


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest) -> str:
    """Every test that takes this runs on both backends."""
    if request.param == "sqlite":
        return request.getfixturevalue("sqlite_url")
    return request.getfixturevalue("pg_url")


# -- settings, service, sestore -----------------------------------------------------------


@pytest.fixture
def sestore_root(tmp_path: Path) -> Path:
    root = tmp_path / "stores"
    (root / "sestore1").mkdir(parents=True)
    (root / "sestore2").mkdir(parents=True)
    return root


MiB = 1024 * 1024


@pytest.fixture
def settings(database_url: str, sestore_root: Path, tmp_path: Path) -> Settings:
    # Fast worker settings for tests: S3's minimum part size, short polls and backoffs.
    return Settings(
        database_url=database_url,
        sestore_root=sestore_root,
        secret_key=generate_key(),
        secret_key_file=tmp_path / "unused.key",
        poll_interval=0.1,
        retry_base_delay=0.2,
        retry_max_delay=1.0,
        max_attempts=3,
        retry_window=0,  # a schedule of seconds: no one-hour promise
        multipart_threshold=5 * MiB,
        multipart_chunksize=5 * MiB,
        part_concurrency=4,
        lease_seconds=10,
        callback_timeout=2.0,
        callback_allow_private=True,
        callback_schedule=[0.3] * 10,
    )


@pytest.fixture
def service(settings: Settings) -> Iterator[Service]:
    svc = Service.open(settings)
    yield svc
    svc.close()


@dataclass
class Creds:
    cdn: int
    username: str
    api_key: str
    api_secret: str
    id: int


@pytest.fixture
def make_account(service: Service, sestore_root: Path) -> Any:
    def make(cdn: int = 158, username: str = "jb") -> Creds:
        created = service.accounts.create(cdn=cdn, username=username)
        # These accounts upload with the operator's default credentials (or are given S3
        # settings later): the operator lets them use every bucket. Tests of the bucket
        # rules (tests/test_tenancy.py) create their accounts without this.
        service.accounts.allow_buckets(created["api_key"], ["*"])
        (sestore_root / "sestore1" / username).mkdir(exist_ok=True)
        return Creds(**created)

    return make


@pytest.fixture
def account(make_account: Any) -> Creds:
    return make_account()


# -- the operator CLI ----------------------------------------------------------------------


@pytest.fixture
def cli_env(monkeypatch: pytest.MonkeyPatch, settings: Settings) -> Settings:
    """The vodpush command pointed at the test's database, key and sestore."""
    monkeypatch.setenv("VODPUSH_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("VODPUSH_SECRET_KEY", settings.secret_key.get_secret_value())
    monkeypatch.setenv("VODPUSH_SESTORE_ROOT", str(settings.sestore_root))
    return settings


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``vodpush ARGV`` in process: (exit code, stdout, stderr)."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# -- S3 ----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    """One moto S3 server process for the session; tests use their own buckets."""
    server = MotoServer(log_dir=tmp_path_factory.mktemp("moto")).start()
    yield server
    server.stop()


def s3_client(server: Any) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=server.url,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


@pytest.fixture(scope="session")
def iam_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[IamS3]:
    """A second moto process, enforcing IAM (tests/iam.py): keys, policies, role trust."""
    server = start_iam_s3(tmp_path_factory.mktemp("moto-iam"))
    yield server
    server.server.stop()


@pytest.fixture
def bucket(s3: MotoServer) -> str:
    name = f"bucket-{uuid.uuid4().hex[:16]}"
    s3_client(s3).create_bucket(Bucket=name)
    return name


@pytest.fixture
def versioned_bucket(s3: MotoServer, bucket: str) -> str:
    """A bucket with versioning on: every PUT or completed multipart upload of a key adds a
    version, so S3 itself counts the uploads."""
    s3_client(s3).put_bucket_versioning(
        Bucket=bucket, VersioningConfiguration={"Status": "Enabled"}
    )
    return bucket


@pytest.fixture
def s3_account(service: Service, account: Creds, s3: MotoServer) -> Creds:
    """The default account, uploading to the moto server with AES256 encryption."""
    service.accounts.set_s3(account.api_key, s3.settings(sse="AES256"))
    return account


# -- live server --------------------------------------------------------------------------


class LiveServer:
    """uvicorn serving the app on a free loopback port, in a background thread; with
    settings, configured as `vodpush serve` configures it (its connection bounds too)."""

    def __init__(self, app: Any, settings: Settings | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        if settings is None:
            config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_config=None)
        else:
            config = server_config(app, settings, host="127.0.0.1", port=self.port)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def start(self) -> None:
        self._thread.start()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self._server.started:  # listening, the app's startup done
                return
            if not self._thread.is_alive():
                break
            time.sleep(0.01)
        raise RuntimeError("server did not start")

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)


@pytest.fixture
def live_server(service: Service) -> Iterator[LiveServer]:
    server = LiveServer(create_app(service), service.settings)
    server.start()
    yield server
    server.stop()


# -- tiers ---------------------------------------------------------------------------------
#
# Every test is in one tier, told by what it needs (`pytest -m unit` runs the fast tier):
#   unit         no I/O beyond temporary files: pure functions, the in-memory stores, the
#                runner on the fake transfer step;
#   contract     the store contract (tests/test_store_contract.py) on the in-memory stores;
#   integration  a real database (SQLite file or PostgreSQL), a moto S3 process, a live HTTP
#                server or receiver, subprocesses, real clients (PHP, Perl, Ruby, curl).
# The contract tests on SQLite and PostgreSQL are integration tests too.

# Fixtures that stand for a real outside thing: a test that uses one (directly or through
# another fixture) is an integration test.
_INTEGRATION_FIXTURES = frozenset(
    {
        "database_url",
        "pg_url",
        "pg_template",
        "sqlite_url",
        "empty_database_url",
        "s3",
        "iam_s3",
        "moto",
        "live_server",
        "limited_server",
        "slow_server",
        "receiver",
        "tls_receiver",
        "_running_receiver",
        "php",
        "script",
        "trickler",
        "closed_port",
    }
)
# Modules whose tests start servers or subprocesses themselves, not through a fixture.
_INTEGRATION_MODULES = frozenset(
    {
        "test_demo",
        "test_dos",
        "test_faults",
        "test_interop_clients",
        "test_interop_php",
        "test_secrets_rotation",
        "test_uploader",
    }
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("integration"):  # marked by hand: opens sockets itself
            continue
        module = item.module.__name__.rsplit(".", 1)[-1] if item.module else ""
        fixtures = set(getattr(item, "fixturenames", ()))
        param = getattr(getattr(item, "callspec", None), "params", {})
        if (
            module in _INTEGRATION_MODULES
            or fixtures & _INTEGRATION_FIXTURES
            or param.get("stores") in ("sqlite", "postgresql")
        ):
            item.add_marker(pytest.mark.integration)
        elif module.startswith("test_store_contract"):
            item.add_marker(pytest.mark.contract)
        else:
            item.add_marker(pytest.mark.unit)


def _no_network(*args: Any, **kwargs: Any) -> None:
    raise AssertionError(
        "a unit or contract test opened a network socket: mark it @pytest.mark.integration "
        "or give it a fixture that stands for the real thing"
    )


@pytest.fixture(autouse=True)
def _tier_has_no_network(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fast tiers are checked, not trusted: their tests may not connect or listen."""
    if request.node.get_closest_marker("integration") is None:
        monkeypatch.setattr(socket.socket, "connect", _no_network)
        monkeypatch.setattr(socket.socket, "bind", _no_network)
