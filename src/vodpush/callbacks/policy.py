"""Where a callback may go: parsing the URL a client gave, the address policy, resolving
with a time limit, and the check at submit (:func:`check_destination`).

Callback URLs come from API clients, so the server must not become a proxy into its own
network: every address the host resolves to is checked (:func:`refusal_reason`), and the
delivery (``callbacks.delivery``) connects to the checked address itself, so a second DNS
answer (rebinding) cannot redirect it.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import threading
from collections.abc import Callable, Sequence
from typing import Any

import httpx

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Sequence[str]]


class CallbackURLError(ValueError):
    """A callback URL that cannot be used; the message says why."""


_HAS_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
# "mailto:x" or "javascript:x" must not become http://mailto:x; "host:8080/x" may.
_OTHER_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:(?![0-9])")
_HOSTNAME = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?\.?")


def parse_callback_url(url: str) -> httpx.URL:
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
    if ip_literal(host) is None and not _HOSTNAME.fullmatch(host):
        raise CallbackURLError("the host is neither a DNS name nor an IP address")
    if parsed.port is not None and not 0 < parsed.port < 65536:
        raise CallbackURLError(f"port {parsed.port} is outside 1-65535")
    return parsed.copy_with(fragment=None)


def normalize_callback_url(url: str) -> str:
    """The URL as it will be used (``http://`` added when missing, no fragment); raises
    :class:`CallbackURLError` for anything but a usable http(s) URL."""
    return str(parse_callback_url(url))


_NUMERIC_HOST = re.compile(r"[0-9][0-9A-Fa-fXx.]*")


def ip_literal(host: str) -> IPAddress | None:
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
NEVER_RESOLVE = ("invalid", "onion")
_DEFINITIVE_EAI = frozenset(
    code for code in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", None)) if code is not None
)


def resolve(resolver: Resolver, host: str, port: int, timeout: float) -> list[IPAddress]:
    """The addresses of ``host`` (a literal is its own) within ``timeout`` seconds; raises
    DNSError, or TimeoutError when the resolver does not answer in time."""
    literal = ip_literal(host)
    if literal is not None:
        return [literal]
    if host.rstrip(".").rsplit(".", 1)[-1].lower() in NEVER_RESOLVE:
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


def refusal_for(host: str, addresses: Sequence[IPAddress]) -> str | None:
    """Why none of ``addresses`` may be used, in words the customer may read (it ends up in
    aws.status): a literal address is named (the customer wrote it), the addresses a name
    resolves to are not (they would map the operator's network)."""
    literal = ip_literal(host) is not None
    for address in addresses:
        reason = refusal_reason(address, detail=literal)
        if reason is not None:
            if literal:
                return f"{address} is not a public address ({reason})"
            return f"{host} resolves to a non-public address ({reason})"
    return None


def hide_addresses(text: str, host: str, addresses: Sequence[IPAddress]) -> str:
    """``text`` without the addresses that ``host`` resolved to, when it is a name."""
    if ip_literal(host) is not None:
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
    target = parse_callback_url(url)
    host = target.raw_host.decode("ascii")
    port = target.port or (443 if target.scheme == "https" else 80)
    if host.rstrip(".").rsplit(".", 1)[-1].lower() in NEVER_RESOLVE:
        raise CallbackURLError(f"the host {host} does not resolve (a reserved name)")
    if allow_private:
        return str(target)
    try:
        addresses = resolve(resolver or resolve_host, host, port, timeout)
    except DNSError as exc:
        if exc.definitive:
            raise CallbackURLError(f"the host {host} does not resolve") from None
        return str(target)
    except OSError:  # timed out: the delivery will know better
        return str(target)
    if not addresses:
        raise CallbackURLError(f"the host {host} does not resolve")
    reason = refusal_for(host, addresses)
    if reason is not None:
        raise CallbackURLError(f"{reason}; callbacks go to public addresses only")
    return str(target)
