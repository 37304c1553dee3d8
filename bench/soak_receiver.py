"""The soak's callback receiver: an HTTP server on 127.0.0.1 that verifies each POST as a
customer would (Standard Webhooks, the account's API secret) and records every delivery
per request, so the soak can tell a callback delivered twice.

A callback URL is ``/cb/<username>/<key>``: ``key`` is the load generator's own name of
the request. The receiver can be taken down (connections refused) and hung (it reads the
request, never answers, and drops the connection when the hang ends).
"""

from __future__ import annotations

import socket
import threading
import time
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from vodpush.webhooks import HEADER_ID, WebhookVerificationError, verify

# A hung receiver holds a request at most this long (the worker gives up far sooner).
MAX_HANG_SECONDS = 120.0


@dataclass(frozen=True)
class Delivery:
    at: float  # time.monotonic() when the POST arrived
    msg_id: str
    ok: bool  # answered 2xx: the sender was told it was delivered
    verified: bool  # the signature checked out


@dataclass(frozen=True)
class CallbackFigures:
    posts: int  # POSTs received in all
    requests: int  # requests that got at least one POST
    twice_ids: int  # requests whose POSTs carried more than one webhook-id
    after_success: int  # requests with a POST after one was answered 2xx
    bad_signatures: int  # POSTs whose signature did not verify

    @property
    def delivered_twice(self) -> int:
        return self.twice_ids + self.after_success


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a sender that hung up mid-request: nothing to tell anyone


class Receiver:
    def __init__(self, secrets: Mapping[str, str]) -> None:
        """``secrets``: username -> the key its callbacks are signed with."""
        self._secrets = dict(secrets)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self._lock = threading.Lock()
        self._deliveries: dict[str, list[Delivery]] = defaultdict(list)
        self._server: ThreadingHTTPServer | None = None
        self._released = threading.Event()
        self._released.set()

    def url(self, username: str, key: str) -> str:
        return f"http://127.0.0.1:{self.port}/cb/{username}/{key}"

    # -- faults -----------------------------------------------------------------------------

    def start(self) -> None:
        if self._server is not None:
            return
        server = _Server(("127.0.0.1", self.port), self._handler_class())
        threading.Thread(target=server.serve_forever, args=(0.2,), daemon=True).start()
        self._server = server

    def stop(self) -> None:
        """Down: the listener goes away, new connections are refused."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()

    def hang(self) -> None:
        self._released.clear()

    def release(self) -> None:
        self._released.set()

    # -- figures ----------------------------------------------------------------------------

    def deliveries(self) -> dict[str, list[Delivery]]:
        """Each request's POSTs in the order they arrived (a hung one is recorded late)."""
        with self._lock:
            return {
                key: sorted(items, key=lambda d: d.at) for key, items in self._deliveries.items()
            }

    def figures(self) -> CallbackFigures:
        twice_ids = after_success = bad = posts = 0
        deliveries = self.deliveries()
        for items in deliveries.values():
            posts += len(items)
            bad += sum(not d.verified for d in items)
            if len({d.msg_id for d in items}) > 1:
                twice_ids += 1
            first_ok = next((i for i, d in enumerate(items) if d.ok), None)
            if first_ok is not None and first_ok < len(items) - 1:
                after_success += 1
        return CallbackFigures(posts, len(deliveries), twice_ids, after_success, bad)

    # -- the server ---------------------------------------------------------------------------

    def _record(self, key: str, delivery: Delivery) -> None:
        with self._lock:
            self._deliveries[key].append(delivery)

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                arrived = time.monotonic()
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                parts = self.path.strip("/").split("/")
                if len(parts) != 3 or parts[0] != "cb" or parts[1] not in receiver._secrets:
                    self.send_error(404)
                    return
                username, key = parts[1], parts[2]
                msg_id = self.headers.get(HEADER_ID, "")
                if not receiver._released.is_set():
                    receiver._released.wait(MAX_HANG_SECONDS)
                    receiver._record(key, Delivery(arrived, msg_id, ok=False, verified=True))
                    self.close_connection = True
                    return  # no answer at all: the sender's deadline ends it
                try:
                    verify(receiver._secrets[username], self.headers, body)
                    verified = True
                except WebhookVerificationError:
                    verified = False
                try:
                    self.send_response(204 if verified else 401)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    answered = True
                except OSError:
                    answered = False  # the sender gave up first: it was not told
                receiver._record(key, Delivery(arrived, msg_id, verified and answered, verified))

            def log_message(self, format: str, *args: object) -> None:
                pass  # thousands of POSTs: the figures say what matters

        return Handler
