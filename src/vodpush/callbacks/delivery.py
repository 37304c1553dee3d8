"""Sending one callback: a single POST to a checked address within a hard deadline.

:func:`deliver` is the only code here that touches the network, and it never raises for
network or HTTP trouble, so a callback can neither fail nor hang an upload.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

import httpx

from vodpush.callbacks.payload import Delivery
from vodpush.callbacks.policy import (
    CallbackURLError,
    IPAddress,
    Resolver,
    hide_addresses,
    ip_literal,
    parse_callback_url,
    refusal_for,
    resolve,
    resolve_host,
)

# Only a snippet of an error response is kept; a receiver must not stream gigabytes at us.
MAX_RESPONSE_BYTES = 1024
_ERROR_TEXT_CHARS = 200


@dataclass(frozen=True)
class DeliveryAttempt:
    """What happened to one POST. ``permanent`` marks failures that retrying the same URL
    under the same settings cannot fix (bad URL, refused address)."""

    at: datetime
    ok: bool
    http_status: int | None
    error: str | None
    duration: float
    permanent: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "at": self.at.isoformat(),
            "ok": self.ok,
            "http_status": self.http_status,
            "error": self.error,
            "duration": round(self.duration, 3),
            "permanent": self.permanent,
        }


def _shutdown(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # already closed: nothing left to interrupt
        sock.shutdown(socket.SHUT_RDWR)


class _Deadline:
    """A hard limit on one attempt. httpx's timeouts apply to each read or write, so a
    receiver trickling a byte at a time could hold us for hours; at the deadline the socket
    is shut down, which makes a blocked read return at once."""

    def __init__(self, seconds: float) -> None:
        self.expired = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def trace(self, event: str, info: Mapping[str, Any]) -> None:
        """httpx ``trace`` extension hook: learns the socket of each new connection."""
        if event != "connection.connect_tcp.complete":
            return
        stream = info.get("return_value")
        sock = stream.get_extra_info("socket") if stream is not None else None
        if not isinstance(sock, socket.socket):
            return
        with self._lock:
            if self.expired:
                _shutdown(sock)
            else:
                self._sockets.append(sock)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._sockets:
                _shutdown(sock)

    def __enter__(self) -> _Deadline:
        self._timer.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._timer.cancel()


def _clip(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _ERROR_TEXT_CHARS else text[: _ERROR_TEXT_CHARS - 1] + "…"


def _read_snippet(response: httpx.Response) -> str:
    if response.headers.get("content-encoding", "identity").lower() != "identity":
        return ""  # compressed: not worth decoding for an error message
    data = bytearray()
    for chunk in response.iter_raw():
        data += chunk
        if len(data) >= MAX_RESPONSE_BYTES:
            break
    return _clip(bytes(data[:MAX_RESPONSE_BYTES]).decode("utf-8", "replace"))


def _post(
    http: httpx.Client,
    delivery: Delivery,
    target: httpx.URL,
    address: IPAddress,
    *,
    timeout: float,
    deadline: _Deadline,
) -> tuple[int, str | None]:
    """POST to ``address`` as if to ``target``; returns (status, error or None)."""
    host = target.raw_host.decode("ascii")
    extensions: dict[str, Any] = {"trace": deadline.trace}
    if target.scheme == "https" and ip_literal(host) is None:
        # TLS must still verify the certificate against the name, not the pinned IP.
        extensions["sni_hostname"] = host
    headers = {
        **delivery.headers,
        "Host": target.netloc.decode("ascii"),
        "Accept-Encoding": "identity",
    }
    request = http.build_request(
        "POST",
        target.copy_with(host=str(address)),
        content=delivery.body,
        headers=headers,
        timeout=timeout,
        extensions=extensions,
    )
    response = http.send(request, stream=True, follow_redirects=False)
    try:
        status = response.status_code
        if 200 <= status < 300:
            return status, None  # the body is of no interest: do not read it
        if 300 <= status < 400:
            location = response.headers.get("location", "")
            where = f" to {_clip(location)}" if location else ""
            return status, f"redirect not followed: HTTP {status}{where}"
        snippet = _read_snippet(response)
        return status, f"HTTP {status}: {snippet}" if snippet else f"HTTP {status}"
    finally:
        response.close()


def _describe(exc: Exception) -> str:
    detail = str(exc) or type(exc).__name__
    if isinstance(exc, httpx.ConnectError):
        return f"connection failed: {detail}"
    return f"{type(exc).__name__}: {detail}"


def deliver(
    delivery: Delivery,
    url: str,
    *,
    timeout: float,
    allow_private: bool,
    client: httpx.Client | None = None,
    resolver: Resolver | None = None,
) -> DeliveryAttempt:
    """One POST of ``delivery`` to ``url``, within ``timeout`` seconds in all.

    Never raises for network or HTTP problems: the outcome is in the returned attempt. A 2xx
    answer is success; redirects are not followed. ``resolver`` replaces DNS (tests). A
    ``client`` passed in is used but not closed; its redirect setting is overridden.
    """
    at = datetime.now(UTC)
    started = time.monotonic()

    def outcome(
        *, status: int | None = None, error: str | None = None, permanent: bool = False
    ) -> DeliveryAttempt:
        return DeliveryAttempt(
            at=at,
            ok=error is None,
            http_status=status,
            error=error,
            duration=time.monotonic() - started,
            permanent=permanent,
        )

    def remaining() -> float:
        return timeout - (time.monotonic() - started)

    try:
        target = parse_callback_url(url)
    except CallbackURLError as exc:
        return outcome(error=f"invalid callback URL: {exc}", permanent=True)
    host = target.raw_host.decode("ascii")
    port = target.port or (443 if target.scheme == "https" else 80)

    try:
        addresses = resolve(resolver or resolve_host, host, port, timeout)
    except OSError as exc:  # TimeoutError is an OSError too
        return outcome(error=str(exc))
    if not addresses:
        return outcome(error=f"DNS lookup of {host} found no address")
    if not allow_private:
        # Every address must pass: the client library could pick any of them.
        reason = refusal_for(host, addresses)
        if reason is not None:
            return outcome(
                error=(
                    f"refused: {reason} (set VODPUSH_CALLBACK_ALLOW_PRIVATE to allow "
                    "non-public addresses)"
                ),
                permanent=True,
            )

    http = client if client is not None else httpx.Client(trust_env=False)
    deadline = _Deadline(max(remaining(), 0.0))

    def post(address: IPAddress) -> tuple[int, str | None]:
        timeout_left = max(remaining(), 0.001)
        return _post(http, delivery, target, address, timeout=timeout_left, deadline=deadline)

    try:
        with deadline:
            for address in addresses[:-1]:
                try:
                    status, error = post(address)
                    return outcome(status=status, error=error)
                except httpx.ConnectError:
                    # Refused or unreachable: the next checked address may answer.
                    if remaining() <= 0:
                        raise
            status, error = post(addresses[-1])
            return outcome(status=status, error=error)
    except (httpx.HTTPError, httpx.InvalidURL, OSError) as exc:
        if deadline.expired or isinstance(exc, httpx.TimeoutException):
            return outcome(error=f"timed out after {timeout:g} s")
        return outcome(error=hide_addresses(_describe(exc), host, addresses))
    finally:
        if client is None:
            http.close()
