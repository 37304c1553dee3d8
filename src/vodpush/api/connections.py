"""How `vodpush serve` runs the API under uvicorn: its configuration, and the connection
bounds uvicorn lacks (no header read timeout, no cap on connections): GuardedHttpProtocol
(docs/security-dos.md)."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import resource
import time
from typing import Any, ClassVar

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from vodpush.api.limits import TALLY, client_key
from vodpush.config import Settings

log = logging.getLogger(__name__)

# The app answers a body that is late with 408 at body_timeout; the connection itself is cut
# this much later if it is still reading (a route that never reads its body, a stuck app).
BODY_GRACE = 2.0
# Open files kept for the database, logs and the worker's S3 connections when the
# connection cap is fitted to the open-files limit.
FD_RESERVE = 256


class ConnectionGuard:
    """The bounds every connection of one server obeys, and who holds how many connections.
    Used from the event loop only."""

    def __init__(self, settings: Settings, *, max_connections: int, trusted: Any) -> None:
        self.header_timeout = settings.header_timeout
        self.body_timeout = settings.body_timeout + BODY_GRACE
        self.max_header_bytes = settings.max_header_bytes
        self.max_connections = max_connections
        self.per_client = settings.max_connections_per_client
        self.open = 0
        self._by_client: dict[str, int] = {}
        self._trust_all, self._trusted = _parse_trusted(trusted)

    def _capped(self, host: str | None) -> bool:
        """Whether the per-address cap applies: not to the proxies we trust, whose
        connections carry many clients."""
        if self.per_client <= 0 or self._trust_all or host is None:
            return False
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        return not any(address in net for net in self._trusted)

    def admit(self, host: str | None) -> str | None:
        """Count a new connection in; None when it may stay, else the reason it may not."""
        if self.open >= self.max_connections:
            return "connection_limit"
        key = client_key(host)
        if self._capped(host) and self._by_client.get(key, 0) >= self.per_client:
            return "client_connection_limit"
        self.open += 1
        self._by_client[key] = self._by_client.get(key, 0) + 1
        return None

    def leave(self, host: str | None) -> None:
        self.open -= 1
        key = client_key(host)
        left = self._by_client.get(key, 0) - 1
        if left > 0:
            self._by_client[key] = left
        else:
            self._by_client.pop(key, None)


def _parse_trusted(value: Any) -> tuple[bool, list[ipaddress.IPv4Network | ipaddress.IPv6Network]]:
    items = value if isinstance(value, list) else str(value or "").split(",")
    nets = []
    for item in (str(i).strip() for i in items):
        if item == "*":
            return True, []
        try:
            nets.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            continue  # a unix socket path or a name: not an address we can match
    return False, nets


def _response(status: str, message: str, *extra: str) -> bytes:
    head = [f"HTTP/1.1 {status}", "content-type: text/plain; charset=utf-8", *extra]
    head += [f"content-length: {len(message)}", "connection: close", "", message]
    return "\r\n".join(head).encode("ascii")


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the read bounds it lacks:

    - a connection may not stay open beyond ``max_connections`` in all, nor beyond
      ``max_connections_per_client`` from one address;
    - a request's headers must be complete within ``header_timeout`` of the connection
      (or, on a kept-alive connection, of the first byte after the previous request), and
      may not exceed ``max_header_bytes``;
    - its body must be complete within ``body_timeout`` (+ a grace: the app answers 408
      first) of the headers, even where the app does not read it.

    uvicorn's own keep-alive timeout still closes idle connections between requests.
    """

    guard: ClassVar[ConnectionGuard]

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._timer: asyncio.TimerHandle | None = None
        self._awaiting_headers = True  # the next bytes belong to a request's head
        self._head_bytes = 0
        self._in_body = False
        self._host = self.client[0] if self.client else None
        refused = self.guard.admit(self._host)
        self._admitted = refused is None
        if refused is not None:
            TALLY.note(refused, client=client_key(self._host))
            self._refuse(
                _response("503 Service Unavailable", "too many connections", "retry-after: 1")
            )
            return
        self._arm(self.guard.header_timeout, self._headers_late)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._admitted:
            self._admitted = False
            self.guard.leave(self._host)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._awaiting_headers:
            self._head_bytes += len(data)
            # On a kept-alive connection the clock starts at the first byte of the request.
            if self._timer is None:
                self._arm(self.guard.header_timeout, self._headers_late)
        super().data_received(data)
        if (
            self._awaiting_headers
            and self._head_bytes > self.guard.max_header_bytes
            and not self.transport.is_closing()
        ):
            TALLY.note("header_too_large", client=client_key(self._host))
            self._refuse(
                _response("431 Request Header Fields Too Large", "request headers are too large")
            )

    def on_headers_complete(self) -> None:
        self._awaiting_headers = False
        self._head_bytes = 0
        self._in_body = True
        self._disarm()
        super().on_headers_complete()
        queued = any(cycle is self.cycle for cycle, _ in self.pipeline)
        if not queued:  # a pipelined request's body is timed once it is being read
            self._arm(self.guard.body_timeout, self._body_late)

    def on_message_complete(self) -> None:
        self._in_body = False
        self._awaiting_headers = True
        self._disarm()
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # Answered before its body was read (a 404, a 405, a pipelined request): the rest of
        # the body is read and dropped, but only for so long.
        if self._in_body and self._timer is None and not self.transport.is_closing():
            self._arm(self.guard.body_timeout, self._body_late)

    def _arm(self, delay: float, callback: Any) -> None:
        self._disarm()
        self._timer = self.loop.call_later(delay, callback)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _refuse(self, response: bytes | None) -> None:
        self._disarm()
        if not self.transport.is_closing():
            if response is not None:
                self.transport.write(response)
            self.transport.close()

    def _headers_late(self) -> None:
        self._timer = None
        TALLY.note("header_timeout", client=client_key(self._host))
        if self.cycle is not None and not self.cycle.response_complete:
            # A pipelined request trickles in while the previous one is being answered:
            # let that answer finish, then close.
            self.cycle.keep_alive = False
            return
        # Nothing of a request yet (an idle connection): close without an answer.
        late = _response("408 Request Timeout", "request headers did not arrive in time")
        self._refuse(late if self._head_bytes else None)

    def _body_late(self) -> None:
        self._timer = None
        TALLY.note("body_timeout", client=client_key(self._host))
        self._refuse(None)


class QuietRepeats(logging.Filter):
    """uvicorn logs a warning for every malformed request ("Invalid HTTP request received.");
    a flood of garbage would be a log line per connection. Each message passes once every
    ``every`` seconds, with the count of those held back since."""

    def __init__(self, every: float = 10.0) -> None:
        super().__init__()
        self._every = every
        self._seen: dict[str, tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.WARNING or not isinstance(record.msg, str):
            return True
        now = time.monotonic()
        last, held = self._seen.get(record.msg, (-self._every, 0))
        if now - last < self._every:
            self._seen[record.msg] = (last, held + 1)
            return False
        self._seen[record.msg] = (now, 0)
        if held:
            record.repeated = held
        return True


def _quiet_uvicorn_warnings() -> None:
    logger = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, QuietRepeats) for f in logger.filters):
        logger.addFilter(QuietRepeats())


def fit_open_files(wanted: int) -> int:
    """Raise this process's soft limit on open files towards ``wanted`` connections plus a
    reserve (within the hard limit); returns how many connections fit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = wanted + FD_RESERVE
    if soft != resource.RLIM_INFINITY and soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(need, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY:
        return wanted
    return max(1, min(wanted, soft - FD_RESERVE))


def server_config(app: Any, settings: Settings, *, host: str, port: int) -> uvicorn.Config:
    """The uvicorn configuration of `vodpush serve` (the tests' live server uses it too)."""
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        # No formatters or handlers of uvicorn's: its records reach the root logger, where
        # vodpush.logs formats them as every other line (no ANSI colours).
        log_config=None,
        access_log=settings.access_log,  # a line per HTTP request: VODPUSH_ACCESS_LOG
        proxy_headers=True,
        ws="none",  # no WebSocket route; an upgrade would also leave the guard's count
        timeout_graceful_shutdown=int(settings.shutdown_grace),
    )
    max_connections = fit_open_files(settings.max_connections)
    if max_connections < settings.max_connections:
        log.warning(
            "connection cap lowered to fit the open-files limit",
            extra={
                "action": "api.max_connections",
                "configured": settings.max_connections,
                "effective": max_connections,
            },
        )
    guard = ConnectionGuard(
        settings, max_connections=max_connections, trusted=config.forwarded_allow_ips
    )
    _quiet_uvicorn_warnings()
    # A class per server: the guard holds that server's connection counts.
    config.http = type("GuardedHttpProtocol", (GuardedHttpProtocol,), {"guard": guard})
    return config
