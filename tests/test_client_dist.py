"""The client installs alone: the vodpush-client wheel in a fresh virtualenv, with nothing of
the server there (not vodpush, not one of its libraries), uploads a file to a live server and
waits for it with a progress callback, with the sync and the async client, configured from
VODPUSH_* variables.

The wheels come from `make test` (VODPUSH_CLIENT_DIST=dist/client: the client's, httpx's and
those httpx needs) and are installed with no package index. Run alone, the test builds them
itself, pip fetching httpx from the package index; offline that fails under CI and is
skipped elsewhere.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import venv
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import s3_client
from vodpush.worker.runner import Worker

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parent.parent
# The distributions of the server's stack (its dependencies and theirs): none may come with
# the client.
SERVER_STACK = {
    "vodpush", "starlette", "uvicorn", "python-multipart", "sqlalchemy", "alembic", "psycopg",
    "psycopg-binary", "pydantic", "pydantic-core", "pydantic-settings", "boto3", "botocore",
    "s3transfer", "click", "rich", "prometheus-client", "cryptography", "cffi", "orjson",
    "structlog", "greenlet", "mako",
}  # fmt: skip

INSPECT = """
import importlib.metadata, importlib.util, json, sys
import vodpush_client
print(json.dumps({
    "client": vodpush_client.__file__,
    "distributions": sorted(d.metadata["Name"].lower() for d in importlib.metadata.distributions()),
    "vodpush": importlib.util.find_spec("vodpush") is not None,
    "path": sys.path,
}))
"""

# What a user of the client writes: configuration from the environment, an upload, wait()
# with a progress callback; then the same with the async client.
UPLOAD = """
import asyncio, json, sys
from vodpush_client import AsyncClient, Client

path, bucket = sys.argv[1], sys.argv[2]


def seen_as(records):
    return [[r.state, r.bytes_done, r.bytes_total] for r in records]


with Client.from_env() as api:
    seen = []
    request_id = api.upload(path, "dist/sync.bin", bucket, "private", metadata={"via": "sync"})
    final = api.wait(request_id, interval=0.05, timeout=30, progress=seen.append)
    sync = {"id": request_id, "seen": seen_as(seen), "last_is_final": seen[-1] is final,
            "record": final.to_dict(), "created": final.created.isoformat()}


async def run_async():
    seen = []

    async def progress(record):
        seen.append(record)

    async with AsyncClient.from_env() as api:
        request_id = await api.upload(path, "dist/async.bin", bucket, "private")
        final = await api.wait(request_id, interval=0.05, timeout=30, progress=progress)
        listed = [r.id async for r in api.iter_status(page_size=1)]
    return {"id": request_id, "seen": seen_as(seen), "record": final.to_dict(), "listed": listed}


print(json.dumps({"sync": sync, "async": asyncio.run(run_async())}))
"""


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def client_dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with the vodpush-client wheel and the wheels it needs."""
    given = os.environ.get("VODPUSH_CLIENT_DIST")
    if given:
        folder = Path(given)
        assert len(list(folder.glob("vodpush_client-*.whl"))) == 1, f"{folder}: no client wheel"
        return folder
    folder = tmp_path_factory.mktemp("client-dist")
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "-w", str(folder), str(REPO / "client")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if built.returncode != 0:
        last = (built.stderr.strip().splitlines() or ["?"])[-1]
        _unavailable(f"cannot build the client's wheels (is the package index reachable?): {last}")
    return folder


@pytest.fixture(scope="module")
def client_python(client_dist: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The python of a fresh virtualenv (no system site-packages, no pip) holding only what
    installing the client wheel brought."""
    root = tmp_path_factory.mktemp("client-venv")
    started = time.monotonic()
    venv.EnvBuilder(with_pip=False, system_site_packages=False).create(root)
    python = root / "bin" / "python"
    # This project's pip installs into it, from the wheels alone.
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet",
         "--no-index", "--find-links", str(client_dist), "vodpush-client"],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    print(f"fresh virtualenv with the client: {time.monotonic() - started:.1f} s")
    return python


def run_in(python: Path, code: str, *args: str, env: dict[str, str] | None = None) -> Any:
    """Run ``code`` with ``python`` away from this checkout and from this test's
    environment; its JSON output."""
    clean = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **(env or {})}
    script = python.parent.parent / "run.py"
    script.write_text(code)
    done = subprocess.run(
        [str(python), "-I", str(script), *args],
        capture_output=True,
        text=True,
        env=clean,
        cwd=python.parent.parent,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_the_wheel_installs_alone_without_the_server(client_python: Path) -> None:
    found = run_in(client_python, INSPECT)
    assert found["client"].startswith(str(client_python.parent.parent))
    assert "vodpush-client" in found["distributions"]
    assert "httpx" in found["distributions"]
    assert not SERVER_STACK & set(found["distributions"]), found["distributions"]
    assert not found["vodpush"]
    # Nothing of this checkout or of its virtualenv is visible there.
    assert not [entry for entry in found["path"] if entry.startswith(str(REPO))]
    refused = subprocess.run(
        [str(client_python), "-I", "-c", "import vodpush"], capture_output=True, text=True
    )
    assert "No module named 'vodpush'" in refused.stderr


@pytest.fixture
def worker(service: Any) -> Iterator[Worker]:
    """The server's worker, uploading what is queued until the test ends."""
    running = Worker(service)
    thread = threading.Thread(target=running.run, daemon=True)
    thread.start()
    yield running
    running.stop(grace=0)
    thread.join(10)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_the_installed_client_uploads_to_a_live_server_and_waits(
    client_python: Path, live_server, s3_account, s3, bucket, sestore_root, worker
) -> None:
    data = os.urandom(6 * 1024 * 1024 + 5)  # two parts and a bit
    (sestore_root / "sestore1" / "jb" / "show.bin").write_bytes(data)
    env = {
        "VODPUSH_URL": live_server.url,
        "VODPUSH_CDN": str(s3_account.cdn),
        "VODPUSH_API_KEY": s3_account.api_key,
        "VODPUSH_API_SECRET": s3_account.api_secret,
        "VODPUSH_TIMEOUT": "5",
    }
    out = run_in(client_python, UPLOAD, "sestore1/jb/show.bin", bucket, env=env)

    sync, async_ = out["sync"], out["async"]
    for run in (sync, async_):
        assert run["record"]["state"] == "succeeded", run["record"]
        assert run["record"]["message"] == "Successfully Uploaded to AWS"
        # progress saw every poll, in order, the final record last.
        assert run["seen"][-1] == ["succeeded", len(data), len(data)]
        states = [state for state, _, _ in run["seen"]]
        assert set(states) <= {"queued", "running", "succeeded"}
        assert states == sorted(states, key=["queued", "running", "succeeded"].index)
    assert sync["last_is_final"]
    assert sync["created"].endswith("+00:00")  # an aware UTC datetime
    assert sync["record"]["metadata"] == {"via": "sync"}
    assert async_["listed"] == [async_["id"], sync["id"]]  # newest first, page by page
    objects = s3_client(s3)
    for key in ("dist/sync.bin", "dist/async.bin"):
        assert objects.get_object(Bucket=bucket, Key=key)["Body"].read() == data


def test_the_servers_wheel_carries_the_client_and_the_command(
    tmp_path: Path,
) -> None:
    """`pip install .` at the root installs the server, the client's modules (the same
    files as the client's wheel) and the `vodpush` command, with no other step."""
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
         "-w", str(tmp_path), str(REPO)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    (wheel,) = tmp_path.glob("vodpush-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        commands = archive.read(entry_points).decode()
    client_modules = {
        f"vodpush_client/{p.relative_to(REPO / 'client' / 'src' / 'vodpush_client')}"
        for p in (REPO / "client" / "src" / "vodpush_client").rglob("*")
        if p.suffix in (".py", ".typed")
    }
    assert client_modules <= names
    assert {"vodpush/client.py", "vodpush/client_cli.py", "vodpush/server.py"} <= names
    assert "vodpush = vodpush.cli:main" in commands
