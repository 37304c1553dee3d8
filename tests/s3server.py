"""A real S3 server for tests: moto's standalone server as a subprocess on a loopback port."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
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


class TcpProxy:
    """A loopback TCP forwarder in front of a server. ``stop()`` closes the listener and
    every open connection, so clients see the endpoint vanish (connection refused/reset);
    ``start()`` brings it back at the same address while the server behind keeps its state.
    """

    def __init__(self, target_port: int, port: int | None = None) -> None:
        import threading

        self.port = port or _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._target = ("127.0.0.1", target_port)
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._listener: socket.socket | None = None

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
            try:
                upstream = socket.create_connection(self._target)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
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
