"""Slow-connection attacks on a real `vodpush serve`, and what they cost it.

Starts `vodpush serve --no-worker` on a free loopback port (a fresh SQLite database, two
accounts), opens many attacking connections from 127.0.0.2 and, meanwhile, probes the
server from 127.0.0.1 as a good client would: GET /healthz and a signed aws.status, each on
a new connection. Reports the server's RSS growth (VmRSS), the probes' latency, and when
the server closed each attacking connection.

Attacks (--mode, one or several, comma-separated, each with --connections sockets):
  idle     connects and sends nothing
  headers  a request sent one byte a second, headers never complete (slowloris)
  body     complete headers with Content-Length: 1 MiB, then one byte a second
  stall    the same, but most of the body (--prefill bytes) at once, then a byte a second:
           the memory an attacker can make the server hold

    make bench-slowloris
    .venv/bin/python bench/slowloris.py --mode headers,body --connections 300 --duration 40
    .venv/bin/python bench/slowloris.py --mode stall --env VODPUSH_BODY_TIMEOUT=5

tests/test_dos.py drives the same attacks with short timeouts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import os
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from vodpush.config import Settings
from vodpush.crypto import generate_key
from vodpush.protocol.signing import sign_request
from vodpush.service import Service

ATTACKER = "127.0.0.2"  # a second loopback address, so the server can tell us apart
GOOD = "127.0.0.1"
MiB = 1024 * 1024


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((GOOD, 0))
        return sock.getsockname()[1]


def raise_fd_limit(wanted: int) -> int:
    """Raise the soft limit on open files towards ``wanted`` (within the hard limit); the
    server subprocess inherits it. Returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


# -- the server ---------------------------------------------------------------------------


class ServeProcess:
    """`vodpush serve --no-worker` in a subprocess, settings by environment."""

    def __init__(self, work: Path, env: dict[str, str] | None = None, accounts: int = 2) -> None:
        self.work = work
        self.port = free_port()
        self.url = f"http://{GOOD}:{self.port}"
        key = generate_key()
        db_url = f"sqlite:///{work / 'vodpush.db'}"
        (work / "sestore1").mkdir(parents=True, exist_ok=True)
        service = Service.open(Settings(database_url=db_url, secret_key=key, sestore_root=work))
        self.accounts = [
            service.accounts.create(cdn=100 + i, username=f"user{i}") for i in range(accounts)
        ]
        service.close()
        self.env = {
            **os.environ,
            "VODPUSH_DATABASE_URL": db_url,
            "VODPUSH_SECRET_KEY": key,
            "VODPUSH_SESTORE_ROOT": str(work),
            "VODPUSH_LOG_LEVEL": "warning",
            **(env or {}),
        }
        self.log_path = work / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ServeProcess:
        cmd = [sys.executable, "-m", "vodpush", "serve", "--no-worker", "--port", str(self.port)]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vodpush serve exited: {self.log_path.read_text()[-2000:]}")
            with contextlib.suppress(OSError):
                if get(self.port, "/healthz", timeout=1)[0] == 200:
                    return self
            time.sleep(0.1)
        raise RuntimeError("vodpush serve did not start")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def rss(self) -> int:
        """Resident set size in bytes (VmRSS)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def log_lines(self) -> list[str]:
        return self.log_path.read_text(errors="replace").splitlines()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> ServeProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- a good client ------------------------------------------------------------------------


def status_body(account: dict[str, Any], **extra: Any) -> bytes:
    payload = {
        "command": "aws.status",
        "api_key": account["api_key"],
        "cdn": account["cdn"],
        "timestamp": int(time.time()),
        **extra,
    }
    return ("json=" + quote(sign_request(payload, account["api_secret"]), safe="")).encode()


def request(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    *,
    timeout: float = 5,
    source: str = GOOD,
    headers: dict[str, str] | None = None,
) -> tuple[int, bytes]:
    """One request on a new connection from ``source``: (HTTP status, body)."""
    conn = http.client.HTTPConnection(GOOD, port, timeout=timeout, source_address=(source, 0))
    try:
        hdrs = {"Connection": "close", **(headers or {})}
        if body is not None:
            hdrs["Content-Type"] = "application/x-www-form-urlencoded"
        conn.request(method, path, body=body, headers=hdrs)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def get(port: int, path: str, *, timeout: float = 5) -> tuple[int, bytes]:
    return request(port, "GET", path, timeout=timeout)


def post_status(
    port: int, account: dict[str, Any], *, timeout: float = 5, source: str = GOOD
) -> dict[str, Any]:
    status, body = request(
        port, "POST", "/stable/", status_body(account), timeout=timeout, source=source
    )
    if status != 200:
        raise RuntimeError(f"HTTP {status}: {body[:200]!r}")
    return json.loads(body)


@dataclass
class Probes:
    """Latencies (seconds) of the good client's probes, and the server's RSS over time."""

    healthz: list[float] = field(default_factory=list)
    status: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    rss: list[int] = field(default_factory=list)


class Prober(threading.Thread):
    """Every ``interval``: GET /healthz and a signed aws.status, each on a new connection,
    and a sample of the server's RSS. A probe that fails or takes over ``timeout`` counts
    as a failure (with ``timeout`` as its latency)."""

    def __init__(
        self, server: ServeProcess, *, interval: float = 0.1, timeout: float = 5.0
    ) -> None:
        super().__init__(daemon=True, name="prober")
        self.server = server
        self.interval = interval
        self.timeout = timeout
        self.result = Probes()
        self._halt = threading.Event()

    def run(self) -> None:
        account = self.server.accounts[0]
        while not self._halt.is_set():
            self.result.rss.append(self.server.rss())
            t0 = time.perf_counter()
            try:
                status, _ = get(self.server.port, "/healthz", timeout=self.timeout)
                if status != 200:
                    raise RuntimeError(f"healthz HTTP {status}")
                self.result.healthz.append(time.perf_counter() - t0)
            except Exception as exc:
                self.result.healthz.append(self.timeout)
                self.result.failures.append(f"healthz: {exc!r}")
            t0 = time.perf_counter()
            try:
                answer = post_status(self.server.port, account, timeout=self.timeout)
                if answer.get("status") != "success":
                    raise RuntimeError(f"aws.status answered {answer}")
                self.result.status.append(time.perf_counter() - t0)
            except Exception as exc:
                self.result.status.append(self.timeout)
                self.result.failures.append(f"aws.status: {exc!r}")
            self._halt.wait(self.interval)

    def stop(self) -> Probes:
        self._halt.set()
        self.join()
        return self.result


# -- the attackers ------------------------------------------------------------------------


@dataclass
class Attacker:
    """One attacking connection: when it opened, when the server closed it (None if it
    never did), and the first bytes the server answered, if any."""

    mode: str
    opened: float = 0.0
    closed: float | None = None
    answer: bytes = b""
    error: str | None = None

    @property
    def held(self) -> float | None:
        return None if self.closed is None else self.closed - self.opened


def _attack_bytes(mode: str, port: int, prefill: int) -> tuple[bytes, bytes]:
    """(sent at once, then sent one byte at a time)."""
    if mode == "idle":
        return b"", b""  # connects and sends nothing
    if mode == "headers":
        head = f"POST /stable/ HTTP/1.1\r\nHost: {GOOD}:{port}\r\n".encode()
        # Every byte of the request line and the headers trickles; they never complete.
        return b"", head + b"X-Pad: " + b"a" * 100_000
    content_length = MiB
    head = (
        f"POST /stable/ HTTP/1.1\r\nHost: {GOOD}:{port}\r\n"
        "Content-Type: application/x-www-form-urlencoded\r\n"
        f"Content-Length: {content_length}\r\n\r\n"
    ).encode()
    first = head + (b"json=" + b"a" * (prefill - 5) if mode == "stall" else b"")
    return first, b"a" * (content_length - max(prefill, 0))


async def _one(
    att: Attacker,
    port: int,
    *,
    source: str,
    interval: float,
    until: float,
    prefill: int,
) -> None:
    first, trickle = _attack_bytes(att.mode, port, prefill)
    att.opened = time.monotonic()
    try:
        reader, writer = await asyncio.open_connection(GOOD, port, local_addr=(source, 0))
    except OSError as exc:
        att.error = f"connect: {exc!r}"
        att.closed = time.monotonic()
        return

    async def read_until_closed() -> None:
        try:
            while True:
                data = await reader.read(4096)
                if not data:
                    break
                if len(att.answer) < 1000:
                    att.answer += data[: 1000 - len(att.answer)]
        except OSError:
            pass
        att.closed = time.monotonic()

    reading = asyncio.create_task(read_until_closed())
    try:
        if first:
            writer.write(first)
            await writer.drain()
        for i in range(len(trickle)):
            if reading.done() or time.monotonic() >= until:
                break
            writer.write(trickle[i : i + 1])
            await writer.drain()
            await asyncio.wait({reading}, timeout=interval)
    except OSError:
        pass  # the server closed it; the reader notes when
    remaining = until - time.monotonic()
    if remaining > 0 and not reading.done():
        await asyncio.wait({reading}, timeout=remaining)
    reading.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await reading
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


async def _slot(
    mode: str, out: list[Attacker], *, until: float, reconnect: bool, **kwargs: Any
) -> None:
    while True:
        att = Attacker(mode)
        out.append(att)
        await _one(att, until=until, **kwargs)
        if not reconnect or time.monotonic() >= until:
            return
        if att.error:
            await asyncio.sleep(0.1)  # refused at connect: do not spin


async def attack_async(
    port: int,
    modes: list[str],
    *,
    connections: int,
    duration: float,
    interval: float = 1.0,
    prefill: int = MiB - 4096,
    source: str = ATTACKER,
    reconnect: bool = False,
) -> list[Attacker]:
    """``connections`` sockets per mode for ``duration`` seconds (each one opened again once
    the server closes it, with ``reconnect``); returns what happened to every connection
    (opened and closed in monotonic time)."""
    until = time.monotonic() + duration
    attackers: list[Attacker] = []
    await asyncio.gather(
        *(
            _slot(
                mode,
                attackers,
                until=until,
                reconnect=reconnect,
                port=port,
                source=source,
                interval=interval,
                prefill=prefill,
            )
            for mode in modes
            for _ in range(connections)
        )
    )
    return attackers


def attack(port: int, modes: list[str], **kwargs: Any) -> list[Attacker]:
    return asyncio.run(attack_async(port, modes, **kwargs))


# -- the report ---------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summary(
    attackers: list[Attacker], probes: Probes, rss_before: int, duration: float
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "rss_before_mib": round(rss_before / MiB, 1),
        "rss_peak_mib": round(max(probes.rss, default=rss_before) / MiB, 1),
        "rss_growth_mib": round((max(probes.rss, default=rss_before) - rss_before) / MiB, 1),
        "probe_failures": len(probes.failures),
    }
    for name, lat in (("healthz", probes.healthz), ("status", probes.status)):
        out[name] = {
            "n": len(lat),
            "p50_ms": round(percentile(lat, 0.5) * 1000, 1),
            "p99_ms": round(percentile(lat, 0.99) * 1000, 1),
            "max_ms": round(max(lat, default=float("nan")) * 1000, 1),
        }
    for mode in sorted({a.mode for a in attackers}):
        mine = [a for a in attackers if a.mode == mode]
        held = [a.held for a in mine if a.held is not None]
        answers: dict[str, int] = {}
        for a in mine:
            line = a.answer.split(b"\r\n", 1)[0].decode("latin-1") or "(none)"
            answers[line] = answers.get(line, 0) + 1
        out[mode] = {
            "connections": len(mine),
            "closed_by_server": len(held),
            "held_s_median": round(statistics.median(held), 1) if held else None,
            "held_s_max": round(max(held), 1) if held else None,
            "open_at_end": len(mine) - len(held),
            "connect_errors": sum(1 for a in mine if a.error),
            "answers": answers,
        }
    out["duration_s"] = duration
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", default="headers,body", help="idle, headers, body, stall")
    parser.add_argument("--connections", type=int, default=300, help="per mode")
    parser.add_argument("--duration", type=float, default=40.0, help="seconds of attack")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between bytes")
    parser.add_argument("--prefill", type=int, default=MiB - 4096, help="stall: bytes at once")
    parser.add_argument(
        "--reconnect", action="store_true", help="reopen each connection the server closes"
    )
    parser.add_argument("--env", action="append", default=[], help="VODPUSH_X=value for the server")
    args = parser.parse_args()
    modes = [m.strip() for m in args.mode.split(",") if m.strip()]
    raise_fd_limit(4 * args.connections * len(modes) + 256)
    env = dict(item.split("=", 1) for item in args.env)
    with tempfile.TemporaryDirectory(prefix="vodpush-slowloris-") as tmp:
        server = ServeProcess(Path(tmp), env).start()
        try:
            time.sleep(1)  # let the fresh process settle before the baseline
            for _ in range(20):  # warm both paths up: the first calls allocate caches
                get(server.port, "/healthz")
                post_status(server.port, server.accounts[0])
            rss_before = server.rss()
            prober = Prober(server)
            prober.start()
            attackers = attack(
                server.port,
                modes,
                connections=args.connections,
                duration=args.duration,
                interval=args.interval,
                prefill=args.prefill,
                reconnect=args.reconnect,
            )
            probes = prober.stop()
            report = summary(attackers, probes, rss_before, args.duration)
            report["rss_after_mib"] = round(server.rss() / MiB, 1)
        finally:
            server.stop()
    print(json.dumps(report, indent=2))
    if probes.failures:
        print("first probe failures:", *probes.failures[:5], sep="\n  ", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
