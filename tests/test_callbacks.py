"""Callback deliveries against real HTTP(S) receivers on 127.0.0.1, plus the pure parts
(payload, URL normalization, address policy, retry schedule).

No test sends a packet anywhere but loopback: an autouse fixture makes any lookup of an
outside name or any connection to a non-loopback address fail the test. Addresses of the
wider world appear only as literals given to the pure policy function, or behind a
MockTransport that never touches the network.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import ipaddress
import json
import random
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from standardwebhooks.webhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError as RefVerificationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.netguard import NetworkLog, guard_network
from vodpush.callbacks.delivery import DeliveryAttempt, deliver
from vodpush.callbacks.payload import Delivery, build_delivery
from vodpush.callbacks.policy import (
    CallbackURLError,
    is_public_address,
    normalize_callback_url,
    refusal_reason,
)
from vodpush.callbacks.schedule import next_delivery
from vodpush.core.retry import DEFAULT_CALLBACK_SCHEDULE, RetryDecision
from vodpush.webhooks import WebhookVerificationError, standard_webhooks_secret, verify

SECRET = "receiver-knows-this-api-secret"
RECORD: dict[str, Any] = {
    "id": 42,
    "cdn_id": 7,
    "path": "sestore3/alice/films/é.mp4",
    "destination_path": "films/é.mp4",
    "metadata": {"title": "Łódź 東京"},
    "acl": "private",
    "callback": "www.example.com/hook",
    "message": "Successfully Uploaded to AWS",
    "results": {"ETag": '"abc"', "Location": "https://b.s3.amazonaws.com/films/%C3%A9.mp4"},
    "created": "2024-05-01 10:00:00",
    "last_updated": "2024-05-01 10:05:00",
    "status": 200,
}


def fresh_delivery(secret: str = SECRET, *, now: float | None = None) -> Delivery:
    return build_delivery(RECORD, secret, "msg_test", time.time() if now is None else now)


# -- network guard ------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def network(monkeypatch: pytest.MonkeyPatch) -> NetworkLog:
    """Allow lookups of localhost and connections to loopback only; log both."""
    return guard_network(monkeypatch)


def fake_dns(table: dict[str, Sequence[str]]) -> Callable[[str, int], Sequence[str]]:
    calls: list[str] = []

    def resolve(host: str, port: int) -> Sequence[str]:
        calls.append(host)
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return table[host]

    resolve.calls = calls  # type: ignore[attr-defined]
    return resolve


# -- receivers ----------------------------------------------------------------------------


@dataclasses.dataclass
class Seen:
    path: str
    headers: dict[str, str]
    body: bytes


class Receiver:
    """A customer's webhook endpoint: Starlette under uvicorn, in a thread."""

    def __init__(self) -> None:
        self.seen: list[Seen] = []
        self.port = 0
        self.scheme = "http"

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"{self.scheme}://{host}:{self.port}{path}"

    async def _record(self, request: Request) -> bytes:
        body = await request.body()
        self.seen.append(Seen(request.url.path, dict(request.headers), body))
        return body

    async def hook(self, request: Request) -> Response:
        await self._record(request)
        return PlainTextResponse("thanks")

    async def verified(self, request: Request) -> Response:
        # What a customer writes: verify with the reference library or answer 400.
        body = await self._record(request)
        try:
            Webhook(standard_webhooks_secret(SECRET)).verify(body, dict(request.headers))
        except RefVerificationError as exc:
            return PlainTextResponse(f"bad webhook: {exc}", status_code=400)
        return Response(status_code=204)

    async def fail(self, request: Request) -> Response:
        await self._record(request)
        return PlainTextResponse("boom: database on fire", status_code=500)

    async def redirect(self, request: Request) -> Response:
        await self._record(request)
        return Response(status_code=302, headers={"Location": "/target"})

    async def slow(self, request: Request) -> Response:
        await self._record(request)
        until = time.monotonic() + 5
        while time.monotonic() < until and not await request.is_disconnected():
            await asyncio.sleep(0.02)
        return PlainTextResponse("too late")

    async def endless(self, request: Request) -> Response:
        await self._record(request)

        async def chunks() -> Any:
            while True:  # ends when the client goes away
                yield b"x" * 65536
                await asyncio.sleep(0.005)

        status = int(request.query_params.get("status", "500"))
        return StreamingResponse(chunks(), status_code=status, media_type="text/plain")

    def app(self) -> Starlette:
        paths = {
            "/hook": self.hook,
            "/target": self.hook,
            "/verified": self.verified,
            "/fail": self.fail,
            "/redirect": self.redirect,
            "/slow": self.slow,
            "/endless": self.endless,
        }
        return Starlette(routes=[Route(p, h, methods=["POST"]) for p, h in paths.items()])


@pytest.fixture(scope="module")
def _running_receiver() -> Iterator[Receiver]:
    yield from _serve(Receiver())


def _serve(receiver: Receiver, **ssl_files: Any) -> Iterator[Receiver]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    receiver.port = sock.getsockname()[1]
    config = uvicorn.Config(
        receiver.app(),
        log_level="warning",
        lifespan="off",
        timeout_graceful_shutdown=1,
        **ssl_files,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    give_up = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < give_up, "receiver did not start"
        time.sleep(0.01)
    try:
        yield receiver
    finally:
        server.should_exit = True
        thread.join(5)
        sock.close()


@pytest.fixture
def receiver(_running_receiver: Receiver) -> Receiver:
    _running_receiver.seen.clear()
    return _running_receiver


def _certificates(directory: Path, name: str) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for ``name``: (ca, cert, key) files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def certificate(
        subject: str, key: Any, issuer: str, issuer_key: Any, *, ca: bool
    ) -> x509.Certificate:
        now = dt.datetime.now(dt.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
                False,
            )
        )
        if ca:
            builder = builder.add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
        else:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName(subject)]), critical=False
            )
        return builder.sign(issuer_key, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = certificate("vodpush test CA", ca_key, "vodpush test CA", ca_key, ca=True)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = certificate(name, key, "vodpush test CA", ca_key, ca=False)
    pem = serialization.Encoding.PEM
    paths = directory / "ca.pem", directory / "cert.pem", directory / "key.pem"
    paths[0].write_bytes(ca_cert.public_bytes(pem))
    paths[1].write_bytes(cert.public_bytes(pem))
    paths[2].write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return paths


@pytest.fixture(scope="module")
def tls_receiver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Receiver, Path]]:
    """An https receiver whose certificate names ``receiver.test``; yields it and its CA."""
    pytest.importorskip("cryptography")
    ca, cert, key = _certificates(tmp_path_factory.mktemp("tls"), "receiver.test")
    receiver = Receiver()
    receiver.scheme = "https"
    for running in _serve(receiver, ssl_certfile=str(cert), ssl_keyfile=str(key)):
        yield running, ca


@pytest.fixture
def closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def trickler() -> Iterator[int]:
    """A raw server that starts an HTTP answer and then sends one byte every 50 ms."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(10)
    stop = threading.Event()

    def serve() -> None:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        with conn:
            conn.recv(65536)
            try:
                conn.sendall(b"HTTP/1.1 200 OK\r\nX-Pad: ")
                give_up = time.monotonic() + 10
                while not stop.is_set() and time.monotonic() < give_up:
                    conn.sendall(b"a")
                    time.sleep(0.05)
            except OSError:
                return  # the client hung up, as it should

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    listener.close()
    thread.join(5)


# -- build_delivery -----------------------------------------------------------------------


def test_build_delivery_is_compact_utf8_json_with_signed_headers() -> None:
    delivery = build_delivery(RECORD, SECRET, "msg_abc", 1_700_000_000.7)
    assert json.loads(delivery.body) == RECORD
    assert b'"metadata":{"title":"\xc5\x81\xc3\xb3d\xc5\xba ' in delivery.body  # raw UTF-8
    assert b", " not in delivery.body and b": " not in delivery.body
    assert delivery.msg_id == "msg_abc"
    assert delivery.timestamp == 1_700_000_000
    assert delivery.headers["Content-Type"] == "application/json"
    assert delivery.headers["User-Agent"].startswith("vodpush/")
    assert delivery.headers["webhook-id"] == "msg_abc"
    assert delivery.headers["webhook-timestamp"] == "1700000000"
    verify(SECRET, delivery.headers, delivery.body, now=1_700_000_000)


def test_retry_keeps_the_message_id_but_signs_a_fresh_timestamp() -> None:
    first = build_delivery(RECORD, SECRET, "msg_same", 1_700_000_000)
    later = build_delivery(RECORD, SECRET, "msg_same", 1_700_003_600)
    assert first.headers["webhook-id"] == later.headers["webhook-id"] == "msg_same"
    assert first.body == later.body
    assert first.headers["webhook-signature"] != later.headers["webhook-signature"]
    verify(SECRET, later.headers, later.body, now=1_700_003_600)
    with pytest.raises(WebhookVerificationError, match="too old"):
        verify(SECRET, first.headers, first.body, now=1_700_003_600)


def test_build_delivery_refuses_non_json_numbers() -> None:
    with pytest.raises(ValueError):
        build_delivery({"x": float("nan")}, SECRET, "msg_1", 0)


# -- delivering to a real receiver --------------------------------------------------------


def test_delivered_callback_verifies_with_both_verifiers(receiver: Receiver) -> None:
    delivery = fresh_delivery()
    attempt = deliver(delivery, receiver.url("/hook"), timeout=5, allow_private=True)

    assert attempt == DeliveryAttempt(
        at=attempt.at, ok=True, http_status=200, error=None, duration=attempt.duration
    )
    assert attempt.at.tzinfo is not None
    assert abs((dt.datetime.now(dt.UTC) - attempt.at).total_seconds()) < 5
    assert 0 < attempt.duration < 5
    [seen] = receiver.seen
    assert seen.body == delivery.body
    assert seen.headers["content-type"] == "application/json"
    assert seen.headers["user-agent"].startswith("vodpush/")
    assert seen.headers["host"] == f"127.0.0.1:{receiver.port}"
    payload = Webhook(standard_webhooks_secret(SECRET)).verify(seen.body, seen.headers)
    assert payload == RECORD
    verify(SECRET, seen.headers, seen.body)


def test_receiver_side_verification_passes_end_to_end(receiver: Receiver) -> None:
    attempt = deliver(fresh_delivery(), receiver.url("/verified"), timeout=5, allow_private=True)
    assert (attempt.ok, attempt.http_status, attempt.error) == (True, 204, None)


@pytest.mark.parametrize(
    ("spoil", "reason"),
    [
        (lambda d: dataclasses.replace(d, body=d.body.replace(b"42", b"43")), "No matching"),
        (lambda d: fresh_delivery("not-the-right-secret"), "No matching"),
        (lambda d: fresh_delivery(now=time.time() - 3600), "too old"),
    ],
    ids=["tampered-body", "wrong-secret", "old-timestamp"],
)
def test_receiver_rejects_spoiled_deliveries(
    receiver: Receiver, spoil: Callable[[Delivery], Delivery], reason: str
) -> None:
    delivery = spoil(fresh_delivery())
    attempt = deliver(delivery, receiver.url("/verified"), timeout=5, allow_private=True)
    assert not attempt.ok
    assert attempt.http_status == 400
    assert attempt.error is not None and reason in attempt.error
    [seen] = receiver.seen
    with pytest.raises(WebhookVerificationError):
        verify(SECRET, seen.headers, seen.body)


def test_url_without_scheme_means_http(receiver: Receiver) -> None:
    url = f"127.0.0.1:{receiver.port}/hook"
    attempt = deliver(fresh_delivery(), url, timeout=5, allow_private=True)
    assert attempt.ok
    assert len(receiver.seen) == 1


def test_loopback_is_refused_before_any_request(receiver: Receiver, network: NetworkLog) -> None:
    attempt = deliver(fresh_delivery(), receiver.url("/hook"), timeout=5, allow_private=False)
    assert not attempt.ok
    assert attempt.http_status is None
    assert attempt.permanent
    assert attempt.error is not None
    assert "refused" in attempt.error and "127.0.0.1" in attempt.error
    assert "loopback" in attempt.error
    assert receiver.seen == []
    assert network.connects == []


def test_name_resolving_to_loopback_is_refused(receiver: Receiver, network: NetworkLog) -> None:
    url = receiver.url("/hook", host="localhost")
    attempt = deliver(fresh_delivery(), url, timeout=5, allow_private=False)
    assert not attempt.ok and attempt.error is not None
    assert "localhost resolves to" in attempt.error and "loopback" in attempt.error
    assert "localhost" in network.lookups  # the check was made on what DNS said
    assert receiver.seen == [] and network.connects == []


def test_one_private_answer_among_public_ones_is_enough_to_refuse(network: NetworkLog) -> None:
    dns = fake_dns({"mixed.test": ["93.184.216.34", "10.0.0.1"]})
    attempt = deliver(
        fresh_delivery(), "http://mixed.test/hook", timeout=5, allow_private=False, resolver=dns
    )
    assert not attempt.ok and attempt.error is not None
    # Issue 7: the text (shown in aws.status) says why, not what the name resolves to.
    assert "private" in attempt.error and "10.0.0.1" not in attempt.error
    assert network.connects == []


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://169.254.169.254/latest/meta-data/", "link-local"),
        ("http://[::ffff:127.0.0.1]:9/hook", "loopback (IPv4-mapped 127.0.0.1)"),
        ("http://[::1]:9/hook", "loopback"),
        ("http://0.0.0.0:9/hook", "unspecified"),
    ],
)
def test_literal_private_addresses_are_refused(url: str, reason: str, network: NetworkLog) -> None:
    attempt = deliver(fresh_delivery(), url, timeout=5, allow_private=False)
    assert not attempt.ok and attempt.error is not None and reason in attempt.error
    assert network.connects == [] and network.lookups == []


def test_connection_is_pinned_to_the_checked_address(
    receiver: Receiver, network: NetworkLog
) -> None:
    dns = fake_dns({"pinned.test": ["127.0.0.1"]})
    url = receiver.url("/hook", host="pinned.test")
    attempt = deliver(fresh_delivery(), url, timeout=5, allow_private=True, resolver=dns)
    assert attempt.ok, attempt.error
    assert dns.calls == ["pinned.test"]  # type: ignore[attr-defined]
    # Nothing else resolved the name: the connection went to the address we checked...
    assert "pinned.test" not in network.lookups
    assert network.connects == [("127.0.0.1", receiver.port)]
    # ...while the receiver still saw the name it was addressed by.
    [seen] = receiver.seen
    assert seen.headers["host"] == f"pinned.test:{receiver.port}"


def test_next_checked_address_is_tried_when_one_refuses(
    receiver: Receiver, network: NetworkLog
) -> None:
    # The receiver listens on 127.0.0.1 only, so 127.0.0.2 refuses the connection.
    dns = fake_dns({"two.test": ["127.0.0.2", "127.0.0.1"]})
    url = receiver.url("/hook", host="two.test")
    attempt = deliver(fresh_delivery(), url, timeout=5, allow_private=True, resolver=dns)
    assert attempt.ok, attempt.error
    assert network.connects == [("127.0.0.2", receiver.port), ("127.0.0.1", receiver.port)]
    assert len(receiver.seen) == 1


def test_https_pinned_to_ip_still_verifies_the_certificate_name(
    tls_receiver: tuple[Receiver, Path], network: NetworkLog
) -> None:
    receiver, ca = tls_receiver
    receiver.seen.clear()
    dns = fake_dns({"receiver.test": ["127.0.0.1"], "impostor.test": ["127.0.0.1"]})
    with httpx.Client(verify=ssl.create_default_context(cafile=str(ca))) as client:
        good = deliver(
            fresh_delivery(),
            receiver.url("/verified", host="receiver.test"),
            timeout=5,
            allow_private=True,
            client=client,
            resolver=dns,
        )
        wrong_name = deliver(
            fresh_delivery(),
            receiver.url("/verified", host="impostor.test"),
            timeout=5,
            allow_private=True,
            client=client,
            resolver=dns,
        )
    assert (good.ok, good.http_status) == (True, 204), good.error
    assert receiver.seen[0].headers["host"] == f"receiver.test:{receiver.port}"
    assert not wrong_name.ok and wrong_name.http_status is None
    assert wrong_name.error is not None and "certificate" in wrong_name.error.lower()
    assert len(receiver.seen) == 1
    assert {host for host, _ in network.connects} == {"127.0.0.1"}


def test_redirect_is_not_followed(receiver: Receiver) -> None:
    attempt = deliver(fresh_delivery(), receiver.url("/redirect"), timeout=5, allow_private=True)
    assert not attempt.ok
    assert attempt.http_status == 302
    assert attempt.error == "redirect not followed: HTTP 302 to /target"
    assert [s.path for s in receiver.seen] == ["/redirect"]


def test_redirect_is_not_followed_even_by_a_client_that_would(receiver: Receiver) -> None:
    with httpx.Client(follow_redirects=True) as client:
        attempt = deliver(
            fresh_delivery(),
            receiver.url("/redirect"),
            timeout=5,
            allow_private=True,
            client=client,
        )
    assert (attempt.ok, attempt.http_status) == (False, 302)
    assert [s.path for s in receiver.seen] == ["/redirect"]


def test_server_error_is_a_failed_attempt_with_its_status(receiver: Receiver) -> None:
    attempt = deliver(fresh_delivery(), receiver.url("/fail"), timeout=5, allow_private=True)
    assert not attempt.ok
    assert attempt.http_status == 500
    assert attempt.error == "HTTP 500: boom: database on fire"
    assert not attempt.permanent


def test_slow_receiver_times_out_in_about_the_timeout(receiver: Receiver) -> None:
    attempt = deliver(fresh_delivery(), receiver.url("/slow"), timeout=0.5, allow_private=True)
    assert not attempt.ok
    assert attempt.http_status is None
    assert attempt.error == "timed out after 0.5 s"
    assert 0.4 <= attempt.duration < 1.5
    assert len(receiver.seen) == 1


def test_trickling_receiver_cannot_stretch_the_timeout(trickler: int) -> None:
    # Each byte arrives well within a per-read timeout; only an overall deadline stops it.
    url = f"http://127.0.0.1:{trickler}/hook"
    attempt = deliver(fresh_delivery(), url, timeout=0.5, allow_private=True)
    assert not attempt.ok
    assert attempt.error == "timed out after 0.5 s"
    assert 0.4 <= attempt.duration < 1.5


def test_endless_error_body_is_not_read(receiver: Receiver) -> None:
    url = receiver.url("/endless?status=500")
    attempt = deliver(fresh_delivery(), url, timeout=3, allow_private=True)
    assert attempt.http_status == 500
    assert attempt.error is not None and attempt.error.startswith("HTTP 500: xxxx")
    assert len(attempt.error) <= 220
    assert attempt.duration < 1.5


def test_endless_success_body_is_not_read(receiver: Receiver) -> None:
    url = receiver.url("/endless?status=200")
    attempt = deliver(fresh_delivery(), url, timeout=3, allow_private=True)
    assert (attempt.ok, attempt.http_status) == (True, 200)
    assert attempt.duration < 1.5


def test_receiver_down_is_a_failed_attempt(closed_port: int) -> None:
    url = f"http://127.0.0.1:{closed_port}/hook"
    attempt = deliver(fresh_delivery(), url, timeout=2, allow_private=True)
    assert not attempt.ok
    assert attempt.http_status is None
    assert attempt.error is not None and attempt.error.startswith("connection failed:")
    assert not attempt.permanent
    assert attempt.duration < 1.5


def test_dns_failure_is_a_failed_attempt() -> None:
    dns = fake_dns({})
    attempt = deliver(
        fresh_delivery(), "http://nowhere.test/", timeout=2, allow_private=False, resolver=dns
    )
    assert not attempt.ok and not attempt.permanent
    assert attempt.error is not None
    assert attempt.error.startswith("DNS lookup of nowhere.test failed")


def test_hung_dns_counts_against_the_timeout() -> None:
    release = threading.Event()

    def hung(host: str, port: int) -> Sequence[str]:
        release.wait(5)
        return ["127.0.0.1"]

    try:
        attempt = deliver(
            fresh_delivery(),
            "http://slow-dns.test/",
            timeout=0.3,
            allow_private=True,
            resolver=hung,
        )
    finally:
        release.set()
    assert not attempt.ok and attempt.error is not None
    assert "timed out" in attempt.error
    assert attempt.duration < 1


@pytest.mark.parametrize(
    "url", ["", "ftp://example.com/x", "javascript:alert(1)", "http://", "http://exa mple.com/"]
)
def test_unusable_url_is_a_permanent_failure(url: str, network: NetworkLog) -> None:
    attempt = deliver(fresh_delivery(), url, timeout=2, allow_private=True)
    assert not attempt.ok and attempt.permanent
    assert attempt.error is not None and attempt.error.startswith("invalid callback URL:")
    assert network.lookups == [] and network.connects == []


def test_attempt_serializes_for_storage() -> None:
    attempt = DeliveryAttempt(
        at=dt.datetime(2024, 5, 1, tzinfo=dt.UTC),
        ok=False,
        http_status=500,
        error="HTTP 500",
        duration=0.12345,
    )
    assert attempt.to_dict() == {
        "at": "2024-05-01T00:00:00+00:00",
        "ok": False,
        "http_status": 500,
        "error": "HTTP 500",
        "duration": 0.123,
        "permanent": False,
    }


# -- the request as the transport sees it (MockTransport: no network) --------------------


def _mock_client(answer: Callable[[httpx.Request], httpx.Response]) -> tuple[httpx.Client, list]:
    requests: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        return answer(request)

    return httpx.Client(transport=httpx.MockTransport(handler)), requests


def test_https_request_goes_to_the_ip_with_host_header_and_sni() -> None:
    client, requests = _mock_client(lambda r: httpx.Response(204))
    dns = fake_dns({"hooks.example.com": ["93.184.216.34"]})
    delivery = fresh_delivery()
    with client:
        attempt = deliver(
            delivery,
            "https://hooks.example.com/v1/vodpush?x=1",
            timeout=5,
            allow_private=False,
            client=client,
            resolver=dns,
        )
    assert (attempt.ok, attempt.http_status) == (True, 204)
    [request] = requests
    assert request.method == "POST"
    assert str(request.url) == "https://93.184.216.34/v1/vodpush?x=1"
    assert request.headers["host"] == "hooks.example.com"
    assert request.extensions["sni_hostname"] == "hooks.example.com"
    assert request.content == delivery.body
    assert request.headers["webhook-id"] == "msg_test"
    verify(SECRET, request.headers, request.content)


def test_ipv6_pin_and_http_without_sni() -> None:
    client, requests = _mock_client(lambda r: httpx.Response(200))
    dns = fake_dns({"hooks.example.com": ["2606:2800:220:1:248:1893:25c8:1946"]})
    with client:
        attempt = deliver(
            fresh_delivery(),
            "hooks.example.com:8080/hook",
            timeout=5,
            allow_private=False,
            client=client,
            resolver=dns,
        )
    assert attempt.ok
    [request] = requests
    assert request.url.netloc == b"[2606:2800:220:1:248:1893:25c8:1946]:8080"
    assert request.headers["host"] == "hooks.example.com:8080"
    assert "sni_hostname" not in request.extensions


def test_https_to_an_ip_literal_has_no_sni_name() -> None:
    client, requests = _mock_client(lambda r: httpx.Response(200))
    with client:
        attempt = deliver(
            fresh_delivery(),
            "https://93.184.216.34/hook",
            timeout=5,
            allow_private=False,
            client=client,
        )
    assert attempt.ok
    assert "sni_hostname" not in requests[0].extensions


def test_transport_errors_become_failed_attempts() -> None:
    def broken(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadError("connection reset by peer")

    client, _ = _mock_client(broken)
    with client:
        attempt = deliver(
            fresh_delivery(),
            "https://93.184.216.34/hook",
            timeout=5,
            allow_private=False,
            client=client,
        )
    assert not attempt.ok and attempt.http_status is None
    assert attempt.error == "ReadError: connection reset by peer"


# -- URL normalization and the address policy (pure) --------------------------------------


@pytest.mark.parametrize(
    ("given", "used"),
    [
        ("www.example.com/hook", "http://www.example.com/hook"),
        ("  www.example.com/hook  ", "http://www.example.com/hook"),
        ("example.com:8080/cb?a=1", "http://example.com:8080/cb?a=1"),
        ("//example.com/cb", "http://example.com/cb"),
        ("HTTPS://Example.COM/Cb#frag", "https://example.com/Cb"),
        ("https://example.com", "https://example.com"),
        ("localhost:8000", "http://localhost:8000"),
    ],
)
def test_normalize_callback_url(given: str, used: str) -> None:
    assert normalize_callback_url(given) == used


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "   ",
        "ftp://example.com/",
        "file:///etc/passwd",
        "mailto:me@example.com",
        "javascript:alert(1)",
        "http://",
        "http://exa mple.com/",
        "http://a\nb/",
        "http://example.com:99999/",
        "http://example.com:0/",
        "http://ex%41mple.com/",
    ],
)
def test_normalize_refuses_unusable_urls(bad: str) -> None:
    with pytest.raises(CallbackURLError):
        normalize_callback_url(bad)


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", "loopback"),
        ("10.0.0.1", "private"),
        ("192.168.1.1", "private"),
        ("172.16.0.1", "private"),
        ("169.254.169.254", "link-local"),
        ("::1", "loopback"),
        ("fe80::1", "link-local"),
        ("fc00::1", "private"),
        ("fd12:3456::1", "private"),
        ("::ffff:127.0.0.1", "loopback (IPv4-mapped 127.0.0.1)"),
        ("::ffff:10.1.2.3", "private (IPv4-mapped 10.1.2.3)"),
        ("::ffff:169.254.169.254", "link-local (IPv4-mapped 169.254.169.254)"),
        ("100.64.0.1", "shared (CGNAT)"),
        ("100.127.255.254", "shared (CGNAT)"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("240.0.0.1", "reserved"),
        ("fec0::1", "site-local"),
        ("64:ff9b::a00:1", "private (NAT64 10.0.0.1)"),
        ("2002:7f00:1::", "loopback (6to4 127.0.0.1)"),
        ("192.0.2.10", "private"),  # documentation range: Python files it under private
    ],
)
def test_non_public_addresses_are_refused(address: str, reason: str) -> None:
    assert refusal_reason(address) == reason
    assert refusal_reason(ipaddress.ip_address(address)) == reason
    assert not is_public_address(address)


@pytest.mark.parametrize(
    "address",
    [
        "93.184.216.34",
        "8.8.8.8",
        "100.128.0.1",
        "2606:2800:220:1:248:1893:25c8:1946",
        "::ffff:93.184.216.34",
        "64:ff9b::5db8:d822",
    ],
)
def test_public_addresses_are_allowed(address: str) -> None:
    assert refusal_reason(address) is None
    assert is_public_address(address)


# -- retry policy (pure) ------------------------------------------------------------------
# A decision is a delay, not a time: the store puts it on its own clock.


def test_schedule_gives_each_retry_its_delay_then_gives_up() -> None:
    schedule = list(DEFAULT_CALLBACK_SCHEDULE)
    for attempts_made, delay in enumerate(schedule, start=1):
        decision = next_delivery(attempts_made, schedule, jitter=0)
        assert decision == RetryDecision(retry=True, delay=delay)
    assert next_delivery(len(schedule) + 1, schedule) == RetryDecision(False, None)
    assert next_delivery(100, schedule) == RetryDecision(False, None)


def test_default_schedule_spans_hours() -> None:
    assert list(DEFAULT_CALLBACK_SCHEDULE) == [10, 60, 300, 1800, 3600, 7200, 14400, 28800]
    assert sum(DEFAULT_CALLBACK_SCHEDULE) > 10 * 3600


def test_empty_schedule_means_a_single_attempt() -> None:
    assert next_delivery(1, []) == RetryDecision(retry=False, delay=None)


class _Extreme:
    def __init__(self, pick_high: bool) -> None:
        self.pick_high = pick_high

    def uniform(self, a: float, b: float) -> float:
        return b if self.pick_high else a


def test_jitter_stays_within_its_fraction() -> None:
    high = next_delivery(3, [10, 60, 300], jitter=0.1, rng=_Extreme(True))
    low = next_delivery(3, [10, 60, 300], jitter=0.1, rng=_Extreme(False))
    assert high.delay == pytest.approx(330)
    assert low.delay == pytest.approx(270)

    rng = random.Random(1234)
    delays = set()
    for _ in range(500):
        decision = next_delivery(5, DEFAULT_CALLBACK_SCHEDULE, rng=rng)
        assert decision.retry and decision.delay is not None
        assert 3600 * 0.9 <= decision.delay <= 3600 * 1.1
        delays.add(round(decision.delay))
    assert len(delays) > 50  # the jitter really spreads retries out


def test_default_rng_is_used_when_none_given() -> None:
    decision = next_delivery(1, [100])
    assert decision.delay is not None
    assert 90 <= decision.delay <= 110


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"attempts_made": 0}, "at least 1"),
        ({"jitter": 1.0}, "jitter"),
        ({"jitter": -0.1}, "jitter"),
        ({"schedule": [10, -1]}, "schedule"),
        ({"schedule": [float("inf")]}, "schedule"),
    ],
)
def test_bad_retry_arguments_are_refused(kwargs: dict[str, Any], message: str) -> None:
    args: dict[str, Any] = {"attempts_made": 1, "schedule": [10]} | kwargs
    with pytest.raises(ValueError, match=message):
        next_delivery(**args)
