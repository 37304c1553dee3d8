"""Less for an attacker to learn (issue 7, item 9): callback URLs that can never be delivered
are refused at submit, error texts do not tell what internal names resolve to, /metrics can
be moved off the API port or put behind a token, names are matched in full.

No test sends a packet anywhere but loopback: the `network` fixture lets only `localhost`
and loopback literals reach the real resolver and only loopback be connected to (the other
lookups fail as a name that does not exist would), and records both.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from tests.conftest import LiveServer, free_port
from tests.netguard import NetworkLog, guard_network
from tests.wire import call
from vodpush.api.app import create_app
from vodpush.callbacks.delivery import deliver
from vodpush.callbacks.payload import build_delivery
from vodpush.callbacks.policy import CallbackURLError, check_destination
from vodpush.core.accounts import S3Settings
from vodpush.metrics import authorized
from vodpush.persistence.queue import QueueStore
from vodpush.worker.runner import Worker

FILE = "sestore1/jb/clip.mp4"


@pytest.fixture
def network(monkeypatch: pytest.MonkeyPatch) -> NetworkLog:
    return guard_network(monkeypatch, missing="Name or service not known")


@pytest.fixture
def customer(service, account, sestore_root: Path):
    """An account with S3 credentials of its own (so that no bucket rule stands in the way
    of the field under test) and a file to upload; nothing here contacts S3."""
    service.accounts.set_s3(
        account.api_key,
        S3Settings(
            endpoint_url="http://127.0.0.1:9",
            region="us-east-1",
            access_key_id="AKIATEST",
            secret_access_key="not-used-here",
        ),
    )
    clip = sestore_root / "sestore1" / "jb" / "clip.mp4"
    clip.write_bytes(b"x" * 1000)
    return account


def upload(url: str, creds: Any, **overrides: Any) -> dict[str, Any]:
    fields = {
        "path": FILE,
        "destination_path": "clip.mp4",
        "bucket": "my-bucket",
        "acl": "private",
        "callback": "",
        **overrides,
    }
    return call(url, creds, "aws.upload", **fields)


# -- callbacks refused at submit -------------------------------------------------------------

UNDELIVERABLE = [
    ("http://127.0.0.1/", "loopback"),
    ("http://127.0.0.1:8080/hook", "loopback"),
    ("127.0.0.1:8080/hook", "loopback"),  # no scheme means http://
    ("http://[::1]/", "loopback"),
    ("http://[0:0:0:0:0:0:0:1]/", "loopback"),
    ("http://10.0.0.1/", "private"),
    ("https://192.168.1.1:8443/x", "private"),
    ("http://100.64.0.1/", "shared"),
    ("http://169.254.169.254/latest/meta-data/", "link-local"),
    ("http://[fe80::1%25eth0]/", "link-local"),
    ("http://0/", "unspecified"),
    ("http://localhost/", "loopback"),
    ("http://LOCALHOST:9/hook", "loopback"),
    ("http://x.invalid/", "does not resolve"),
    ("http://hooks.example.onion/", "does not resolve"),
    ("http://[::ffff:127.0.0.1]/", "loopback"),
    ("http://[::ffff:7f00:1]/", "loopback"),
    ("http://[::ffff:a9fe:a9fe]/", "link-local"),
    ("http://[64:ff9b::7f00:1]/", "loopback"),
    ("http://[::127.0.0.1]/", "reserved"),
    ("http://2130706433/", "loopback"),  # decimal 127.0.0.1
    ("http://017700000001/", "loopback"),  # octal
    ("http://0x7f000001/", "loopback"),  # hexadecimal
    ("http://0x7f.1/", "loopback"),
    ("http://127.1/", "loopback"),
    ("http://127.0.0.1./", "loopback"),
    ("http://unknown-name.test/", "does not resolve"),  # NXDOMAIN (the guard answers it)
]


@pytest.mark.parametrize(("url", "why"), UNDELIVERABLE)
def test_undeliverable_callbacks_are_refused_at_submit(
    live_server, service, customer, network, url, why
):
    service.settings.callback_allow_private = False
    answer = upload(live_server.url, customer, callback=url)
    assert answer["status"] == "failure" and answer["code"] == "0007", answer
    assert answer["message"].startswith("invalid callback: ")
    assert why in answer["message"]
    if not _is_literal(url):
        # A name: the answer says why, never what it resolves to.
        assert "127.0.0.1" not in answer["message"] and "::1" not in answer["message"]
    assert QueueStore(service.engine).depth()["queued"] == 0
    # Refused before any connection; reserved names without even a lookup.
    assert [c for c in network.connects if c[1] != live_server.port] == []
    if why == "does not resolve" and url.endswith(("invalid/", "onion/")):
        assert not [h for h in network.lookups if "invalid" in h or "onion" in h]


def _is_literal(url: str) -> bool:
    host = httpx.URL(url if "://" in url else "http://" + url).host
    return host not in ("localhost",) and not host.endswith((".invalid", ".onion", ".test"))


def test_allow_private_accepts_internal_receivers_but_not_impossible_names(
    live_server, service, customer, network
):
    assert service.settings.callback_allow_private  # the test settings allow it
    for url in ("http://127.0.0.1:9/hook", "http://10.0.0.1/hook", "localhost:9/x"):
        answer = upload(live_server.url, customer, callback=url)
        assert answer["status"] == "success", (url, answer)
    answer = upload(live_server.url, customer, callback="http://x.invalid/")
    assert answer["code"] == "0007" and "callback" in answer["message"]
    # Names are not looked up at submit under allow_private (the workers' DNS decides).
    answer = upload(live_server.url, customer, callback="http://internal-only.test/")
    assert answer["status"] == "success"
    assert "internal-only.test" not in network.lookups
    assert QueueStore(service.engine).depth()["queued"] == 4


def test_a_hung_dns_lookup_at_submit_is_bounded_and_leaves_the_server_responsive(
    live_server, service, customer, network, monkeypatch
):
    service.settings.callback_allow_private = False
    guarded = socket.getaddrinfo
    release = threading.Event()

    def slow_dns(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host == "slow.test":
            release.wait(10)  # a DNS server that does not answer
        return guarded(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", slow_dns)
    result: dict[str, Any] = {}

    def submit() -> None:
        started = time.monotonic()
        result["answer"] = upload(live_server.url, customer, callback="http://slow.test/hook")
        result["took"] = time.monotonic() - started

    thread = threading.Thread(target=submit)
    thread.start()
    try:
        time.sleep(0.3)  # the upload is now waiting for DNS, in a worker thread
        started = time.monotonic()
        health = httpx.get(live_server.url + "/healthz", timeout=5)
        assert health.status_code == 200 and time.monotonic() - started < 1.0
        thread.join(10)
    finally:
        release.set()
    # No answer is no proof: accepted after the bounded wait; the delivery checks again.
    assert result["answer"]["status"] == "success", result
    assert 1.5 < result["took"] < 6, result["took"]


def fake_dns(table: dict[str, Sequence[str] | int]):
    def resolve(host: str, port: int) -> list[str]:
        answer = table.get(host, socket.EAI_NONAME)
        if isinstance(answer, int):
            raise socket.gaierror(answer, "lookup failed")
        return list(answer)

    return resolve


def test_check_destination_policy_with_a_given_resolver():
    dns = fake_dns(
        {
            "hooks.example": ["2606:4700::1", "93.184.216.34"],
            "mixed.example": ["93.184.216.34", "10.9.8.7"],
            "mapped.example": ["::ffff:10.9.8.7"],
            "flaky.example": socket.EAI_AGAIN,
            "empty.example": [],
        }
    )

    def check(url: str) -> str:
        return check_destination(url, allow_private=False, timeout=2, resolver=dns)

    assert check("hooks.example/cb") == "http://hooks.example/cb"
    assert check("http://flaky.example/") == "http://flaky.example/"  # for now: no proof
    for url, why in (
        ("http://mixed.example/", "mixed.example resolves to a non-public address (private)"),
        ("http://mapped.example/", "resolves to a non-public address (private (IPv4-mapped))"),
        ("http://nxdomain.example/", "the host nxdomain.example does not resolve"),
        ("http://empty.example/", "does not resolve"),
    ):
        with pytest.raises(CallbackURLError) as caught:
            check(url)
        assert why in str(caught.value)
        assert "10.9.8.7" not in str(caught.value)


# -- error texts a customer reads --------------------------------------------------------------


def test_callback_error_in_status_does_not_tell_what_a_name_resolves_to(
    live_server, service, s3_account, s3, bucket, sestore_root, network
):
    path = sestore_root / "sestore1" / "jb" / "c.mp4"
    path.write_bytes(b"c" * 2000)
    # Accepted while private receivers were allowed; the operator then forbids them (or the
    # name's DNS changed): the delivery refuses, and says so without the address.
    answer = upload(
        live_server.url,
        s3_account,
        path="sestore1/jb/c.mp4",
        bucket=bucket,
        callback=f"http://localhost:{free_port()}/hook",
    )
    assert answer["status"] == "success", answer
    service.settings.callback_allow_private = False
    worker = Worker(service)
    thread = threading.Thread(target=worker.run, kwargs={"burst": True})
    thread.start()
    thread.join(60)
    assert not thread.is_alive()
    record = call(live_server.url, s3_account, "aws.status", id=answer["data"]["id"])["data"][0]
    assert record["state"] == "succeeded" and record["callback_state"] == "failed", record
    error = record["callback_error"]
    assert "localhost resolves to a non-public address (loopback)" in error
    assert "127.0.0.1" not in error and "::1" not in error


def test_delivery_errors_never_carry_the_resolved_address():
    """Whatever the HTTP stack says about a failed connection, the address a name resolved
    to is taken out of the text (shown to the customer in aws.status)."""

    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError(f"cannot reach {request.url.host}:{request.url.port}")

    delivery = build_delivery({"id": 1}, "secret", "msg_1", time.time())
    with httpx.Client(transport=httpx.MockTransport(refuse)) as client:
        attempt = deliver(
            delivery,
            "http://hook.example:8080/cb",
            timeout=2,
            allow_private=True,
            client=client,
            resolver=fake_dns({"hook.example": ["10.20.30.40"]}),
        )
    assert attempt.error is not None and attempt.error.startswith("connection failed:")
    assert "10.20.30.40" not in attempt.error
    assert "(an address of hook.example):8080" in attempt.error


# -- names matched in full ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("bucket", "mybucket\n"),
        ("bucket", "mybucket\r\n"),
        ("bucket", "my\nbucket"),
        ("metadata", {"title\n": "x"}),
    ],
)
def test_trailing_newlines_are_refused(live_server, customer, service, field, value):
    answer = upload(live_server.url, customer, **{field: value})
    assert answer["status"] == "failure" and answer["code"] == "0007", answer
    # The field is named: "invalid bucket: ...", or for a metadata key the whole-payload
    # check's "invalid key ... in metadata: ...".
    message = answer["message"]
    assert message.startswith(f"invalid {field}: ") or f" in {field}: " in message, message
    assert QueueStore(service.engine).depth()["queued"] == 0


def test_metadata_value_with_a_trailing_newline_travels_encoded():
    from vodpush.metadata import decode_value, encode_value

    assert encode_value("plain") == "plain"
    encoded = encode_value("ends with newline\n")
    assert "\n" not in encoded and decode_value(encoded) == "ends with newline\n"


# -- /metrics ----------------------------------------------------------------------------------


def test_bearer_token_check():
    assert authorized("Bearer s3cret", "s3cret")
    assert authorized("bearer s3cret", "s3cret")  # the scheme is case-insensitive
    for header in (None, "", "s3cret", "Basic s3cret", "Bearer s3cre", "Bearer s3cret2"):
        assert not authorized(header, "s3cret"), header


def test_metrics_token_on_the_api_port(service):
    service.settings.metrics_token = SecretStr("scrape-token")
    server = LiveServer(create_app(service))
    server.start()
    try:
        url = server.url + "/metrics"
        for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "scrape-token"}):
            refused = httpx.get(url, headers=headers)
            assert refused.status_code == 401, headers
            assert refused.headers["www-authenticate"].startswith("Bearer")
            assert "vodpush" not in refused.text
        ok = httpx.get(url, headers={"Authorization": "Bearer scrape-token"})
        assert ok.status_code == 200 and "vodpush_queue_depth" in ok.text
        assert httpx.get(server.url + "/healthz").status_code == 200  # untouched
    finally:
        server.stop()


def test_metrics_on_their_own_port_with_vodpush_serve(service, tmp_path):
    api_port, metrics_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("VODPUSH_")}
    env.update(
        {
            "VODPUSH_DATABASE_URL": service.settings.database_url,
            "VODPUSH_SECRET_KEY": service.settings.secret_key.get_secret_value(),
            "VODPUSH_SESTORE_ROOT": str(service.settings.sestore_root),
            "VODPUSH_METRICS_HOST": "127.0.0.1",
            "VODPUSH_METRICS_PORT": str(metrics_port),
            "VODPUSH_METRICS_TOKEN": "scrape-token",
        }
    )
    log = tmp_path / "serve.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "vodpush", "serve", "--no-worker", "--port", str(api_port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log.open("wb"),
    )
    api = f"http://127.0.0.1:{api_port}"
    metrics = f"http://127.0.0.1:{metrics_port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, log.read_text()[-2000:]
            try:
                httpx.get(api + "/healthz", timeout=1)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, log.read_text()[-2000:]
                time.sleep(0.1)
        # Not on the API port any more, with or without the token.
        moved = httpx.get(api + "/metrics", headers={"Authorization": "Bearer scrape-token"})
        assert moved.status_code == 404
        assert httpx.get(metrics + "/metrics").status_code == 401
        wrong = httpx.get(metrics + "/metrics", headers={"Authorization": "Bearer wrong"})
        assert wrong.status_code == 401
        ok = httpx.get(metrics + "/metrics", headers={"Authorization": "Bearer scrape-token"})
        assert ok.status_code == 200
        assert ok.headers["content-type"].startswith("text/plain")
        assert 'vodpush_queue_depth{state="queued"} 0.0' in ok.text
        other = httpx.get(metrics + "/", headers={"Authorization": "Bearer scrape-token"})
        assert other.status_code == 404
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
    assert code == 0, log.read_text()[-2000:]
    assert "scrape-token" not in log.read_text()


def test_config_masks_the_metrics_token(monkeypatch, capsys, tmp_path):
    from vodpush.cli import main

    monkeypatch.setenv("VODPUSH_DATABASE_URL", f"sqlite:///{tmp_path / 'v.db'}")
    monkeypatch.setenv("VODPUSH_METRICS_TOKEN", "scrape-token-value")
    monkeypatch.setenv("VODPUSH_METRICS_PORT", "9464")
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    assert "scrape-token-value" not in out and '"metrics_port": 9464' in out
