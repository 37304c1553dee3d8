"""Callback deliveries: build the signed POST, send it once to a checked address, and decide
when to try again.

The three steps are apart on purpose: :func:`build_delivery` and :func:`next_delivery` are
pure, :func:`deliver` is the only one that touches the network, and it never raises for
network or HTTP trouble, so a callback can neither fail nor hang an upload.

Callback URLs come from API clients, so the server must not become a proxy into its own
network: every address the host resolves to is checked (:func:`refusal_reason`) and the
connection goes to the checked address itself, so a second DNS answer (rebinding) cannot
redirect it.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import json
import math
import random
import re
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from importlib import metadata
from types import TracebackType
from typing import Any, Protocol

import httpx

from vodpush.webhooks import HEADER_TIMESTAMP, sign

__all__ = [
    "DEFAULT_SCHEDULE",
    "MAX_RESPONSE_BYTES",
    "CallbackURLError",
    "Delivery",
    "DeliveryAttempt",
    "RetryDecision",
    "build_delivery",
    "check_destination",
    "deliver",
    "is_public_address",
    "next_delivery",
    "normalize_callback_url",
    "refusal_reason",
    "resolve_host",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Sequence[str]]

# Delays (seconds) before each retry: the last one comes about 15 hours after the first try.
DEFAULT_SCHEDULE: tuple[float, ...] = (10, 60, 300, 1800, 3600, 7200, 14400, 28800)
# Only a snippet of an error response is kept; a receiver must not stream gigabytes at us.
MAX_RESPONSE_BYTES = 1024
_ERROR_TEXT_CHARS = 200


class CallbackURLError(ValueError):
    """A callback URL that cannot be used; the message says why."""


@dataclass(frozen=True)
class Delivery:
    """One signed callback request, ready to send."""

    msg_id: str
    timestamp: int
    body: bytes
    headers: Mapping[str, str]


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


@dataclass(frozen=True)
class RetryDecision:
    retry: bool
    at: datetime | None


# -- building ---------------------------------------------------------------------------


@functools.cache
def _version() -> str:
    try:
        return metadata.version("vodpush")
    except metadata.PackageNotFoundError:
        return "0"


def build_delivery(record: dict[str, Any], api_secret: str, msg_id: str, now: float) -> Delivery:
    """The signed POST of ``record``. Call it again for each retry with the same ``msg_id``
    and the current time: receivers reject timestamps more than minutes old."""
    body = json.dumps(record, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode(
        "utf-8"
    )
    webhook_headers = sign(api_secret, msg_id, now, body)
    headers = {
        "Content-Type": "application/json",
        "User-Agent": f"vodpush/{_version()}",
        **webhook_headers,
    }
    return Delivery(
        msg_id=msg_id,
        timestamp=int(webhook_headers[HEADER_TIMESTAMP]),
        body=body,
        headers=headers,
    )


# -- URLs and addresses -------------------------------------------------------------------

_HAS_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
# "mailto:x" or "javascript:x" must not become http://mailto:x; "host:8080/x" may.
_OTHER_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:(?![0-9])")
_HOSTNAME = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?\.?")


def _parse_callback_url(url: str) -> httpx.URL:
    text = url.strip()
    if not text:
        raise CallbackURLError("it is empty")
    if any(ch.isspace() or not ch.isprintable() for ch in text):
        raise CallbackURLError("it contains whitespace or control characters")
    # A URL without scheme ("www.example.com/hook") means http://, as the reference API does.
    if text.startswith("//"):
        text = "http:" + text
    elif not _HAS_SCHEME.match(text):
        if _OTHER_SCHEME.match(text):
            raise CallbackURLError("only http:// and https:// URLs are allowed")
        text = "http://" + text
    try:
        parsed = httpx.URL(text)
    except httpx.InvalidURL as exc:
        raise CallbackURLError(str(exc)) from None
    if parsed.scheme not in ("http", "https"):
        raise CallbackURLError(f"scheme {parsed.scheme}: is not allowed, use http or https")
    host = parsed.raw_host.decode("ascii")
    if not host:
        raise CallbackURLError("it has no host")
    if _ip_literal(host) is None and not _HOSTNAME.fullmatch(host):
        raise CallbackURLError("the host is neither a DNS name nor an IP address")
    if parsed.port is not None and not 0 < parsed.port < 65536:
        raise CallbackURLError(f"port {parsed.port} is outside 1-65535")
    return parsed.copy_with(fragment=None)


def normalize_callback_url(url: str) -> str:
    """The URL as it will be used (``http://`` added when missing, no fragment); raises
    :class:`CallbackURLError` for anything but a usable http(s) URL."""
    return str(_parse_callback_url(url))


_NUMERIC_HOST = re.compile(r"[0-9][0-9A-Fa-fXx.]*")


def _ip_literal(host: str) -> IPAddress | None:
    """The address ``host`` names by itself, without DNS: the usual forms, and those the
    system resolver also reads as IPv4 (``2130706433``, ``0x7f.1``, ``127.1``, a trailing
    dot), so none of them passes for a name."""
    host = host.removesuffix(".")
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if _NUMERIC_HOST.fullmatch(host):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None


_SHARED = ipaddress.IPv4Network("100.64.0.0/10")  # carrier-grade NAT, RFC 6598
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # RFC 6052 well-known prefix

# Ordered: the first match names the reason. The last line catches the rest of the special
# registries (documentation, benchmarking, ...) that Python knows are not global.
_REFUSALS: tuple[tuple[str, Callable[[Any], bool]], ...] = (
    ("unspecified", lambda ip: ip.is_unspecified),
    ("loopback", lambda ip: ip.is_loopback),
    ("link-local", lambda ip: ip.is_link_local),
    ("multicast", lambda ip: ip.is_multicast),
    ("shared (CGNAT)", lambda ip: ip.version == 4 and ip in _SHARED),
    ("reserved", lambda ip: ip.is_reserved),
    ("private", lambda ip: ip.is_private),
    ("site-local", lambda ip: ip.version == 6 and ip.is_site_local),
    ("non-global", lambda ip: not ip.is_global),
)


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> tuple[ipaddress.IPv4Address, str] | None:
    # These IPv6 forms reach an IPv4 host, so the IPv4 host is what must be judged.
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped, "IPv4-mapped"
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF), "NAT64"
    if ip.sixtofour is not None:
        return ip.sixtofour, "6to4"
    return None


def refusal_reason(address: str | IPAddress, *, detail: bool = True) -> str | None:
    """Why a callback may not go to ``address`` (e.g. ``"loopback"``), or None if it may.
    ``detail=False`` leaves out the IPv4 address embedded in an IPv6 one (for texts that
    must not tell what a name resolves to)."""
    ip = ipaddress.ip_address(address) if isinstance(address, str) else address
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(ip)
        if embedded is not None:
            inner, form = embedded
            reason = refusal_reason(inner)
            if reason is None:
                return None
            return f"{reason} ({form} {inner})" if detail else f"{reason} ({form})"
    for reason, applies in _REFUSALS:
        if applies(ip):
            return reason
    return None


def is_public_address(address: str | IPAddress) -> bool:
    return refusal_reason(address) is None


def resolve_host(host: str, port: int) -> list[str]:
    """All addresses ``host`` resolves to, in resolver order, without duplicates."""
    found: list[str] = []
    for *_, sockaddr in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        address = str(sockaddr[0])
        if address not in found:
            found.append(address)
    return found


class DNSError(OSError):
    """A lookup that failed; ``definitive`` when the name does not exist (NXDOMAIN, no
    address), as opposed to a resolver that failed for now."""

    def __init__(self, message: str, *, definitive: bool) -> None:
        super().__init__(message)
        self.definitive = definitive


# Names that never resolve (RFC 6761 .invalid; RFC 7686 .onion, reachable only over Tor,
# and callbacks use no proxy): answered without asking DNS.
_NEVER_RESOLVE = ("invalid", "onion")
_DEFINITIVE_EAI = frozenset(
    code for code in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", None)) if code is not None
)


def _resolve(resolver: Resolver, host: str, port: int, timeout: float) -> list[IPAddress]:
    literal = _ip_literal(host)
    if literal is not None:
        return [literal]
    if host.rstrip(".").rsplit(".", 1)[-1].lower() in _NEVER_RESOLVE:
        raise DNSError(f"DNS lookup of {host} failed: a reserved name", definitive=True)
    # getaddrinfo has no timeout of its own; run it aside so a dead DNS server cannot hold
    # the worker. A resolver still stuck after the timeout finishes later, unobserved.
    outcome: list[Any] = []

    def lookup() -> None:
        try:
            outcome.append(list(resolver(host, port)))
        except (OSError, UnicodeError) as exc:
            outcome.append(exc)

    thread = threading.Thread(target=lookup, name="vodpush-callback-dns", daemon=True)
    thread.start()
    thread.join(timeout)
    if not outcome:
        raise TimeoutError(f"DNS lookup of {host} timed out after {timeout:g} s")
    if isinstance(outcome[0], Exception):
        exc = outcome[0]
        definitive = isinstance(exc, UnicodeError) or (
            isinstance(exc, socket.gaierror) and exc.errno in _DEFINITIVE_EAI
        )
        raise DNSError(f"DNS lookup of {host} failed: {exc}", definitive=definitive)
    try:
        return [ipaddress.ip_address(a) for a in outcome[0]]
    except ValueError:
        raise DNSError(f"DNS lookup of {host} gave a bad address", definitive=False) from None


# -- delivering ---------------------------------------------------------------------------


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
    if target.scheme == "https" and _ip_literal(host) is None:
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
        target = _parse_callback_url(url)
    except CallbackURLError as exc:
        return outcome(error=f"invalid callback URL: {exc}", permanent=True)
    host = target.raw_host.decode("ascii")
    port = target.port or (443 if target.scheme == "https" else 80)

    try:
        addresses = _resolve(resolver or resolve_host, host, port, timeout)
    except OSError as exc:  # TimeoutError is an OSError too
        return outcome(error=str(exc))
    if not addresses:
        return outcome(error=f"DNS lookup of {host} found no address")
    if not allow_private:
        # Every address must pass: the client library could pick any of them.
        reason = _refusal(host, addresses)
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
        return outcome(error=_hide_addresses(_describe(exc), host, addresses))
    finally:
        if client is None:
            http.close()


def _refusal(host: str, addresses: Sequence[IPAddress]) -> str | None:
    """Why none of ``addresses`` may be used, in words the customer may read (it ends up in
    aws.status): a literal address is named (the customer wrote it), the addresses a name
    resolves to are not (they would map the operator's network)."""
    literal = _ip_literal(host) is not None
    for address in addresses:
        reason = refusal_reason(address, detail=literal)
        if reason is not None:
            if literal:
                return f"{address} is not a public address ({reason})"
            return f"{host} resolves to a non-public address ({reason})"
    return None


def _hide_addresses(text: str, host: str, addresses: Sequence[IPAddress]) -> str:
    """``text`` without the addresses that ``host`` resolved to, when it is a name."""
    if _ip_literal(host) is not None:
        return text
    for address in addresses:
        text = text.replace(str(address), f"(an address of {host})")
    return text


def check_destination(
    url: str,
    *,
    allow_private: bool,
    timeout: float,
    resolver: Resolver | None = None,
) -> str:
    """At submit: the URL as it will be used, or CallbackURLError when a delivery could never
    succeed. Refused: a bad URL; a name that can never resolve (.invalid, .onion); and,
    unless ``allow_private``, a literal non-public address, a name that does not exist
    (NXDOMAIN), or a name whose addresses include a non-public one.

    With ``allow_private`` names are not looked up here: such installs deliver to internal
    receivers, often under names only the worker hosts resolve. A lookup that times out
    (``timeout`` seconds at most) or fails for now is no proof: the URL is accepted, and
    every delivery checks again anyway (DNS answers change).
    """
    target = _parse_callback_url(url)
    host = target.raw_host.decode("ascii")
    port = target.port or (443 if target.scheme == "https" else 80)
    if host.rstrip(".").rsplit(".", 1)[-1].lower() in _NEVER_RESOLVE:
        raise CallbackURLError(f"the host {host} does not resolve (a reserved name)")
    if allow_private:
        return str(target)
    try:
        addresses = _resolve(resolver or resolve_host, host, port, timeout)
    except DNSError as exc:
        if exc.definitive:
            raise CallbackURLError(f"the host {host} does not resolve") from None
        return str(target)
    except OSError:  # timed out: the delivery will know better
        return str(target)
    if not addresses:
        raise CallbackURLError(f"the host {host} does not resolve")
    reason = _refusal(host, addresses)
    if reason is not None:
        raise CallbackURLError(f"{reason}; callbacks go to public addresses only")
    return str(target)


# -- retry policy -------------------------------------------------------------------------


class _Uniform(Protocol):
    def uniform(self, a: float, b: float) -> float: ...


def next_delivery(
    attempts_made: int,
    schedule: Sequence[float],
    now: datetime,
    *,
    jitter: float = 0.1,
    rng: _Uniform = random,  # the module itself satisfies the protocol
) -> RetryDecision:
    """When to try again after ``attempts_made`` failed attempts (the first one included).

    ``schedule[i]`` is the delay before retry ``i + 1``, stretched or shrunk by up to
    ``jitter`` (a fraction) so that many callbacks failing together do not return together.
    Once the schedule is used up, give up.
    """
    if attempts_made < 1:
        raise ValueError("attempts_made counts attempts already made: it must be at least 1")
    if not 0 <= jitter < 1:
        raise ValueError("jitter must be a fraction in [0, 1)")
    if any(not math.isfinite(d) or d < 0 for d in schedule):
        raise ValueError("schedule delays must be finite and not negative")
    if attempts_made > len(schedule):
        return RetryDecision(retry=False, at=None)
    delay = schedule[attempts_made - 1]
    if jitter:
        delay *= 1 + rng.uniform(-jitter, jitter)
    return RetryDecision(retry=True, at=now + timedelta(seconds=delay))
