"""Network namespaces for partition tests: a "host" is a namespace joined to this machine's
root namespace by one veth pair (a /30 of 10.213.0.0/16); services listening on 127.0.0.1
are reached from it through forwarders bound to the root side's veth address. Cutting the
host sets the root side of its veth down: every packet either way is dropped, open TCP
connections go silent (nothing is reset), and new ones get no answer, until it is
restored. Nothing leaves the machine: the root namespace does not forward packets.

Everything here shells out to iproute2 (``ip``) and needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN).
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable

IP = "ip"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([IP, *args], check=check, capture_output=True, text=True, timeout=30)


def unavailable() -> str | None:
    """None when namespaces and veth pairs can be made here, else why not."""
    probe = f"vpprobe{os.getpid()}"
    try:
        made = _ip("netns", "add", probe, check=False)
    except (FileNotFoundError, subprocess.SubprocessError) as exc:
        return f"iproute2 `ip` not usable: {type(exc).__name__}"
    if made.returncode != 0:
        return f"`ip netns add` not permitted: {made.stderr.strip()}"
    try:
        veth = _ip(
            "-n", probe, "link", "add", "vpp0", "type", "veth", "peer", "name", "vpp1", check=False
        )
        if veth.returncode != 0:
            return f"`ip link add ... type veth` not permitted: {veth.stderr.strip()}"
    finally:
        _ip("netns", "del", probe, check=False)
    return None


def _free_subnet(first: int) -> int:
    """A /29 of 10.213.0.0/16 (two /30s) no interface of the root namespace uses."""
    used = _ip("-o", "-4", "addr", "show").stdout
    for step in range(2048):
        block = (first + step) % 2048
        if not re.search(rf"inet 10\.213\.{block // 32}\.{(block % 32) * 8 + 1}\D", used):
            return block
    raise RuntimeError("no free /29 in 10.213.0.0/16")  # pragma: no cover


class Host:
    """A namespace with one veth pair to the root namespace, and a default route over it
    (to the root side's addresses only: the root namespace forwards nothing)."""

    def __init__(self, name: str, host_ip: str, ns_ip: str) -> None:
        self.name = name
        self.host_ip = host_ip  # root side: the forwarders listen here
        self.ns_ip = ns_ip
        self.host_if = f"{name}h"  # IFNAMSIZ: at most 15 characters
        self.ns_if = f"{name}n"
        self.cut_at = self.restored_at = 0.0  # wall clock, to compare with the workers' logs

    def create(self) -> Host:
        _ip("netns", "add", self.name)
        _ip("link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
        _ip("link", "set", self.ns_if, "netns", self.name)
        _ip("addr", "add", f"{self.host_ip}/30", "dev", self.host_if)
        _ip("link", "set", self.host_if, "up")
        _ip("-n", self.name, "link", "set", "lo", "up")
        _ip("-n", self.name, "addr", "add", f"{self.ns_ip}/30", "dev", self.ns_if)
        _ip("-n", self.name, "link", "set", self.ns_if, "up")
        _ip("-n", self.name, "route", "add", "default", "via", self.host_ip)
        return self

    def argv(self, *command: str) -> list[str]:
        """``command`` run inside the namespace."""
        return [IP, "netns", "exec", self.name, *command]

    def cut(self) -> None:
        """Drop everything to and from the host (its side sees no carrier)."""
        _ip("link", "set", self.host_if, "down")
        self.cut_at = time.time()

    def restore(self) -> None:
        _ip("link", "set", self.host_if, "up")
        self.restored_at = time.time()

    def delete(self) -> None:
        """Remove the veth pair and the namespace; safe to call for a half-made host."""
        _ip("link", "del", self.host_if, check=False)
        _ip("netns", "del", self.name, check=False)


def make_hosts(count: int) -> list[Host]:
    """``count`` hosts named after this process (unique on the machine), on free /30s.
    The caller deletes them (``Host.delete``) whatever happens."""
    hosts = []
    pid = os.getpid()
    block = _free_subnet(pid % 2048)
    base = f"10.213.{block // 32}.{(block % 32) * 8}"
    a, b, c, d = (int(x) for x in base.split("."))
    for index in range(count):
        if index >= 2:
            raise ValueError("one /29 holds two hosts")
        start = d + 4 * index
        hosts.append(
            Host(
                f"vp{pid}{chr(ord('a') + index)}",
                f"{a}.{b}.{c}.{start + 1}",
                f"{a}.{b}.{c}.{start + 2}",
            )
        )
    return hosts


# -- forwarders --------------------------------------------------------------------------

REQUEST_LINE = re.compile(rb"^(GET|PUT|POST|HEAD|DELETE) (\S+) HTTP/1\.[01]\r\n")


class Connection:
    """One forwarded connection. ``hold_request``/``hold_response`` keep what one side sends
    from the other (it is buffered, not dropped); ``release`` passes it on; ``reset`` ends
    the connection with an RST to the client and closes the upstream side."""

    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.client = client
        self.upstream = upstream
        self._lock = threading.Lock()
        self._held: dict[str, bytearray | None] = {"request": None, "response": None}
        self.response_held = threading.Event()  # some answer is being kept from the client

    def hold_request(self) -> None:
        with self._lock:
            self._held["request"] = self._held["request"] or bytearray()

    def hold_response(self) -> None:
        with self._lock:
            self._held["response"] = self._held["response"] or bytearray()

    def release(self) -> None:
        with self._lock:
            held, self._held = self._held, {"request": None, "response": None}
            for way, sock in (("request", self.upstream), ("response", self.client)):
                if held[way]:
                    with contextlib.suppress(OSError):
                        sock.sendall(bytes(held[way]))  # type: ignore[arg-type]

    def pass_on(self, way: str, data: bytes, sock: socket.socket) -> None:
        with self._lock:
            held = self._held[way]
            if held is not None:
                held += data
                if way == "response":
                    self.response_held.set()
                return
        sock.sendall(data)

    def reset(self) -> None:
        """Forget the connection as a restarted peer does: both sockets are gone (aborted:
        what is sent on them is lost if the link is down, and the client is then told
        nothing; a packet it sends later meets a reset), and the server side is closed."""
        for sock in (self.client, self.upstream):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            # shutdown() first: a close() alone leaves the socket alive while a pipe thread
            # is blocked in recv() on it.
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()


RequestHook = Callable[[Connection, bytes], None]


class Forwarder:
    """Listens on ``host``:``port`` (a veth's root-side address) and forwards each
    connection to 127.0.0.1:``target_port``. ``on_request(connection, request_line)`` is
    called, before it is passed on, for each chunk a client sends that starts an HTTP
    request: the tests cut a host, or hold a request or its answer, at an exact request."""

    def __init__(
        self, host: str, target_port: int, *, on_request: RequestHook | None = None
    ) -> None:
        self.host = host
        self._target = ("127.0.0.1", target_port)
        self._on_request = on_request
        self._lock = threading.Lock()
        self.connections: list[Connection] = []
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((host, 0))
        self.port = self._listener.getsockname()[1]

    def start(self) -> Forwarder:
        self._listener.listen(64)
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            try:
                upstream = socket.create_connection(self._target, timeout=10)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            conn = Connection(client, upstream)
            with self._lock:
                self.connections.append(conn)
            threading.Thread(target=self._pipe, args=(conn, "request"), daemon=True).start()
            threading.Thread(target=self._pipe, args=(conn, "response"), daemon=True).start()

    def _pipe(self, conn: Connection, way: str) -> None:
        src, dst = (
            (conn.client, conn.upstream) if way == "request" else (conn.upstream, conn.client)
        )
        try:
            while data := src.recv(65536):
                if way == "request" and self._on_request is not None:
                    line = REQUEST_LINE.match(data)
                    if line is not None:
                        self._on_request(conn, line.group(0).strip())
                conn.pass_on(way, data, dst)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def reset_all(self) -> None:
        """Forget every open connection (see Connection.reset)."""
        with self._lock:
            connections, self.connections = self.connections, []
        for conn in connections:
            conn.reset()

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self._listener.close()
        self.reset_all()
