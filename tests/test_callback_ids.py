"""One webhook-id per delivery (issue 9, item 6), against a real HTTP receiver on loopback:
a retry after an HTTP 500 and a re-send by another worker after the first one lost its
callback lease (frozen with SIGSTOP mid-POST) both reach the receiver with the id the first
POST carried, and every POST made is in the attempt history."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from standardwebhooks.webhooks import Webhook

from tests.conftest import free_port
from tests.wire import call
from vodpush.core.requests import NewRequest
from vodpush.service import Service
from vodpush.webhooks import standard_webhooks_secret
from vodpush.worker.runner import Worker


class ScriptedReceiver:
    """A customer's endpoint that answers each POST as scripted: an HTTP status, or "hold"
    (answer 204 only once ``release`` is set). Records every POST's headers and body."""

    def __init__(self, script: list[int | str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/hook"
        self.received: list[tuple[dict[str, str], bytes]] = []
        self.release = threading.Event()
        lock = threading.Lock()
        received, release = self.received, self.release

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                with lock:
                    received.append(({k.lower(): v for k, v in self.headers.items()}, body))
                    answer = script[len(received) - 1] if len(received) <= len(script) else 204
                if answer == "hold":
                    release.wait(30)
                    answer = 204
                self.send_response(int(answer))
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()

    def ids(self) -> list[str]:
        return [headers["webhook-id"] for headers, _ in self.received]

    def stop(self) -> None:
        self.release.set()
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def scripted() -> Iterator[list[ScriptedReceiver]]:
    made: list[ScriptedReceiver] = []
    yield made
    for r in made:
        r.stop()


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    pytest.fail(f"timed out waiting for {what}")


def status_of(url: str, creds, request_id: int) -> dict:
    answer = call(url, creds, "aws.status", id=request_id)
    assert answer["status"] == "success", answer
    return answer["data"][0]


def verify_all(receiver: ScriptedReceiver, api_secret: str) -> None:
    hook = Webhook(standard_webhooks_secret(api_secret))
    for headers, body in receiver.received:
        hook.verify(body, headers)


def test_a_retry_after_http_500_carries_the_same_webhook_id(
    live_server, service, s3_account, bucket, sestore_root, scripted
):
    receiver = ScriptedReceiver([500, 204])
    scripted.append(receiver)
    path = sestore_root / "sestore1" / s3_account.username / "cb.mp4"
    path.write_bytes(os.urandom(1000))
    answer = call(
        live_server.url,
        s3_account,
        "aws.upload",
        path=f"sestore1/{s3_account.username}/cb.mp4",
        destination_path="cb.mp4",
        bucket=bucket,
        acl="private",
        callback=receiver.url,
    )
    assert answer["status"] == "success", answer
    request_id = answer["data"]["id"]
    worker = Worker(service)
    thread = threading.Thread(target=worker.run)
    thread.start()
    try:
        wait_for(
            lambda: service.requests.get(request_id).callback_state == "delivered",
            30,
            "the callback to be delivered",
        )
    finally:
        worker.stop(grace=0)
        thread.join(10)
    assert len(receiver.received) == 2
    ids = receiver.ids()
    assert len(set(ids)) == 1 and ids[0].startswith("msg_")
    verify_all(receiver, s3_account.api_secret)
    record = status_of(live_server.url, s3_account, request_id)
    assert (record["callback_state"], record["callback_attempts"]) == ("delivered", 2)
    attempts = service.queue.callback_attempts(request_id)
    assert [(a["ok"], a["http_status"]) for a in attempts] == [(False, 500), (True, 204)]


def _worker_env(service: Service) -> dict[str, str]:
    s = service.settings
    return {
        **os.environ,
        "VODPUSH_DATABASE_URL": s.database_url,
        "VODPUSH_SECRET_KEY": s.secret_key.get_secret_value(),
        "VODPUSH_SESTORE_ROOT": str(s.sestore_root),
        "VODPUSH_POLL_INTERVAL": "0.1",
        # Its callback lease is 3 x the timeout: 3 s.
        "VODPUSH_CALLBACK_TIMEOUT": "1",
        "VODPUSH_CALLBACK_ALLOW_PRIVATE": "true",
        "VODPUSH_CALLBACK_SCHEDULE": "[0.3, 0.3, 0.3]",
        "VODPUSH_LOG_LEVEL": "info",
    }


def test_a_resend_after_a_lost_callback_lease_carries_the_same_webhook_id(
    live_server, service, account, scripted, tmp_path: Path
):
    # The first POST is held by the receiver while its worker is frozen (SIGSTOP) past its
    # callback lease; a second worker takes the callback over and delivers it; then the
    # first worker thaws and finishes its POST late.
    receiver = ScriptedReceiver(["hold", 204])
    scripted.append(receiver)
    queued = service.requests.enqueue(
        NewRequest(
            account_id=account.id,
            cdn_id=account.cdn,
            path=f"sestore1/{account.username}/x.mp4",
            destination_path="x.mp4",
            bucket="b",
            acl="private",
            metadata={},
            callback=receiver.url,
            signature=f"test-{time.time()}",
        )
    )
    # The upload's outcome, as an upload worker records it: this makes the callback due.
    assert service.queue.claim("uploader", 30) is not None
    service.queue.fail(
        queued.id, "uploader", message="no such file", http_status=None, code="X", has_callback=True
    )
    log = tmp_path / "first.log"
    first = subprocess.Popen(
        [sys.executable, "-m", "vodpush", "worker"],
        env=_worker_env(service),
        stdout=subprocess.DEVNULL,
        stderr=log.open("wb"),
    )
    second: Worker | None = None
    thread: threading.Thread | None = None
    try:
        wait_for(lambda: len(receiver.received) == 1, 30, "the first worker's POST")
        os.kill(first.pid, signal.SIGSTOP)
        frozen_at = time.monotonic()
        second = Worker(service)
        thread = threading.Thread(target=second.run)
        thread.start()
        wait_for(
            lambda: service.requests.get(queued.id).callback_state == "delivered",
            30,
            "the second worker to deliver the callback",
        )
        # It could only take the callback over once the first worker's lease had run out.
        assert time.monotonic() - frozen_at > 1.5
        receiver.release.set()  # the held POST gets its answer, read once its worker thaws
        os.kill(first.pid, signal.SIGCONT)
        wait_for(
            lambda: len(service.queue.callback_attempts(queued.id)) == 2,
            30,
            "the first worker's late attempt to be recorded",
        )
    finally:
        os.kill(first.pid, signal.SIGCONT)
        first.send_signal(signal.SIGTERM)
        try:
            first.wait(20)
        except subprocess.TimeoutExpired:
            first.kill()
            first.wait(5)
        if second is not None and thread is not None:
            second.stop(grace=0)
            thread.join(10)
    assert len(receiver.received) == 2
    assert len(set(receiver.ids())) == 1  # a receiver deduplicating by id sees it once
    verify_all(receiver, account.api_secret)
    record = status_of(live_server.url, account, queued.id)
    # Both POSTs are in the history and the count; the late one did not move the state.
    assert (record["callback_state"], record["callback_attempts"]) == ("delivered", 2)
    assert record["callback_error"] is None
    attempts = service.queue.callback_attempts(queued.id)
    assert len(attempts) == 2 and attempts[0]["ok"] and attempts[0]["http_status"] == 204
