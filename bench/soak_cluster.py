"""What the soak runs against, all on loopback: a database of its own on the shared
PostgreSQL server, a moto S3 server process, the fault proxy in front of it
(bench/soak_proxy.py), API processes (`vodpush serve --no-worker`) and worker processes
(`vodpush worker`). Each piece starts, stops and is faulted only through its own handle,
by the pid the soak started; the shared PostgreSQL server itself is never touched, only
the connections to the soak's own database.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import httpx
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

# The application_name of each kind of process: how the soak finds the workers' connections.
WORKER_APP = "soak-worker"
API_APP = "soak-api"
HARNESS_APP = "soak-harness"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Database:
    """A fresh database on the shared server, created and dropped by the soak."""

    def __init__(self, admin_url: str) -> None:
        self._admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
        self.name = f"vodpush_soak_{uuid.uuid4().hex[:10]}"
        self._base = make_url(admin_url).set(database=self.name)

    def create(self) -> Database:
        with self._admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{self.name}"'))
        return self

    def url(self, application: str) -> str:
        """The database's URL for one kind of process, tagged so its connections can be told."""
        url = self._base.update_query_dict({"application_name": application})
        return url.render_as_string(hide_password=False)

    def terminate(self, application: str) -> int:
        """pg_terminate_backend on this database's connections of ``application``."""
        with self._admin.connect() as conn:
            return conn.execute(
                text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE datname = :db AND application_name = :app AND pid <> pg_backend_pid()"
                ),
                {"db": self.name, "app": application},
            ).scalar_one()

    def drop(self) -> None:
        with self._admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)'))
        self._admin.dispose()


class ProxyProcess:
    """bench/soak_proxy.py: the S3 fault proxy in its own process, one command a line."""

    def __init__(self, target_port: int, seed: int, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = log.open("wb")
        self._lock = threading.Lock()  # the faults and their timers share one pipe
        self._process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.soak_proxy",
                "--target",
                str(target_port),
                "--port",
                str(self.port),
                "--seed",
                str(seed),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            cwd=Path(__file__).resolve().parent.parent,
        )
        self._expect("ready")

    def _expect(self, want: str | None = None) -> str:
        assert self._process.stdout is not None
        line = self._process.stdout.readline().strip()
        if not line or line.startswith("error") or (want is not None and line != want):
            raise RuntimeError(f"S3 proxy answered {line!r}")
        return line

    def command(self, line: str) -> str:
        assert self._process.stdin is not None
        with self._lock:
            self._process.stdin.write(line + "\n")
            self._process.stdin.flush()
            return self._expect()

    def stop(self) -> None:
        if self._process.poll() is None:
            assert self._process.stdin is not None
            with contextlib.suppress(OSError):
                self._process.stdin.close()
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(10)
        self._log.close()


@dataclass(frozen=True)
class Exit:
    name: str
    code: int
    seconds: float  # from SIGTERM to exit
    hung: bool  # needed SIGABRT (its log has the stacks) or SIGKILL


@dataclass
class Proc:
    """One vodpush process the soak started."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path
    stopped: bool = False  # SIGSTOPped by a fault and not yet continued
    hung: bool = False  # did not exit on SIGTERM in time
    _file: IO[bytes] | None = field(default=None, repr=False)

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def signal(self, signum: int) -> None:
        if self.alive:  # Popen knows once it is reaped: no signal can reach a reused pid
            self.process.send_signal(signum)

    def terminate(self) -> None:
        """SIGTERM, continued first if a fault left it stopped."""
        if self.stopped:
            self.signal(signal.SIGCONT)
            self.stopped = False
        self.signal(signal.SIGTERM)

    def reap(self, timeout: float) -> int:
        """Its exit code; if it has not exited within ``timeout`` seconds, SIGABRT (with
        PYTHONFAULTHANDLER set, its log then shows where every thread was), then SIGKILL."""
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.hung = True
            self.signal(signal.SIGABRT)
            try:
                code = self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                code = self.process.wait(10)
        if self._file is not None:
            self._file.close()
        return code


class Processes:
    """The API and worker processes, with the environment they share."""

    def __init__(self, env: dict[str, str], database: Database, log_dir: Path) -> None:
        self._env = env
        self._database = database
        self._log_dir = log_dir
        self.apis: list[Proc] = []
        self.api_urls: list[str] = []
        self.workers: list[Proc] = []
        self.retired: list[Proc] = []  # killed workers, for their logs
        self._started = 0
        self._all_stopped = False

    def _start(self, name: str, app: str, *args: str) -> Proc:
        env = {**self._env, "VODPUSH_DATABASE_URL": self._database.url(app)}
        log = self._log_dir / f"{name}.log"
        handle = log.open("wb")
        process = subprocess.Popen(
            [sys.executable, "-m", "vodpush", *args],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=handle,
        )
        return Proc(name, process, log, _file=handle)

    def start_api(self) -> str:
        port = free_port()
        name = f"api{len(self.apis)}"
        args = ("serve", "--no-worker", "--host", "127.0.0.1", "--port", str(port))
        proc = self._start(name, API_APP, *args)
        self.apis.append(proc)  # stopped at the end even if it never answers
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            if not proc.alive:
                raise RuntimeError(f"{proc.name} exited: {proc.log.read_text()[-2000:]}")
            try:
                httpx.get(url + "/healthz", timeout=2)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{proc.name} did not answer within 60 s") from None
                time.sleep(0.2)
        self.api_urls.append(url + "/stable/")
        return url

    def start_worker(self, concurrency: int) -> Proc:
        self._started += 1
        proc = self._start(
            f"worker{self._started}", WORKER_APP, "worker", "--concurrency", str(concurrency)
        )
        self.workers.append(proc)
        return proc

    def wait_started(self, timeout: float = 120.0) -> None:
        """Until every worker has logged worker.start (a loaded machine takes a while to
        import boto3), so the load does not begin against an idle queue."""
        deadline = time.monotonic() + timeout
        for proc in self.workers:
            while '"action": "worker.start"' not in proc.log.read_text(errors="replace"):
                if not proc.alive:
                    raise RuntimeError(f"{proc.name} exited: {proc.log.read_text()[-2000:]}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{proc.name} did not start within {timeout:.0f} s")
                time.sleep(0.2)

    def retire(self, proc: Proc) -> None:
        self.workers.remove(proc)
        self.retired.append(proc)

    def stop_all(self, grace: float) -> list[Exit]:
        """SIGTERM to the workers first (they release what they hold), then the APIs; how
        each ended. A worker gets ``grace`` plus a minute: one that has built an S3 client
        for each of a hundred accounts takes many seconds just to free them at exit."""
        if self._all_stopped:
            return []
        self._all_stopped = True
        exits: list[Exit] = []
        for group, timeout in ((self.workers, grace + 60), (self.apis, 30.0)):
            started = time.monotonic()
            for proc in group:
                proc.terminate()
            for proc in group:
                code = proc.reap(max(0.0, started + timeout - time.monotonic()))
                exits.append(Exit(proc.name, code, time.monotonic() - started, proc.hung))
        return exits

    def logs(self) -> list[Path]:
        return [proc.log for proc in (*self.apis, *self.workers, *self.retired)]


def process_env(secret_key: str, sestore_root: Path, tmp: Path, **settings: str) -> dict[str, str]:
    """The environment of every vodpush process: the soak's settings over the caller's."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("VODPUSH_", "AWS_"))  # nothing of the caller's setup leaks in
    }
    env.update(
        {
            "AWS_EC2_METADATA_DISABLED": "true",
            "VODPUSH_SECRET_KEY": secret_key,
            "VODPUSH_SECRET_KEY_FILE": str(tmp / "unused.key"),
            "VODPUSH_SESTORE_ROOT": str(sestore_root),
            "VODPUSH_LOG_LEVEL": "info",
            "PYTHONFAULTHANDLER": "1",
        }
    )
    env.update({f"VODPUSH_{key.upper()}": value for key, value in settings.items()})
    return env
