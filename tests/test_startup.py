"""`vodpush serve` and `vodpush migrate` as a new user meets them (issue 11, items 3 and 4),
each a real process: the exit code and the one line of each start-up failure, the
"listening" line, the log lines (JSON or console, never ANSI, uvicorn's too) with the
account, client address and request ids of every refusal and accepted upload, the warning
for a misspelt variable, what `migrate` applied, and no secret in a whole run's log."""

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
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from alembic.script import ScriptDirectory

from tests.conftest import Creds, free_port, s3_client
from tests.wire import envelope, php_style
from vodpush.config import Settings
from vodpush.core.accounts import S3Settings
from vodpush.core.requests import NewRequest
from vodpush.crypto import generate_key
from vodpush.persistence.db import alembic_config
from vodpush.service import Service

pytestmark = pytest.mark.integration

FILE = "sestore1/jb/clip.mp4"


# -- a vodpush process -----------------------------------------------------------------------


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """A new user's directory: a sestore with one file, nothing else yet."""
    clip = tmp_path / "stores" / FILE
    clip.parent.mkdir(parents=True)
    clip.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"v" * 2000)
    return tmp_path


def env_for(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("VODPUSH_")}
    env.update(
        {
            "VODPUSH_DATABASE_URL": f"sqlite:///{home / 'vodpush.db'}",
            "VODPUSH_SECRET_KEY": KEY,
            "VODPUSH_SESTORE_ROOT": str(home / "stores"),
            "VODPUSH_POLL_INTERVAL": "0.1",
            # Whatever the worker may try, it is on loopback.
            "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9",
            "AWS_EC2_METADATA_DISABLED": "true",
        }
    )
    env.update(extra)
    return env


KEY = generate_key()


def vodpush(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vodpush", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def settings_for(home: Path) -> Settings:
    return Settings(
        database_url=f"sqlite:///{home / 'vodpush.db'}",
        sestore_root=home / "stores",
        secret_key=KEY,
    )


def assert_one_error_line(done: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    """Exit ``code``; the error is the one line of stderr that is not a JSON log line."""
    assert done.returncode == code, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    plain = [line for line in done.stderr.splitlines() if not line.startswith("{")]
    assert len(plain) == 1, done.stderr[-3000:]
    assert plain[0].startswith("error: ") and all(n in plain[0] for n in needles), plain[0]
    assert plain == done.stderr.splitlines()[-1:]  # and the last line
    return plain[0]


def entries(text: str) -> list[dict[str, Any]]:
    """Every line as JSON (a line that is not fails the test)."""
    return [json.loads(line) for line in text.splitlines()]


class Served:
    """`vodpush serve ARGS` on a port of its own choosing (--port 0), its stderr in a file."""

    def __init__(self, env: dict[str, str], log: Path, *args: str) -> None:
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vodpush", "serve", "--port", "0", *args],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=log.open("wb"),
        )
        self.port = 0

    def wait_listening(self, pattern: str = r'"action": "api.listen".*"port": (\d+)') -> str:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.text()[-3000:]
            for line in self.text().splitlines():
                found = re.search(pattern, line)
                if found:
                    self.port = int(found.group(1))
                    return line
            time.sleep(0.05)
        raise AssertionError("no listening line: " + self.text()[-3000:])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def text(self) -> str:
        return self.log.read_text(errors="strict")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait(10)


@pytest.fixture
def served() -> Iterator[list[Served]]:
    running: list[Served] = []
    yield running
    for server in running:
        server.stop()


def start(served: list[Served], env: dict[str, str], log: Path, *args: str) -> Served:
    server = Served(env, log, *args)
    served.append(server)
    return server


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config(None)).get_current_head()  # type: ignore[arg-type]
    assert head is not None
    return head


# -- vodpush migrate --------------------------------------------------------------------------


def test_migrate_says_what_it_applied_then_that_nothing_was_left(home: Path) -> None:
    env = env_for(home)
    head = head_revision()
    first = vodpush(env, "migrate")
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("applied 0001 initial schema, 0002 worker state, 0003 ")
    assert "0004 faults, 0005 control" in first.stdout
    assert first.stdout.endswith(f"; database is at {head}\n")
    again = vodpush(env, "migrate")
    assert (again.returncode, again.stdout) == (0, f"database is up to date at {head}\n")


def test_migrate_from_an_older_schema_names_only_the_new_migrations(home: Path) -> None:
    from vodpush.persistence import db

    engine = db.make_engine(f"sqlite:///{home / 'vodpush.db'}")
    assert [str(m) for m in db.upgrade(engine, "0003")][-1] == "0003 account tenancy"
    engine.dispose()
    done = vodpush(env_for(home), "migrate")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("applied 0004 faults, 0005 control")
    assert done.stdout.endswith(f"; database is at {head_revision()}\n")


# -- start-up failures: one line, a code each, nothing started ---------------------------------


def test_a_busy_port_exits_3_before_the_worker_starts(home: Path) -> None:
    service = Service.open(settings_for(home))
    try:
        account = service.accounts.create(cdn=158, username="jb")
        queued = service.requests.enqueue(
            NewRequest(
                account_id=account["id"],
                cdn_id=158,
                path=FILE,
                destination_path="out.mp4",
                bucket="b",
                acl="private",
                metadata={},
                callback="",
                signature="sig-" + uuid.uuid4().hex,
            )
        )
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            done = vodpush(env_for(home), "serve", "--port", str(port))
        line = assert_one_error_line(done, 3, f"127.0.0.1:{port}", "in use")
        assert "cannot listen" in line
        logged = entries("\n".join(done.stderr.splitlines()[:-1]))  # all but the error
        assert "worker.start" not in {e.get("action") for e in logged}
        assert "api.listen" not in {e.get("action") for e in logged}
        row = service.requests.get(queued.id)
        assert row is not None and (row.state, row.attempts) == ("queued", 0)  # never claimed
    finally:
        service.close()


def test_the_metrics_port_busy_exits_3_too(home: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = env_for(home, VODPUSH_METRICS_PORT=str(port))
        done = vodpush(env, "serve", "--port", "0")
    assert_one_error_line(done, 3, "/metrics", f"127.0.0.1:{port}")


def test_an_unusable_database_exits_4_without_its_password(home: Path) -> None:
    closed = free_port()  # nothing listens there
    urls = {
        "unreachable": f"postgresql+psycopg://vodpush:hunter2@127.0.0.1:{closed}/vodpush",
        "driver": "postgresql+psycopg2://vodpush:hunter2@127.0.0.1/vodpush",
        "unparseable": "postgresql+psycopg://vodpush:hunter2@127.0.0.1:port/vodpush",
        "unsupported": "mysql://vodpush:hunter2@127.0.0.1/vodpush",
    }
    for why, url in urls.items():
        done = vodpush(env_for(home, VODPUSH_DATABASE_URL=url), "serve", "--port", "0")
        line = assert_one_error_line(done, 4)
        assert "hunter2" not in done.stderr, why
        assert {
            "unreachable": "refused",
            "driver": "psycopg2",
            "unparseable": "parsed",
            "unsupported": "VODPUSH_DATABASE_URL",
        }[why] in line, (why, line)


def test_an_unwritable_data_directory_exits_5(home: Path) -> None:
    (home / "file").write_text("a file, not a directory\n")  # root cannot write below it either
    below_a_file = home / "file" / "sub"
    done = vodpush(
        env_for(home, VODPUSH_DATABASE_URL=f"sqlite:///{below_a_file / 'vodpush.db'}"), "serve"
    )
    assert_one_error_line(done, 5, str(below_a_file), "VODPUSH_DATABASE_URL")
    # The key file's directory, when the key must be generated there.
    env = env_for(home, VODPUSH_SECRET_KEY_FILE=str(below_a_file / "vodpush.key"))
    del env["VODPUSH_SECRET_KEY"]
    done = vodpush(env, "migrate")
    assert_one_error_line(done, 5, str(below_a_file), "VODPUSH_SECRET_KEY_FILE")
    assert not (home / "vodpush.db").exists() or done.stdout == ""


def test_bad_configuration_exits_2(home: Path) -> None:
    done = vodpush(env_for(home, VODPUSH_LOG_FORMAT="xml"), "serve")
    assert_one_error_line(done, 2, "VODPUSH_LOG_FORMAT")
    done = vodpush(env_for(home), "serve", "--port", "eighty")
    assert done.returncode == 2 and "Traceback" not in done.stderr  # click's usage error


# -- the log of a running server ----------------------------------------------------------------


@pytest.fixture
def account(home: Path) -> Creds:
    service = Service.open(settings_for(home))
    try:
        created = service.accounts.create(cdn=158, username="jb")
        service.accounts.allow_buckets(created["api_key"], ["*"])
    finally:
        service.close()
    return Creds(**created)


def upload_text(account: Creds, secret: str | None = None, **fields: Any) -> str:
    payload = envelope(
        account,
        "aws.upload",
        **{
            "path": FILE,
            "destination_path": "out/clip.mp4",
            "bucket": "my-bucket",
            "acl": "private",
            **fields,
        },
    )
    return php_style(payload, secret or account.api_secret)


def test_json_log_of_a_served_api(home: Path, account: Creds, served: list[Served]) -> None:
    env = env_for(home, VODPUSH_ACCESS_LOG="true", VODPUSH_DATABSE_URL="typo")
    env["VODPUSH_\udcff"] = "a name that is not UTF-8"  # os.environ holds a lone surrogate
    server = start(served, env, home / "serve.log", "--no-worker")
    listening = json.loads(server.wait_listening())
    assert listening["port"] == server.port != 0 and listening["host"] == "127.0.0.1"
    assert httpx.get(server.url + "/healthz").status_code == 200

    # Accepted, with the client's own request id.
    answer = httpx.post(
        server.url + "/stable/",
        data={"json": upload_text(account)},
        headers={"X-Request-ID": "client-id-1"},
    )
    assert answer.headers["x-request-id"] == "client-id-1"
    request_id = answer.json()["data"]["id"]
    # Refused before authentication (wrong secret), with a request id not worth keeping.
    wrong = httpx.post(
        server.url + "/stable/",
        data={"json": upload_text(account, secret="0" * 64)},
        headers={"X-Request-ID": "not a token;" + "x" * 200},
    )
    assert wrong.json()["code"] == "0003"
    made_id = wrong.headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{16}", made_id)
    # Refused after authentication: no such file; through a proxy on loopback (trusted:
    # uvicorn's FORWARDED_ALLOW_IPS), so the address is the one it forwarded.
    missing = httpx.post(
        server.url + "/stable/",
        data={"json": upload_text(account, path="sestore1/jb/nope.mp4")},
        headers={"X-Forwarded-For": "198.51.100.7"},
    )
    assert missing.json()["code"] == "0007"
    # An unknown command, and an unreadable body.
    unknown = '{"command":"aws.nope","api_key":"k","cdn":1,"timestamp":1,"signature":"s"}'
    assert httpx.post(server.url + "/stable/", data={"json": unknown}).json()["code"] == "0000"
    assert httpx.post(server.url + "/stable/", data={"nope": "1"}).status_code == 400
    # Garbage that is not HTTP: uvicorn's own warning.
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"\x16\x03\x01 not http at all\r\n\r\n")
        sock.recv(1024)
    assert httpx.get(server.url + "/healthz").status_code == 200
    assert server.stop() == 0

    text = server.text()
    assert "\x1b" not in text and "color_message" not in text
    log = entries(text)  # every line is JSON
    assert all(list(e)[:4] == ["time", "level", "logger", "message"] for e in log)

    def having(action: str) -> list[dict[str, Any]]:
        return [e for e in log if e.get("action") == action]

    warned, not_utf8 = having("config.unknown_variable")
    assert not_utf8["variable"] == "VODPUSH_\udcff"
    assert warned["variable"] == "VODPUSH_DATABSE_URL"
    assert warned["closest"] == "VODPUSH_DATABASE_URL" in warned["message"]
    assert warned["level"] == "warning"

    (accepted,) = having("api.accepted")
    assert accepted["command"] == "aws.upload" and accepted["request_id"] == request_id
    assert (accepted["account_id"], accepted["username"]) == (account.id, "jb")
    assert (accepted["client_address"], accepted["http_request_id"]) == ("127.0.0.1", "client-id-1")

    refused = having("api.refused")
    by_code = {e["code"]: e for e in refused}
    assert set(by_code) == {"0000", "0003", "0006", "0007"}
    assert by_code["0003"]["account_id"] is None and by_code["0003"]["http_request_id"] == made_id
    assert (by_code["0007"]["account_id"], by_code["0007"]["username"]) == (account.id, "jb")
    assert by_code["0000"]["command"] == "aws.nope"
    assert by_code["0006"]["http_status"] == 400
    assert by_code.pop("0007")["client_address"] == "198.51.100.7"
    for entry in by_code.values():
        assert entry["client_address"] == "127.0.0.1" and re.fullmatch(
            r"[\w.:-]+", entry["http_request_id"]
        )

    access = having("http.access")
    posts = [e for e in access if e["method"] == "POST"]
    assert len(posts) == 5 and all(e["path"] == "/stable/" for e in posts)
    assert {e["status"] for e in posts} == {200, 400}
    assert posts[0]["http_request_id"] == "client-id-1"
    invalid = [e for e in log if e["logger"] == "uvicorn.error" and e["level"] == "warning"]
    assert any("Invalid HTTP request" in e["message"] for e in invalid)


def test_console_log_format(home: Path, account: Creds, served: list[Served]) -> None:
    env = env_for(home, VODPUSH_LOG_FORMAT="console", VODPUSH_DATABSE_URL="typo")
    server = start(served, env, home / "serve.log", "--no-worker")
    line = server.wait_listening(r"\] listening .*port=(\d+)")
    assert line.startswith(time.strftime("%Y-", time.gmtime()))
    wrong = upload_text(account, secret="0" * 64)
    assert httpx.post(server.url + "/stable/", data={"json": wrong}).json()["code"] == "0003"
    assert server.stop() == 0
    text = server.text()
    assert "\x1b" not in text and not text.lstrip().startswith("{")
    refused = [line for line in text.splitlines() if "action='api.refused'" in line]
    assert len(refused) == 1 and "client_address='127.0.0.1'" in refused[0]
    assert "http_request_id='" in refused[0] and "code='0003'" in refused[0]
    assert any("did you mean VODPUSH_DATABASE_URL?" in line for line in text.splitlines())


# -- a whole run: no secret in the log -------------------------------------------------------------


class CallbackReceiver:
    def __init__(self) -> None:
        bodies: list[bytes] = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                bodies.append(self.rfile.read(int(self.headers["content-length"])))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.bodies = bodies
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_no_secret_in_the_log_of_a_whole_run(
    home: Path, account: Creds, s3: Any, served: list[Served]
) -> None:
    bucket = f"secrets-{uuid.uuid4().hex[:12]}"
    s3_client(s3).create_bucket(Bucket=bucket)
    s3_secret = "s3-secret-" + uuid.uuid4().hex
    service = Service.open(settings_for(home))
    try:
        service.accounts.set_s3(account.api_key, s3.settings(secret_access_key=s3_secret))
        webhook_secret = service.accounts.rotate_webhook_secret(account.api_key)["webhook_secret"]
        assert isinstance(service.accounts.find(account.api_key).s3, S3Settings)
    finally:
        service.close()
    metrics_token = "metrics-token-" + uuid.uuid4().hex
    receiver = CallbackReceiver()
    try:
        env = env_for(
            home,
            VODPUSH_LOG_LEVEL="debug",
            VODPUSH_ACCESS_LOG="true",
            VODPUSH_METRICS_TOKEN=metrics_token,
            VODPUSH_CALLBACK_ALLOW_PRIVATE="true",
        )
        server = start(served, env, home / "serve.log")  # with the embedded worker
        server.wait_listening()
        sent = [
            upload_text(account, bucket=bucket, callback=receiver.url),
            upload_text(account, secret="f" * 64, bucket=bucket),  # refused: 0003
        ]
        answers = [httpx.post(server.url + "/stable/", data={"json": t}).json() for t in sent]
        assert [a["status"] for a in answers] == ["success", "failure"]
        request_id = answers[0]["data"]["id"]
        deadline = time.monotonic() + 60
        while not receiver.bodies:
            assert time.monotonic() < deadline, server.text()[-3000:]
            time.sleep(0.1)
        status = php_style(envelope(account, "aws.status", id=request_id), account.api_secret)
        sent.append(status)
        record = httpx.post(server.url + "/stable/", data={"json": status}).json()["data"][0]
        assert record["state"] == "succeeded", record
        auth = {"Authorization": f"Bearer {metrics_token}"}
        assert httpx.get(server.url + "/metrics", headers=auth).status_code == 200
        assert server.stop() == 0
    finally:
        receiver.stop()

    text = server.text()
    log = entries(text)
    actions = [e.get("action") for e in log]
    # The worker started only once the API listened.
    assert actions.index("api.listen") < actions.index("worker.start")
    assert "api.accepted" in actions and "api.refused" in actions
    signatures = [json.loads(t)["signature"] for t in sent]
    secrets = {
        "api_secret": account.api_secret,
        "s3 secret key": s3_secret,
        "webhook secret": webhook_secret,
        "webhook secret key": webhook_secret.removeprefix("whsec_"),
        "secret key": KEY,
        "metrics token": metrics_token,
        **{f"signature {i}": signature for i, signature in enumerate(signatures)},
    }
    for what, secret in secrets.items():
        assert secret not in text, f"the {what} is in the log"
        assert json.dumps(secret)[1:-1] not in text, f"the {what} is in the log (escaped)"
