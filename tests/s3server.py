"""A real S3 server for tests: moto's standalone server as a subprocess on a loopback port."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path

from vodpush.core.accounts import S3Settings


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MotoServer:
    """``python -m moto.server`` on 127.0.0.1; ``start()`` returns once it answers HTTP."""

    def __init__(
        self,
        *,
        env: Mapping[str, str] | None = None,
        log_dir: Path | None = None,
        port: int | None = None,
    ):
        # A fixed port lets a test stop the server and start a new one at the same address.
        self.port = port or _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._env = dict(env or {})
        self._log_dir = log_dir
        self._process: subprocess.Popen[bytes] | None = None
        self._log_path: Path | None = None

    def settings(self, **overrides: object) -> S3Settings:
        """S3Settings pointing at this server, with moto's conventional fake credentials."""
        values: dict[str, object] = {
            "endpoint_url": self.url,
            "region": "us-east-1",
            "access_key_id": "testing",
            "secret_access_key": "testing",
        }
        values.update(overrides)
        return S3Settings(**values)  # type: ignore[arg-type]

    def start(self, timeout: float = 30.0) -> MotoServer:
        env = {**os.environ, **self._env}
        log_dir = self._log_dir or Path(os.environ.get("TMPDIR", "/tmp"))
        self._log_path = log_dir / f"moto-{self.port}.log"
        with open(self._log_path, "wb") as log:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"moto server exited early: {self._log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/moto-api/", timeout=1):
                    return self
            except urllib.error.HTTPError:
                return self  # it answered: that is all we wait for
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"moto server did not answer within {timeout} s: {self._log_tail()}")

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)

    def _log_tail(self) -> str:
        if self._log_path is None or not self._log_path.exists():
            return ""
        return self._log_path.read_text(errors="replace")[-2000:]

    def __enter__(self) -> MotoServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class Intercept:
    """What a TcpProxy does to the first request whose head holds ``marker`` (a request
    line such as ``b"POST /bucket/key?uploadId="``), once.

    ``before()`` runs before the request goes on; ``after()`` once its whole response has
    reached the client (or, with ``cut``, once the connection is closed instead of passing
    the response on: S3 did the work, the client never hears of it). ``answer`` answers the
    request in S3's place (S3 never sees it): a server behaviour moto lacks.
    """

    marker: bytes
    before: Callable[[], None] | None = None
    after: Callable[[], None] | None = None
    cut: bool = False
    answer: bytes | None = None
    done: threading.Event = field(default_factory=threading.Event)


def s3_error(status: int, code: str, message: str) -> bytes:
    """An S3 error response, as S3 sends it."""
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message}</Message></Error>"
    ).encode()
    head = (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"
        "Content-Type: application/xml\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def _message_length(buffer: bytes, *, response: bool) -> int | None:
    """The length of the HTTP message at the start of ``buffer`` (interim 1xx responses
    included), or None while it is incomplete."""
    offset = 0
    while True:
        end = buffer.find(b"\r\n\r\n", offset)
        if end < 0:
            return None
        head = buffer[offset:end].decode("latin-1").split("\r\n")
        headers = {
            name.strip().lower(): value.strip()
            for name, _, value in (line.partition(":") for line in head[1:])
        }
        body_start = end + 4
        if response:
            status = int(head[0].split()[1])
            if 100 <= status < 200:
                offset = body_start
                continue
            if status in (204, 304):
                return body_start
        if headers.get("transfer-encoding", "").lower() == "chunked":
            tail = buffer.find(b"0\r\n\r\n", body_start)
            return None if tail < 0 else tail + 5
        length = int(headers.get("content-length", "0"))
        return body_start + length if len(buffer) >= body_start + length else None


class TcpProxy:
    """A loopback TCP forwarder in front of a server. ``stop()`` closes the listener and
    every open connection, so clients see the endpoint vanish (connection refused/reset);
    ``start()`` brings it back at the same address while the server behind keeps its state.
    ``intercept()`` acts on one chosen request (see Intercept).
    """

    def __init__(self, target_port: int, port: int | None = None) -> None:
        self.port = port or _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._target = ("127.0.0.1", target_port)
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self._intercepts: list[Intercept] = []

    def intercept(self, rule: Intercept) -> Intercept:
        with self._lock:
            self._intercepts.append(rule)
        return rule

    def _take(self, data: bytes) -> Intercept | None:
        with self._lock:
            for rule in self._intercepts:
                if rule.marker in data:
                    self._intercepts.remove(rule)
                    return rule
        return None

    def start(self) -> TcpProxy:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return self

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # listener closed
            try:
                upstream = socket.create_connection(self._target)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets += [client, upstream]
            pending: list[Intercept] = []  # the rule whose request awaits its response
            threading.Thread(
                target=self._requests, args=(client, upstream, pending), daemon=True
            ).start()
            threading.Thread(
                target=self._responses, args=(upstream, client, pending), daemon=True
            ).start()

    def _requests(self, src: socket.socket, dst: socket.socket, pending: list[Intercept]) -> None:
        try:
            while data := src.recv(65536):
                rule = self._take(data) if self._intercepts else None
                if rule is None:
                    dst.sendall(data)
                    continue
                if rule.before is not None:
                    rule.before()
                if rule.answer is None:
                    pending.append(rule)  # before the request goes: its answer may be quick
                    dst.sendall(data)
                    continue
                # Answered here: take the whole request in, send none of it on.
                while _message_length(data, response=False) is None:
                    more = src.recv(65536)
                    if not more:
                        return
                    data += more
                src.sendall(rule.answer)
                rule.done.set()
                if rule.after is not None:
                    rule.after()
        except OSError:
            pass
        finally:
            self._close(src, dst)

    def _responses(self, src: socket.socket, dst: socket.socket, pending: list[Intercept]) -> None:
        response = b""
        try:
            while data := src.recv(65536):
                if not pending:
                    dst.sendall(data)
                    continue
                rule = pending[0]
                if rule.cut:
                    self._close(src, dst)
                else:
                    dst.sendall(data)
                    response += data
                    if _message_length(response, response=True) is None:
                        continue
                pending.clear()
                response = b""
                rule.done.set()
                if rule.after is not None:
                    rule.after()
                if rule.cut:
                    return
        except OSError:
            pass
        finally:
            self._close(src, dst)

    @staticmethod
    def _close(*sockets: socket.socket) -> None:
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def stop(self) -> None:
        if self._listener is not None:
            # shutdown() first: close() alone does not wake the thread blocked in accept(),
            # which would then let one more connection through after the "outage" began.
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
            self._listener = None
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


# The soak's proxy: TcpProxy's outage switch plus modes that keep the link up but bad.
class ModalProxy:
    """A loopback TCP forwarder in front of a server. ``stop()`` closes the listener and
    every open connection, so clients see the endpoint vanish (connection refused/reset);
    ``start()`` brings it back at the same address while the server behind keeps its state.

    ``set_mode`` makes the link bad while it stays up: ``"slow"`` holds every chunk of data
    ``delay`` seconds before passing it on; ``"reset"`` gives each connection, with
    probability ``fraction``, a budget of at most ``max_bytes`` bytes, after which it is
    reset (RST to the client, mid-request); ``"pass"`` (the default) forwards as is.
    """

    MODES = ("pass", "slow", "reset")

    def __init__(self, target_port: int, port: int | None = None, *, seed: int | None = None):
        import random
        import threading

        self.port = port or _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._target = ("127.0.0.1", target_port)
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self._random = random.Random(seed)
        self._mode = "pass"
        self._epoch = 0  # bumped by set_mode: connections draw their fate again
        self._delay = 0.0
        self._fraction = 0.0
        self._max_bytes = 0
        self.resets = 0  # connections reset by "reset" mode

    def set_mode(
        self,
        mode: str,
        *,
        delay: float = 0.2,
        fraction: float = 0.5,
        max_bytes: int = 256 * 1024,
    ) -> None:
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}, got {mode!r}")
        with self._lock:
            self._mode, self._delay = mode, delay
            self._fraction, self._max_bytes = fraction, max_bytes
            self._epoch += 1

    @property
    def mode(self) -> str:
        return self._mode

    def start(self) -> TcpProxy:
        import threading

        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return self

    def _accept(self, listener: socket.socket) -> None:
        import threading

        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # listener closed
            if self._listener is not listener:  # stopped while this one came in
                client.close()
                return
            try:
                upstream = socket.create_connection(self._target)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets += [client, upstream]
            link = _Link(client, upstream)
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(link, src, dst), daemon=True).start()

    def _pipe(self, link: _Link, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                if self._mode == "slow":
                    time.sleep(self._delay)
                # Only what the client sends counts against the budget: this thread is then
                # the only one reading the client socket, and may close it.
                if src is link.client and self._spend(link, len(data)):
                    self._reset(link)
                    return
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            self._finished(link)

    def _finished(self, link: _Link) -> None:
        """The second of a link's two threads to end closes its sockets (a long run through
        the proxy would otherwise keep a descriptor per connection it ever carried). They
        stay listed until stop(): tests read the list as the connections the proxy saw."""
        with self._lock:
            link.pipes_done += 1
            if link.pipes_done < 2:
                return
        for sock in (link.client, link.upstream):
            sock.close()

    def _spend(self, link: _Link, size: int) -> bool:
        """Whether ``size`` more bytes exceed what ``link`` may carry in the current mode."""
        with self._lock:
            if self._mode != "reset":
                return False
            if link.epoch != self._epoch:  # the mode changed since: draw the link's fate
                link.epoch = self._epoch
                doomed = self._random.random() < self._fraction
                link.budget = self._random.randint(0, self._max_bytes) if doomed else None
            if link.budget is None:
                return False
            if link.budget < size:
                return True
            link.budget -= size
            return False

    def _reset(self, link: _Link) -> None:
        """An RST to the client (SO_LINGER 0, then close), a plain close to the server."""
        import struct

        with self._lock:
            self.resets += 1
        with contextlib.suppress(OSError):
            link.client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        link.client.close()
        with contextlib.suppress(OSError):
            link.upstream.shutdown(socket.SHUT_RDWR)

    def stop(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            # A thread blocked in accept() keeps a closed listener alive, and would still
            # take one more connection: shutdown() wakes it first.
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


class _Link:
    """One proxied connection: its two sockets and what "reset" mode allows it."""

    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.client = client
        self.upstream = upstream
        self.epoch = 0
        self.budget: int | None = None
        self.pipes_done = 0
