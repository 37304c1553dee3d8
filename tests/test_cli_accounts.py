"""The operator CLI for accounts, driven through main(argv), and secrets at rest."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import text

from tests.conftest import run_cli as run
from vodpush.persistence.accounts import ENCRYPTED_COLUMNS
from vodpush.persistence.models import Account, Base


def test_account_lifecycle(cli_env, capsys, service, caplog):
    caplog.set_level(logging.DEBUG)
    code, out, err = run(capsys, "account", "create", "--cdn", "158", "--username", "jb")
    assert code == 0, err
    created = json.loads(out)
    assert set(created) >= {"cdn", "username", "api_key", "api_secret"}
    assert created["cdn"] == 158 and created["username"] == "jb"
    assert len(created["api_key"]) == 32 and created["api_key"].isalnum()
    assert len(created["api_secret"]) == 64

    code, out, _ = run(capsys, "account", "list", "--json")
    assert code == 0
    listed = json.loads(out)
    assert listed[0]["api_key"] == created["api_key"]
    assert created["api_secret"] not in out

    code, out, _ = run(capsys, "account", "list")
    assert code == 0 and "jb" in out and created["api_secret"] not in out

    code, out, _ = run(capsys, "account", "disable", created["api_key"])
    assert code == 0 and json.loads(out)["enabled"] is False
    assert service.accounts.find(created["api_key"]).enabled is False
    code, out, _ = run(capsys, "account", "enable", "158/jb")
    assert code == 0 and json.loads(out)["enabled"] is True

    code, out, _ = run(capsys, "account", "rotate-secret", created["api_key"])
    rotated = json.loads(out)
    assert rotated["api_secret"] != created["api_secret"]
    account = service.accounts.find(created["api_key"])
    assert service.accounts.api_secret(account) == rotated["api_secret"]

    # No secret ever reaches the logs.
    for secret in (created["api_secret"], rotated["api_secret"]):
        assert secret not in caplog.text


def test_secrets_are_encrypted_at_rest(cli_env, capsys, service):
    code, out, _ = run(
        capsys,
        "account",
        "create",
        "--cdn",
        "7",
        "--username",
        "s3user",
        "--s3-endpoint",
        "http://127.0.0.1:9000",
        "--s3-access-key-id",
        "AKIAEXAMPLE",
        "--s3-secret-access-key",
        "very-secret-s3-key",
        "--s3-sse",
        "aws:kms",
        "--s3-sse-kms-key-id",
        "kms-key-1",
    )
    assert code == 0
    created = json.loads(out)
    with service.engine.connect() as conn:
        row = conn.execute(text("SELECT * FROM accounts")).mappings().one()
    dumped = json.dumps({k: str(v) for k, v in row.items()})
    assert created["api_secret"] not in dumped
    assert "very-secret-s3-key" not in dumped
    record = service.accounts.find("7/s3user")
    assert record.s3.secret_access_key == "very-secret-s3-key"
    assert "very-secret-s3-key" not in repr(record)
    code, out, _ = run(capsys, "account", "list", "--json")
    assert "very-secret-s3-key" not in out and "**********" in out


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["account", "create", "--cdn", "1", "--username", "../x"], "username"),
        (["account", "disable", "NOPE"], "no such account"),
        (
            ["account", "create", "--cdn", "1", "--username", "a", "--s3-sse-kms-key-id", "k"],
            "aws:kms",
        ),
        (["account", "create", "--cdn", "1", "--username", "a", "--s3-endpoint", "x"], "http"),
        (["account", "create", "--cdn", "1", "--username", "jb\n"], "username"),
        (["account", "rename", "NOPE", "x"], "no such account"),
        (["account", "allow-bucket", "NOPE", "b"], "no such account"),
    ],
)
def test_user_errors_are_one_line_exit_1(cli_env, capsys, argv, needle):
    code, _, err = run(capsys, *argv)
    assert code == 1
    assert err.startswith("error: ") and needle in err
    assert "Traceback" not in err


def test_duplicate_account_is_refused(cli_env, capsys):
    assert run(capsys, "account", "create", "--cdn", "1", "--username", "a")[0] == 0
    code, _, err = run(capsys, "account", "create", "--cdn", "1", "--username", "a")
    assert code == 1 and "exists" in err


def test_bad_configuration_is_reported(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("VODPUSH_DATABASE_URL", "mysql://nope")
    code, _, err = run(capsys, "account", "list")
    assert code == 4 and "VODPUSH_DATABASE_URL" in err  # the database cannot be used
    monkeypatch.setenv("VODPUSH_DATABASE_URL", f"sqlite:///{tmp_path / 'v.db'}")
    monkeypatch.setenv("VODPUSH_TIMESTAMP_WINDOW", "soon")
    code, _, err = run(capsys, "account", "list")
    assert code == 2 and err.startswith("error: bad configuration: VODPUSH_TIMESTAMP_WINDOW")


def test_secret_key_generated_on_first_run(monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("VODPUSH_SECRET_KEY", raising=False)
    monkeypatch.setenv("VODPUSH_DATABASE_URL", f"sqlite:///{tmp_path / 'x.db'}")
    code, _, err = run(capsys, "account", "create", "--cdn", "1", "--username", "a")
    assert code == 0, err
    key = tmp_path / "vodpush.key"
    assert key.exists() and oct(key.stat().st_mode & 0o777) == "0o600"
    # The same key decrypts on the next run.
    assert run(capsys, "account", "rotate-secret", "1/a")[0] == 0


def test_config_masks_secrets(cli_env, capsys, monkeypatch):
    monkeypatch.setenv("VODPUSH_DATABASE_URL", "postgresql://user:hunter2@db.example/vodpush")
    code, out, _ = run(capsys, "config")
    assert code == 0
    assert "hunter2" not in out
    assert cli_env.secret_key.get_secret_value() not in out


def test_toml_config_file(monkeypatch, capsys, tmp_path: Path):
    config = tmp_path / "vodpush.toml"
    config.write_text("timestamp_window = 60\nport = 9999\n")
    monkeypatch.setenv("VODPUSH_CONFIG", str(config))
    monkeypatch.setenv("VODPUSH_PORT", "8081")  # environment wins over the file
    code, out, _ = run(capsys, "config")
    shown = json.loads(out)
    assert code == 0 and shown["timestamp_window"] == 60 and shown["port"] == 8081


def test_migrations_match_models(service):
    with service.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []


def test_bucket_allow_list(cli_env, capsys, service):
    assert run(capsys, "account", "create", "--cdn", "1", "--username", "a")[0] == 0
    code, out, err = run(capsys, "account", "allow-bucket", "1/a", "cust-*", "media", "cust-*")
    assert code == 0, err
    assert json.loads(out)["allowed_buckets"] == ["cust-*", "media"]
    assert service.accounts.find("1/a").may_use_bucket("cust-films") is None
    assert service.accounts.find("1/a").may_use_bucket("other") is not None

    code, out, _ = run(capsys, "account", "list", "--json")
    assert json.loads(out)[0]["allowed_buckets"] == ["cust-*", "media"]
    code, out, _ = run(capsys, "account", "list")
    assert code == 0 and "cust-*" in out

    code, out, _ = run(capsys, "account", "disallow-bucket", "1", "media")
    assert code == 0 and json.loads(out)["allowed_buckets"] == ["cust-*"]
    # Removing one bucket a wildcard covers: say which pattern covers it.
    code, _, err = run(capsys, "account", "disallow-bucket", "1/a", "cust-films")
    assert code == 1 and "cust-*" in err
    assert run(capsys, "account", "disallow-bucket", "1/a", "cust-*")[0] == 0
    # Empty list, no credentials of its own: no bucket at all.
    reason = service.accounts.find("1/a").may_use_bucket("cust-films")
    assert reason is not None and "cust-films" in reason

    code, _, err = run(capsys, "account", "allow-bucket", "1/a", "*")
    assert code == 0 and "warning" in err and "every bucket" in err


@pytest.mark.parametrize(
    "pattern",
    ["", "a/b", "b" * 256, "cust-[ab", "cust-]", "[[a]]", "x[]", "bad\n", "é", "a b", "c:d"],
)
def test_absurd_bucket_patterns_are_refused(cli_env, capsys, service, pattern):
    assert run(capsys, "account", "create", "--cdn", "1", "--username", "a")[0] == 0
    code, _, err = run(capsys, "account", "allow-bucket", "1/a", "ok-*", pattern)
    assert code == 1 and err.startswith("error: ") and "bucket pattern" in err
    assert service.accounts.find("1/a").allowed_buckets == ()  # nothing half-applied


def test_rename(cli_env, capsys, service):
    assert run(capsys, "account", "create", "--cdn", "1", "--username", "a")[0] == 0
    assert run(capsys, "account", "create", "--cdn", "2", "--username", "b")[0] == 0
    code, _, err = run(capsys, "account", "rename", "1/a", "b")
    assert code == 1 and "username 'b' exists" in err
    code, _, err = run(capsys, "account", "rename", "1/a", "../b")
    assert code == 1 and "username" in err
    code, out, err = run(capsys, "account", "rename", "1/a", "a2")
    assert code == 0, err
    assert json.loads(out)["username"] == "a2"
    assert service.accounts.find("1/a2").id == 1
    assert run(capsys, "account", "rename", "1/a2", "a2")[0] == 0  # its own name is fine


def test_rotate_webhook_secret(cli_env, capsys, service, caplog):
    created = json.loads(run(capsys, "account", "create", "--cdn", "1", "--username", "a")[1])
    code, out, _ = run(capsys, "account", "rotate-webhook-secret", "1/a")
    assert code == 0
    first = json.loads(out)["webhook_secret"]
    assert first.startswith("whsec_") and len(first) == len("whsec_") + 44
    code, out, _ = run(capsys, "account", "rotate-webhook-secret", created["api_key"])
    second = json.loads(out)["webhook_secret"]
    assert second != first
    account = service.accounts.find("1/a")
    assert service.accounts.webhook_secret(account) == second
    assert service.accounts.api_secret(account) == created["api_secret"]  # untouched
    code, out, _ = run(capsys, "account", "list", "--json")
    assert second not in out and json.loads(out)[0]["own_webhook_secret"] is True
    assert second not in caplog.text and first not in caplog.text
    assert run(capsys, "account", "rotate-webhook-secret", "--clear", "1/a")[0] == 0
    account = service.accounts.find("1/a")
    assert service.accounts.webhook_secret(account) == created["api_secret"]


def test_encrypted_columns_are_listed_and_encrypted(cli_env, capsys, service):
    # The key rotation re-encrypts exactly ENCRYPTED_COLUMNS: every *_enc column is there.
    assert set(ENCRYPTED_COLUMNS) == {
        c.name for c in Account.__table__.c if c.name.endswith("_enc")
    }
    env = ["--s3-access-key-id", "AK", "--s3-secret-access-key", "s3-secret-value"]
    created = json.loads(run(capsys, "account", "create", "--cdn", "1", "--username", "a", *env)[1])
    whsec = json.loads(run(capsys, "account", "rotate-webhook-secret", "1/a")[1])["webhook_secret"]
    with service.engine.connect() as conn:
        stored = conn.execute(text("SELECT * FROM accounts")).mappings().one()
    for column in ENCRYPTED_COLUMNS:
        assert stored[column] and stored[column].startswith("gAAAA")  # Fernet tokens
    dumped = json.dumps({k: str(v) for k, v in stored.items()})
    for secret in (created["api_secret"], "s3-secret-value", whsec):
        assert secret not in dumped


def test_may_use_bucket_matches_whole_names(cli_env, capsys, service):
    assert run(capsys, "account", "create", "--cdn", "1", "--username", "a")[0] == 0
    assert run(capsys, "account", "allow-bucket", "1/a", "cust-*", "Media")[0] == 0
    account = service.accounts.find("1/a")
    assert account.may_use_bucket("cust-") is None
    assert account.may_use_bucket("Media") is None
    for bucket in ("cust-a\n", "media", "xcust-a", "cust-a/../b", "Media2", "cust-a b"):
        assert account.may_use_bucket(bucket) is not None, bucket


def test_create_prints_one_line_of_json_or_shell_exports(cli_env, capsys, service):
    code, out, err = run(capsys, "account", "create", "--cdn", "158", "--username", "jb")
    assert code == 0, err
    assert len(out.splitlines()) == 1 and json.loads(out)["username"] == "jb"
    code, out, err = run(capsys, "account", "create", "--cdn", "7", "--username", "kim", "--export")
    assert code == 0, err
    words = out.split()
    assert words[0] == "export" and len(out.splitlines()) == 1
    exported = dict(word.split("=", 1) for word in words[1:])
    assert exported["VODPUSH_CDN"] == "7"
    created = service.accounts.find(exported["VODPUSH_API_KEY"])
    assert created.username == "kim"
    assert service.accounts.api_secret(created) == exported["VODPUSH_API_SECRET"]
