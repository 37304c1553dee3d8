"""A loopback endpoint in front of a real server whose behaviour a test switches at any
moment, for connections already open as well as new ones:

- ``forward``: bytes pass both ways (a healthy server);
- ``refuse``: the listener is closed and open connections are cut (connection refused);
- ``blackhole``: connections are accepted and everything sent is read, but nothing ever
  comes back (a server, or a network, that swallows requests);
- ``trickle``: requests reach the server, answers come back a byte every ``interval``
  seconds (slow enough that a read timeout never fires, so a call never ends).

Also a callback receiver that can be made to hang: it reads a POST and never answers.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tests.s3server import _free_port

MODES = ("forward", "refuse", "blackhole", "trickle")


class FaultyEndpoint:
    def __init__(self, target_port: int, *, interval: float = 0.25) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.interval = interval
        self.mode = "forward"
        self._target = ("127.0.0.1", target_port)
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._listener: socket.socket | None = None
        # Bytes a client sent into the hole, answer bytes the hole kept from it (the request
        # had gone through before the hole opened), and answer bytes trickled back: a test
        # waits on them to know a call is stuck in flight.
        self.swallowed = 0
        self.withheld = 0
        self.trickled = 0

    def start(self) -> FaultyEndpoint:
        self._listen()
        return self

    def set_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        self.mode = mode
        if mode == "refuse":
            self._close_all()
        elif self._listener is None:
            self._listen()

    def stop(self) -> None:
        self.mode = "refuse"
        self._close_all()

    # -- internals --------------------------------------------------------------------------

    def _listen(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _close_all(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # listener closed
            with self._lock:
                self._sockets.append(client)
            if self.mode == "blackhole":
                threading.Thread(target=self._swallow, args=(client,), daemon=True).start()
                continue
            try:
                upstream = socket.create_connection(self._target)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets.append(upstream)
            threading.Thread(target=self._requests, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._answers, args=(upstream, client), daemon=True).start()

    def _swallow(self, client: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := client.recv(65536):
                self.swallowed += len(data)

    def _requests(self, client: socket.socket, upstream: socket.socket) -> None:
        try:
            while data := client.recv(65536):
                if self.mode == "blackhole":
                    self.swallowed += len(data)
                else:
                    upstream.sendall(data)
        except OSError:
            pass
        finally:
            _shut(client, upstream)

    def _answers(self, upstream: socket.socket, client: socket.socket) -> None:
        try:
            while data := upstream.recv(65536):
                if self.mode == "blackhole":
                    self.withheld += len(data)
                while data and self.mode in ("trickle", "blackhole"):
                    if self.mode == "trickle":
                        client.sendall(data[:1])
                        data = data[1:]
                        self.trickled += 1
                    time.sleep(self.interval)
                client.sendall(data)
        except OSError:
            pass
        finally:
            _shut(upstream, client)


def _shut(*sockets: socket.socket) -> None:
    for sock in sockets:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


class HangingReceiver:
    """A callback receiver on a loopback port. While ``hang`` is set it reads each POST and
    never answers (until the client gives up); otherwise it answers 204. Every POST body is
    kept with its headers, and ``answered`` counts the 204s it sent."""

    def __init__(self) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/hook"
        self.hang = threading.Event()
        self.got_post = threading.Event()
        self.received: list[tuple[dict[str, str], bytes]] = []
        self.answered: list[dict[str, str]] = []
        self._release = threading.Event()  # ends the hanging handlers when the test is done
        self._server: ThreadingHTTPServer | None = None

    def start(self) -> HangingReceiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                headers = {k.lower(): v for k, v in self.headers.items()}
                receiver.received.append((headers, body))
                receiver.got_post.set()
                if receiver.hang.is_set():
                    receiver._release.wait(120)
                    return  # no answer at all: the connection just closes
                self.send_response(204)
                self.end_headers()
                receiver.answered.append(headers)

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def stop(self) -> None:
        self._release.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
