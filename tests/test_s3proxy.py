"""The fault proxy of tests/s3server.py (used by the fault tests and bench/soak.py): down
means down at once, "reset" resets connections mid-request, "slow" delays, "pass" heals."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from tests.s3server import ModalProxy

pytestmark = pytest.mark.integration


class _Sink(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_PUT(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def proxy() -> Iterator[ModalProxy]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Sink)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    proxy = ModalProxy(server.server_address[1], seed=1).start()
    yield proxy
    proxy.stop()
    server.shutdown()
    server.server_close()


def put(proxy: ModalProxy, size: int) -> int:
    return httpx.put(proxy.url, content=b"x" * size, timeout=10).status_code


def test_stop_refuses_the_very_next_connection(proxy: ModalProxy) -> None:
    assert put(proxy, 10) == 200
    for _ in range(3):
        proxy.stop()
        with pytest.raises(httpx.ConnectError):
            put(proxy, 10)
        proxy.start()
        assert put(proxy, 10) == 200


def test_reset_mode_resets_mid_request_and_pass_heals(proxy: ModalProxy) -> None:
    proxy.set_mode("reset", fraction=1.0, max_bytes=64 * 1024)
    with pytest.raises(httpx.TransportError):
        put(proxy, 1024 * 1024)
    assert proxy.resets == 1
    proxy.set_mode("pass")
    assert put(proxy, 1024 * 1024) == 200


def test_slow_mode_delays_each_chunk(proxy: ModalProxy) -> None:
    proxy.set_mode("slow", delay=0.3)
    started = time.monotonic()
    assert put(proxy, 10) == 200
    assert time.monotonic() - started >= 0.6  # the request and the answer each held
    proxy.set_mode("pass")
    with pytest.raises(ValueError):
        proxy.set_mode("flaky")
