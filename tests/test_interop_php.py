"""The real PHP example client from the reference page (php-cli + curl, multipart body,
json_encode) against a live server."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import IN_CI

PHP_CLIENT = Path(__file__).parent / "interop" / "seed_client.php"


def _php_ready() -> str | None:
    if shutil.which("php") is None:
        return "php-cli is not installed (apt-get install php-cli php-curl)"
    modules = subprocess.run(["php", "-m"], capture_output=True, text=True).stdout.split()
    if "curl" not in modules:
        return "php-curl is not installed"
    return None


@pytest.fixture(scope="module")
def php() -> str:
    reason = _php_ready()
    if reason:
        if IN_CI:
            pytest.fail(f"{reason} (.ci/run installs it)")
        pytest.skip(reason)
    return "php"


def run_php(php: str, server_url: str, creds, command: str, secret: str | None = None, **fields):
    env = {
        **os.environ,
        "VODPUSH_URL": server_url + "/stable/",
        "VODPUSH_COMMAND": command,
        "VODPUSH_API_KEY": creds.api_key,
        "VODPUSH_API_SECRET": secret or creds.api_secret,
        "VODPUSH_CDN": str(creds.cdn),
        "VODPUSH_REQUEST": json.dumps(fields),
    }
    done = subprocess.run(
        [php, str(PHP_CLIENT)], env=env, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout)


def test_php_seed_client_uploads_and_reads_status(php, live_server, account, sestore_root):
    video = sestore_root / "sestore1" / "jb" / "dir with space" / "vidéo.mp4"
    video.parent.mkdir(parents=True)
    video.write_bytes(b"php")
    answer = run_php(
        php,
        live_server.url,
        account,
        "aws.upload",
        path="sestore1/jb/dir with space/vidéo.mp4",
        destination_path="shows/2026/vidéo.mp4",
        bucket="my-bucket",
        acl="public-read",
        metadata={"title": "Café / Crème", "path": "a/b/c", "emoji": "🎬"},
        callback="www.example.com/hook",
    )
    assert answer["status"] == "success", answer
    status = run_php(php, live_server.url, account, "aws.status", limit=25, offset=0)
    assert status["status"] == "success", status
    (record,) = status["data"]
    assert record["id"] == answer["data"]["id"]
    assert record["metadata"] == {"title": "Café / Crème", "path": "a/b/c", "emoji": "🎬"}
    assert record["destination_path"] == "shows/2026/vidéo.mp4"


def test_php_seed_client_empty_metadata_array(php, live_server, account, sestore_root):
    (sestore_root / "sestore1" / "jb" / "a.mp4").write_bytes(b"a")
    answer = run_php(
        php,
        live_server.url,
        account,
        "aws.upload",
        path="sestore1/jb/a.mp4",
        destination_path="a.mp4",
        bucket="my-bucket",
        acl="private",
        metadata=[],
    )
    assert answer["status"] == "success", answer


def test_php_seed_client_wrong_secret_reads_0003(php, live_server, account):
    answer = run_php(php, live_server.url, account, "aws.status", secret="f" * 64)
    assert answer["status"] == "failure"
    assert answer["code"] == "0003"
