"""Secrets at rest (issue 7, item 8): the database and key files are readable by their owner
only, and `vodpush secrets rotate-key` re-encrypts every secret with a new key, survives a
SIGKILL at any point, and never stops running processes from authenticating anyone.

Everything runs the real CLI (a subprocess, or cli.main in-process) against real files,
real SQLite and PostgreSQL databases (the `database_url` fixture) and a real `vodpush serve`.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select, text

from tests.conftest import Creds, free_port
from tests.wire import call
from vodpush.cli import main
from vodpush.config import Settings
from vodpush.crypto import SecretBox, fingerprint, generate_key, parse_keys, read_key_file
from vodpush.persistence.accounts import ENCRYPTED_COLUMNS
from vodpush.persistence.models import Account
from vodpush.service import Service

# -- helpers ---------------------------------------------------------------------------------


def base_env(database_url: str, tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment of a vodpush process: no VODPUSH_* from outside, the key in a file."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VODPUSH_")}
    env.update(
        {
            "VODPUSH_DATABASE_URL": database_url,
            "VODPUSH_SECRET_KEY_FILE": str(tmp_path / "keys" / "vodpush.key"),
            "VODPUSH_SESTORE_ROOT": str(tmp_path / "stores"),
            "VODPUSH_LOG_LEVEL": "info",
            "VODPUSH_POLL_INTERVAL": "0.1",
        }
    )
    env.update(extra)
    return env


def umask_022() -> None:
    os.umask(0o022)  # the usual umask: files would be world-readable without our care


def vodpush(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vodpush", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=umask_022,
    )


def start(env: dict[str, str], log: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "vodpush", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=log.open("wb"),
        text=True,
        preexec_fn=umask_022,
    )


def wait_healthy(url: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.1)
    raise AssertionError("server did not start: " + log.read_text()[-3000:])


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def key_file_settings(database_url: str, tmp_path: Path) -> Settings:
    return Settings(
        database_url=database_url,
        sestore_root=tmp_path / "stores",
        secret_key_file=tmp_path / "keys" / "vodpush.key",
    )


def make_accounts(service: Service, count: int, *, s3_every: int = 0) -> list[Creds]:
    from vodpush.core.accounts import S3Settings

    made = []
    for i in range(count):
        s3 = None
        if s3_every and i % s3_every == 0:
            s3 = S3Settings(
                endpoint_url="http://127.0.0.1:9",
                access_key_id=f"AKIA{i}",
                secret_access_key=f"s3-secret-{i}",
            )
        made.append(Creds(**service.accounts.create(cdn=100 + i, username=f"u{i}", s3=s3)))
    return made


def stored_tokens(service: Service) -> list[str]:
    table = Account.__table__
    with service.engine.connect() as conn:
        rows = conn.execute(select(*[table.c[n] for n in ENCRYPTED_COLUMNS])).all()
    return [token for row in rows for token in row if token is not None]


def authenticates(url: str, creds: Creds) -> bool:
    answer = call(url, creds, "aws.status")
    return answer["status"] == "success"


def json_lines(log: Path) -> list[dict[str, Any]]:
    entries = []
    for line in log.read_text().splitlines():
        try:
            entries.append(json.loads(line))
        except ValueError:
            continue
    return entries


@pytest.fixture
def stores(tmp_path: Path) -> Path:
    root = tmp_path / "stores"
    (root / "sestore1").mkdir(parents=True)
    return root


@pytest.fixture
def key_service(database_url: str, tmp_path: Path, stores: Path) -> Iterator[Service]:
    """A service whose keys live in the key file (the single-host default)."""
    service = Service.open(key_file_settings(database_url, tmp_path))
    yield service
    service.close()


# -- files at rest ---------------------------------------------------------------------------


def test_database_wal_shm_and_key_file_are_created_owner_only(tmp_path, stores):
    database = tmp_path / "data" / "vodpush.db"
    env = base_env(f"sqlite:///{database}", tmp_path)
    done = vodpush(env, "migrate")
    assert done.returncode == 0, done.stderr
    assert mode(database) == 0o600
    key_file = tmp_path / "keys" / "vodpush.key"
    assert mode(key_file) == 0o600

    port = free_port()
    log = tmp_path / "serve.log"
    server = start(env, log, "serve", "--no-worker", "--port", str(port))
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, server, log)
        # A write while the server holds the database open: the WAL keeps it (no process is
        # the last to close, so nothing checkpoints and removes it).
        made = vodpush(env, "account", "create", "--cdn", "1", "--username", "alice")
        assert made.returncode == 0, made.stderr
        assert authenticates(url, Creds(**json.loads(made.stdout)))
        wal = database.with_name("vodpush.db-wal")
        shm = database.with_name("vodpush.db-shm")
        assert wal.exists() and wal.stat().st_size > 0
        assert shm.exists()
        assert (mode(database), mode(wal), mode(shm)) == (0o600, 0o600, 0o600)
        # The files of the database directory: none readable by another user.
        for path in database.parent.iterdir():
            assert mode(path) & 0o077 == 0, (path, oct(mode(path)))
    finally:
        stop(server)


def test_loose_database_and_key_file_are_restricted_at_start(tmp_path, stores):
    database = tmp_path / "vodpush.db"
    env = base_env(f"sqlite:///{database}", tmp_path)
    assert vodpush(env, "migrate").returncode == 0
    key_file = tmp_path / "keys" / "vodpush.key"
    wal = tmp_path / "vodpush.db-wal"
    wal.touch()  # an empty WAL is a valid one, as an older install may have left it
    for path in (database, key_file, wal):
        path.chmod(0o644)

    port = free_port()
    log = tmp_path / "serve.log"
    server = start(env, log, "serve", "--no-worker", "--port", str(port))
    try:
        wait_healthy(f"http://127.0.0.1:{port}", server, log)
        assert wal.exists()  # in use by the server
        assert (mode(database), mode(key_file), mode(wal)) == (0o600, 0o600, 0o600)
    finally:
        stop(server)
    # The operator is told, once per file.
    told = [e for e in json_lines(log) if e.get("action") == "file.mode_restricted"]
    assert sorted(e["path"] for e in told) == sorted(map(str, (database, wal, key_file)))
    assert all(e["mode"] == "0o644" and e["new_mode"] == "0o600" for e in told)
    again = vodpush(env, "migrate")
    assert again.returncode == 0 and "restricted to its owner" not in again.stderr


# -- rotation with the key file ----------------------------------------------------------


def test_rotate_key_file_end_to_end(database_url, tmp_path, key_service):
    accounts = make_accounts(key_service, 6, s3_every=2)
    key_file = tmp_path / "keys" / "vodpush.key"
    [old] = read_key_file(key_file)
    env = base_env(database_url, tmp_path)

    done = vodpush(env, "secrets", "rotate-key")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    [new] = read_key_file(key_file)
    assert new != old and mode(key_file) == 0o600
    assert list(key_file.parent.iterdir()) == [key_file]  # no temporary file left
    assert report["reencrypted"] == 6 + 3 and report["secrets"] == 9
    assert report["keys_before"] == [fingerprint(old)]
    assert report["keys_now"] == [fingerprint(new)] and report["dropped"] == [fingerprint(old)]
    for value in (old, new):
        assert value not in done.stdout + done.stderr  # keys are never printed

    tokens = stored_tokens(key_service)
    assert len(tokens) == 9
    assert all(SecretBox([new]).key_index(t) == 0 for t in tokens)
    assert all(SecretBox([old]).key_index(t) is None for t in tokens)

    # A process started now knows only the new key, and reads every secret.
    fresh = Service.open(key_file_settings(database_url, tmp_path))
    try:
        for i, creds in enumerate(accounts):
            record = fresh.accounts.find(creds.api_key)
            assert fresh.accounts.api_secret(record) == creds.api_secret
            expected = f"s3-secret-{i}" if i % 2 == 0 else None
            assert record.s3.secret_access_key == expected
    finally:
        fresh.close()

    status = vodpush(env, "secrets", "status")
    assert status.returncode == 0, status.stderr
    shown = json.loads(status.stdout)
    assert shown["keys"] == [{"fingerprint": fingerprint(new), "encrypts": True, "secrets": 9}]
    assert shown["undecryptable"] == 0


def test_interrupted_rotation_keeps_everyone_working_and_resumes(
    database_url, tmp_path, key_service, s3, bucket
):
    """SIGKILL the rotation once the key file holds the new key and some rows moved: a
    server that started with only the old key authenticates every account, before and
    after the re-run; the re-run finishes and drops the old key."""
    accounts = make_accounts(key_service, 60)
    key_file = tmp_path / "keys" / "vodpush.key"
    [old] = read_key_file(key_file)
    env = base_env(database_url, tmp_path)

    port = free_port()
    serve_log = tmp_path / "serve.log"
    server = start(env, serve_log, "serve", "--port", str(port))  # holds the old key only
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, server, serve_log)
        assert authenticates(url, accounts[0])

        rotation = start(
            env, tmp_path / "rotate.log", "secrets", "rotate-key", "--batch-size", "2",
            "--pause", "0.05",
        )  # fmt: skip
        new = None
        moved = 0
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and rotation.poll() is None:
            keys = read_key_file(key_file)
            if len(keys) == 2:
                new = keys[0]
                moved = sum(SecretBox([new]).key_index(t) == 0 for t in stored_tokens(key_service))
                if moved >= 8:
                    break
            time.sleep(0.02)
        rotation.send_signal(signal.SIGKILL)
        rotation.wait(10)
        assert rotation.returncode == -signal.SIGKILL, "the rotation ended before the kill"

        # Killed midway: the file holds new then old, the rows are mixed.
        assert new is not None and read_key_file(key_file) == [new, old]
        assert mode(key_file) == 0o600
        tokens = stored_tokens(key_service)
        under_new = sum(SecretBox([new]).key_index(t) == 0 for t in tokens)
        under_old = sum(SecretBox([old]).key_index(t) == 0 for t in tokens)
        assert under_new >= 8 and under_old > 0 and under_new + under_old == len(tokens)

        # The running server (old key in memory) re-reads the key file: all authenticate.
        assert all(authenticates(url, creds) for creds in accounts)
        reloaded = [e for e in json_lines(serve_log) if e.get("action") == "secret_key.reloaded"]
        assert reloaded and reloaded[0]["keys"] == [fingerprint(new), fingerprint(old)]

        done = vodpush(env, "secrets", "rotate-key")  # the re-run resumes
        assert done.returncode == 0, done.stderr
        report = json.loads(done.stdout)
        assert report["resumed"] is True
        assert report["reencrypted"] == under_old
        assert report["dropped"] == [fingerprint(old)]
        assert read_key_file(key_file) == [new]
        assert all(SecretBox([new]).key_index(t) == 0 for t in stored_tokens(key_service))
        assert not list(key_file.parent.glob(".*.tmp"))

        # Still everyone, on the same server; and its worker reads an S3 secret to upload.
        assert all(authenticates(url, creds) for creds in accounts)
        key_service.accounts.set_s3(accounts[0].api_key, s3.settings())
        (tmp_path / "stores" / "sestore1" / "u0").mkdir(parents=True)
        (tmp_path / "stores" / "sestore1" / "u0" / "v.mp4").write_bytes(b"v" * 5000)
        answer = call(
            url,
            accounts[0],
            "aws.upload",
            path="sestore1/u0/v.mp4",
            destination_path="v.mp4",
            bucket=bucket,
            acl="private",
        )
        assert answer["status"] == "success", answer
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            record = call(url, accounts[0], "aws.status", id=answer["data"]["id"])["data"][0]
            if record["state"] in ("succeeded", "failed"):
                break
            time.sleep(0.1)
        assert record["state"] == "succeeded", record
    finally:
        stop(server)


def test_a_secret_no_key_decrypts_stops_the_rotation_before_any_key_is_dropped(
    database_url, tmp_path, key_service
):
    make_accounts(key_service, 3)
    key_file = tmp_path / "keys" / "vodpush.key"
    [old] = read_key_file(key_file)
    stray = SecretBox([generate_key()]).encrypt("written-with-a-lost-key")
    with key_service.engine.begin() as conn:
        conn.execute(text("UPDATE accounts SET api_secret_enc = :t WHERE cdn = 101"), {"t": stray})

    code_out = vodpush(base_env(database_url, tmp_path), "secrets", "rotate-key")
    assert code_out.returncode == 1
    assert code_out.stderr.strip().splitlines()[-1].startswith("error: account ")
    assert "none of the configured keys" in code_out.stderr
    assert "Traceback" not in code_out.stderr
    keys = read_key_file(key_file)
    assert len(keys) == 2 and keys[1] == old  # the old key stays: nothing is lost

    status = vodpush(base_env(database_url, tmp_path), "secrets", "status")
    assert status.returncode == 1 and json.loads(status.stdout)["undecryptable"] == 1


def test_one_rotation_at_a_time(tmp_path, stores):
    env = base_env(f"sqlite:///{tmp_path / 'v.db'}", tmp_path)
    assert vodpush(env, "migrate").returncode == 0
    fd = os.open(tmp_path / "keys", os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running rotation holds it
        busy = vodpush(env, "secrets", "rotate-key")
    finally:
        os.close(fd)
    assert busy.returncode == 1 and "another key rotation is running" in busy.stderr
    assert len(read_key_file(tmp_path / "keys" / "vodpush.key")) == 1


# -- rotation with VODPUSH_SECRET_KEY ------------------------------------------------------


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def env_keys(monkeypatch, database_url, tmp_path, stores) -> dict[str, str]:
    old = generate_key()
    for name in [k for k in os.environ if k.startswith("VODPUSH_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("VODPUSH_DATABASE_URL", database_url)
    monkeypatch.setenv("VODPUSH_SECRET_KEY", old)
    monkeypatch.setenv("VODPUSH_SESTORE_ROOT", str(stores))
    monkeypatch.setenv("VODPUSH_SECRET_KEY_FILE", str(tmp_path / "never.key"))
    return {"old": old}


def env_service(database_url: str, stores: Path, keys: str) -> Service:
    return Service.open(Settings(database_url=database_url, sestore_root=stores, secret_key=keys))


def test_env_key_rotation_in_three_steps(env_keys, capsys, monkeypatch, database_url, stores):
    old = env_keys["old"]
    service = env_service(database_url, stores, old)
    try:
        accounts = make_accounts(service, 4, s3_every=2)
        before = stored_tokens(service)
    finally:
        service.close()

    # One key in the environment: nothing changes, the steps are printed with a new key.
    code, out, err = run(capsys, "secrets", "rotate-key")
    assert code == 1 and "nothing changed" in err
    suggested = next(
        line.split("VODPUSH_SECRET_KEY=", 1)[1].split(",", 1)[0]
        for line in out.splitlines()
        if "VODPUSH_SECRET_KEY=" in line and "," in line
    )
    parse_keys(suggested, "suggested")  # a usable key
    assert old not in out and old not in err

    # Step 1 done by the operator: new first, old second, on every process.
    monkeypatch.setenv("VODPUSH_SECRET_KEY", f"{suggested},{old}")
    from tests.conftest import LiveServer
    from vodpush.api.app import create_app

    both = env_service(database_url, stores, f"{suggested},{old}")
    server = LiveServer(create_app(both))  # a process holding both keys, during step 2
    server.start()
    try:
        code, out, err = run(capsys, "secrets", "rotate-key")
        assert code == 0, err
        report = json.loads(out)
        assert report["key_source"] == "env" and report["reencrypted"] == 6
        assert fingerprint(suggested) in report["next_step"]
        assert all(authenticates(server.url, creds) for creds in accounts)
    finally:
        server.stop()
        both.close()

    # Step 3: the new key alone reads everything.
    only_new = env_service(database_url, stores, suggested)
    server = LiveServer(create_app(only_new))
    server.start()
    try:
        assert all(authenticates(server.url, creds) for creds in accounts)
        after = stored_tokens(only_new)
        assert len(after) == len(before) and not set(after) & set(before)
        for i, creds in enumerate(accounts):
            record = only_new.accounts.find(creds.api_key)
            assert record.s3.secret_access_key == (f"s3-secret-{i}" if i % 2 == 0 else None)
    finally:
        server.stop()
        only_new.close()


def test_env_key_rotation_with_new_key_option(env_keys, capsys, database_url, stores):
    old = env_keys["old"]
    service = env_service(database_url, stores, old)
    try:
        accounts = make_accounts(service, 3)
    finally:
        service.close()
    new = generate_key()

    code, _, err = run(capsys, "secrets", "rotate-key", "--new-key", "not-a-key")
    assert code == 1 and "--new-key" in err and "not a Fernet key" in err

    code, out, err = run(capsys, "secrets", "rotate-key", "--new-key", new)
    assert code == 0, err
    assert "warning: processes still running with only the old key" in err
    assert json.loads(out)["reencrypted"] == 3
    only_new = env_service(database_url, stores, new)
    try:
        for creds in accounts:
            record = only_new.accounts.find(creds.api_key)
            assert only_new.accounts.api_secret(record) == creds.api_secret
    finally:
        only_new.close()


# -- the key list ----------------------------------------------------------------------------


def test_key_lists_parse_and_never_echo_a_key():
    a, b = generate_key(), generate_key()
    assert parse_keys(f" {a} , {b},{a}", "env") == [a, b]
    assert parse_keys(f"# newest first\n{b}\n\n{a}\n", "file") == [b, a]
    with pytest.raises(ValueError, match="key 2 is not a Fernet key") as caught:
        parse_keys(f"{a},{a[:-4]}", "VODPUSH_SECRET_KEY")
    assert a[:-4] not in str(caught.value)
    with pytest.raises(ValueError, match="holds no key"):
        parse_keys(" , \n", "VODPUSH_SECRET_KEY")

    box = SecretBox([b, a])
    token_a = SecretBox([a]).encrypt("s")
    assert box.decrypt(token_a) == "s" and box.key_index(token_a) == 1
    assert box.key_index(box.rotate(token_a)) == 0
    assert a not in repr(box) and b not in repr(box)
