"""What a client may make the API hold or do: bytes of request bodies in flight, requests a
second per account, and failures before an account is proven (per client address, and in
all as a last net).

Refusals are cheap answers with code 1000 and a retry hint. All state lives in this process:
with N API processes the effective limits are N times the configured ones.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

from prometheus_client import Counter

from vodpush.config import Settings
from vodpush.protocol.envelope import ApiError, Code, failure

log = logging.getLogger(__name__)

REFUSED = Counter(
    "vodpush_api_refused_total",
    "Requests and connections refused or cut off by a limit, by reason",
    ["reason"],
)


class Busy(ApiError):
    """Refused by a limit before anything was done: safe to send again after
    ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: float) -> None:
        # A hint a client can sleep on: never zero, tenths of a second.
        self.retry_after = max(0.1, math.ceil(retry_after * 10) / 10)
        super().__init__(Code.BUSY, f"{message}; retry in {self.retry_after:g} s")


def busy_envelope(exc: Busy, handle_time: float) -> dict[str, Any]:
    """The failure answer of a Busy, with a top-level ``retry_after`` (seconds)."""
    return {**failure(exc.code, exc.message, handle_time), "retry_after": exc.retry_after}


class Tally:
    """Counts refusals by reason (a Prometheus counter) and logs them, at most one line per
    reason every ``every`` seconds with the count since the last line: an attack must not
    turn into a flood of log lines."""

    def __init__(self, every: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._every = every
        self._clock = clock
        self._lock = threading.Lock()
        self._pending: dict[str, int] = {}
        self._last: dict[str, float] = {}

    def note(self, reason: str, **fields: Any) -> None:
        REFUSED.labels(reason).inc()
        now = self._clock()
        with self._lock:
            count = self._pending.get(reason, 0) + 1
            last = self._last.get(reason)
            if last is not None and now - last < self._every:
                self._pending[reason] = count
                return
            self._pending[reason] = 0
            self._last[reason] = now
        log.warning(
            "refused by a limit",
            extra={"action": "api.limited", "reason": reason, "count": count, **fields},
        )


TALLY = Tally()


class TokenBuckets:
    """A token bucket per key: ``rate`` tokens a second, at most ``burst`` saved up. Keys
    beyond ``max_keys`` push out the least recently used, so an attacker with many
    addresses costs bounded memory. Thread-safe (commands run in worker threads)."""

    def __init__(
        self,
        rate: float,
        burst: float,
        *,
        max_keys: int = 20_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.rate = rate
        self.burst = float(burst)
        self._max_keys = max_keys
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: OrderedDict[Hashable, tuple[float, float]] = OrderedDict()

    def _level(self, key: Hashable, now: float) -> float:
        entry = self._buckets.get(key)
        if entry is None:
            return self.burst
        tokens, stamp = entry
        return min(self.burst, tokens + (now - stamp) * self.rate)

    def wait(self, key: Hashable) -> float:
        """Seconds until ``key`` has a token (0.0: it has one now); takes nothing."""
        with self._lock:
            level = self._level(key, self._clock())
        return 0.0 if level >= 1 else (1 - level) / self.rate

    def take(self, key: Hashable) -> float:
        """Take a token: 0.0 when there was one, else the seconds until there is one (and
        nothing is taken)."""
        with self._lock:
            now = self._clock()
            level = self._level(key, now)
            if level < 1:
                return (1 - level) / self.rate
            self._buckets[key] = (level - 1, now)
            self._buckets.move_to_end(key)
            while len(self._buckets) > self._max_keys:
                self._buckets.popitem(last=False)
            return 0.0


def client_key(host: str | None) -> str:
    """The key a client address is limited under: IPv6 by its /64 (one subscriber usually
    holds a whole /64), anything that is not an address as one shared key."""
    if not host:
        return "-"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return "-"
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


class BodyBudget:
    """Bytes that request bodies being received may hold, in all and per client address.
    Used from the event loop only (body reading is async), so it needs no lock."""

    def __init__(self, total: int, per_client: int) -> None:
        self.total = total
        self.per_client = min(per_client, total)
        self.held = 0
        self._by_client: dict[str, int] = {}

    def take(self, client: str, size: int) -> str | None:
        """Account ``size`` more bytes to ``client``; None when they fit, else why not (and
        nothing is taken)."""
        mine = self._by_client.get(client, 0)
        if mine + size > self.per_client:
            return "client"
        if self.held + size > self.total:
            return "total"
        self._by_client[client] = mine + size
        self.held += size
        return None

    def give_back(self, client: str, size: int) -> None:
        if size <= 0:
            return
        self.held -= size
        left = self._by_client.get(client, 0) - size
        if left > 0:
            self._by_client[client] = left
        else:
            self._by_client.pop(client, None)


class Limits:
    """Every limit of one API process, built from the settings."""

    # Addresses that proved an account recently stay served when the global failure net
    # is exhausted, so a distributed flood of garbage does not lock out known clients.
    PROVEN_FOR = 600.0
    PROVEN_MAX = 10_000

    def __init__(self, settings: Settings, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.body_timeout = settings.body_timeout
        self.bodies = BodyBudget(settings.body_budget_bytes, settings.body_budget_per_client_bytes)
        self.accounts = (
            TokenBuckets(settings.rate_limit, settings.rate_burst, clock=clock)
            if settings.rate_limit > 0
            else None
        )
        self.failures = (
            TokenBuckets(settings.failure_rate_limit, settings.failure_rate_burst, clock=clock)
            if settings.failure_rate_limit > 0
            else None
        )
        self.all_failures = (
            TokenBuckets(
                settings.failure_global_rate_limit, settings.failure_global_burst, clock=clock
            )
            if settings.failure_global_rate_limit > 0
            else None
        )
        self._proven: OrderedDict[str, float] = OrderedDict()
        self._lock = threading.Lock()

    def guard(self, host: str | None) -> RequestGuard:
        return RequestGuard(self, client_key(host))

    def _prove(self, client: str) -> None:
        with self._lock:
            self._proven[client] = self.clock()
            self._proven.move_to_end(client)
            while len(self._proven) > self.PROVEN_MAX:
                self._proven.popitem(last=False)

    def _is_proven(self, client: str) -> bool:
        with self._lock:
            since = self._proven.get(client)
        return since is not None and self.clock() - since < self.PROVEN_FOR


class RequestGuard:
    """One request's view of the limits: the body bytes it holds, and the buckets of its
    client address and (once proven) of its account."""

    def __init__(self, limits: Limits, client: str) -> None:
        self.limits = limits
        self.client = client
        self.held = 0

    # -- request bodies --------------------------------------------------------------------

    def hold(self, size: int) -> None:
        """Account ``size`` more body bytes; raises Busy when the budget is spent."""
        refused = self.limits.bodies.take(self.client, size)
        if refused is None:
            self.held += size
            return
        TALLY.note("body_budget", scope=refused, client=self.client)
        whose = "from your address" if refused == "client" else "in all"
        raise Busy(f"the server is receiving too many request bodies {whose}", 1.0)

    def release(self) -> None:
        self.limits.bodies.give_back(self.client, self.held)
        self.held = 0

    # -- failures before an account is proven ----------------------------------------------

    def refusal(self) -> Busy | None:
        """Busy when this client address (or everyone unproven) failed too often lately:
        checked before any parsing, database or signature work."""
        limits = self.limits
        if limits.failures is not None:
            wait = limits.failures.wait(self.client)
            if wait > 0:
                TALLY.note("failure_limit", client=self.client)
                return Busy("too many failed requests from your address", wait)
        if limits.all_failures is not None and not limits._is_proven(self.client):
            wait = limits.all_failures.wait("*")
            if wait > 0:
                TALLY.note("failure_limit_global", client=self.client)
                return Busy("too many failed requests to this server", wait)
        return None

    def failed(self) -> bool:
        """Count an answer that failed before an account was proven. False when this address
        had no failure left in its budget (its next request is refused unread): a flood of
        garbage is then not worth a log line per request."""
        limits = self.limits
        within = True
        if limits.failures is not None:
            within = limits.failures.take(self.client) == 0.0
        if limits.all_failures is not None:
            limits.all_failures.take("*")
        return within

    # -- a proven account ------------------------------------------------------------------

    def check_account(self, account_id: int) -> None:
        """Called once the account is authenticated: raises Busy over its request rate."""
        self.limits._prove(self.client)
        buckets = self.limits.accounts
        if buckets is None:
            return
        wait = buckets.take(account_id)
        if wait > 0:
            TALLY.note("rate_limit", account_id=account_id)
            raise Busy(
                f"rate limit of {buckets.rate:g} requests a second for this account exceeded",
                wait,
            )
