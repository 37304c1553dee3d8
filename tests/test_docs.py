"""The command blocks of README.md and docs/api.md, run as a reader would run them, in order,
against a live `vodpush serve` whose worker uploads to a moto S3 server: the docs cannot
drift from what vodpush does.

A block is a fenced ``sh``, ``python`` or ``php`` block. ``sh`` blocks run in bash, one after
the other, with what earlier blocks exported (as in one terminal); ``python`` blocks run in
the project's virtualenv (as a module named ``doc_example``, so that an example's server
loop under ``if __name__ == "__main__":`` is left out), ``php`` blocks with php-cli, with
the same environment. A block
may be preceded by ``<!-- doc-test: skip: <why> -->`` (it starts this very server, or is the
suite itself); every skip names its reason. An answer of the API printed by a block must
not be a failure unless the block is preceded by ``<!-- doc-test: fails -->``.

The world the blocks find: the working directory is a fresh one with the repository's
.venv, tests/, demo/ and docs/ in it (docs/examples/ holds the helpers the API examples
call); `vodpush serve` runs there with boto3's AWS_* variables naming the moto server (as
the README tells a reader to start it, with their own keys; AWS_ENDPOINT_URL_STS too, as
moto serves STS at the same address, AssumeRole without IAM enforcement), and the reader's
shell has the same AWS_* variables; the bucket ``my-bucket`` exists; the server's address
127.0.0.1:8080 in a block is replaced by the test server's. Host names under example.com
resolve to 127.0.0.1 in the server (callback URLs in examples, where nothing listens), and no
other name resolves: nothing leaves loopback. A failed callback is not retried
(VODPUSH_CALLBACK_SCHEDULE is empty), so that it can be redelivered seconds later.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port, s3_client
from tests.s3server import MotoServer
from vodpush.crypto import generate_key

REPO = Path(__file__).resolve().parent.parent
DOCUMENTS = ("README.md", "docs/api.md")
LANGUAGES = {"sh": "sh", "bash": "sh", "python": "python", "php": "php"}
_FENCE = re.compile(r"^```(\w*)\s*$")
_MARK = re.compile(r"<!--\s*doc-test:\s*(skip|fails)\s*(?::\s*(.*?))?\s*-->")
_FAILURE = re.compile(r'"status"\s*:\s*"failure"')

# Name lookups in the served process: example.com names are loopback, others do not exist.
_RESOLVER = """
import socket

_real = socket.getaddrinfo


def _getaddrinfo(host, *args, **kwargs):
    name = host.decode() if isinstance(host, bytes) else str(host)
    if name == "example.com" or name.endswith(".example.com"):
        return _real("127.0.0.1", *args, **kwargs)
    if name in ("localhost", "127.0.0.1", "::1") or name.startswith("127."):
        return _real(host, *args, **kwargs)
    raise socket.gaierror(socket.EAI_NONAME, "no such name (doc test)")


socket.getaddrinfo = _getaddrinfo
"""


@dataclass(frozen=True)
class Block:
    document: str
    line: int  # of the opening fence, 1-based
    language: str  # sh, python or php
    code: str
    skip: str | None  # why it is not run
    fails: bool  # the API's answer is meant to be a failure

    def __str__(self) -> str:
        return f"{self.document}:{self.line} ({self.language})"


def blocks(document: str, root: Path = REPO) -> list[Block]:
    """The command blocks of ``document`` (under ``root``), in order, with the mark before
    each."""
    found: list[Block] = []
    lines = (root / document).read_text().splitlines()
    i = 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        end = i + 1
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        language = LANGUAGES.get(opening.group(1))
        if language is not None:
            mark = None
            back = i - 1
            while back >= 0 and not lines[back].strip():
                back -= 1
            if back >= 0:
                mark = _MARK.search(lines[back])
            skip = fails = None
            if mark is not None and mark.group(1) == "skip":
                skip = (mark.group(2) or "").strip()
                assert skip, f"{document}:{i + 1}: a skipped block must say why"
            fails = mark is not None and mark.group(1) == "fails"
            found.append(
                Block(document, i + 1, language, "\n".join(lines[i + 1 : end]), skip, fails)
            )
        i = end + 1
    return found


@dataclass
class World:
    cwd: Path
    env: dict[str, str]
    state: Path  # what the reader's shell has exported so far
    port: int


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, s3: MotoServer) -> Iterator[World]:
    cwd = tmp_path_factory.mktemp("reader")
    for name in (".venv", "tests", "demo", "docs"):
        (cwd / name).symlink_to(REPO / name)
    resolver = tmp_path_factory.mktemp("resolver")
    (resolver / "sitecustomize.py").write_text(_RESOLVER)
    s3_client(s3).create_bucket(Bucket="my-bucket")
    port = free_port()
    env = {
        # The reader's tools: the virtualenv's (the aws CLI of the test extras) first.
        "PATH": f"{REPO / '.venv' / 'bin'}:{os.environ['PATH']}",
        "HOME": str(cwd),
        "LANG": "C.UTF-8",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL_S3": s3.url,
        "AWS_ENDPOINT_URL_STS": s3.url,
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        # Every process shares the database and key, as the docs' processes do.
        "VODPUSH_SECRET_KEY": generate_key(),
        "VODPUSH_DATABASE_URL": f"sqlite:///{cwd / 'vodpush.db'}",
        "VODPUSH_SESTORE_ROOT": str(cwd / "sestore"),
    }
    server_env = {
        **env,
        "PYTHONPATH": str(resolver),
        "VODPUSH_PORT": str(port),
        "VODPUSH_CALLBACK_ALLOW_PRIVATE": "true",
        "VODPUSH_CALLBACK_TIMEOUT": "1",
        "VODPUSH_CALLBACK_SCHEDULE": "[]",
    }
    log = open(cwd / "serve.log", "wb")  # noqa: SIM115 - closed below
    server = subprocess.Popen(
        [str(REPO / ".venv" / "bin" / "vodpush"), "serve"],
        cwd=cwd,
        env=server_env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1)
                break
            except httpx.TransportError:
                assert server.poll() is None, (cwd / "serve.log").read_text()
                assert time.monotonic() < deadline, "vodpush serve did not start"
                time.sleep(0.1)
        state = cwd / ".exports.sh"
        state.write_text("")
        yield World(cwd=cwd, env=env, state=state, port=port)
    finally:
        server.terminate()
        server.wait(30)
        log.close()


def run_block(world: World, block: Block) -> str:
    code = block.code.replace("127.0.0.1:8080", f"127.0.0.1:{world.port}")
    source = world.cwd / f".block-{Path(block.document).stem}-{block.line}"
    if block.language == "sh":
        source.write_text(code + "\n")
        script = f'source "{world.state}"\nsource "{source}"\nexport -p > "{world.state}"\n'
    elif block.language == "python":
        source.write_text(code + "\n")
        # Run as a module of that name, not as __main__: an example's server loop under
        # `if __name__ == "__main__":` is left out, the rest (imports, classes) runs.
        runner = f"import runpy; runpy.run_path({str(source)!r}, run_name='doc_example')"
        script = f'source "{world.state}"\nexec .venv/bin/python -c "{runner}"\n'
    else:
        source.write_text(code if code.lstrip().startswith("<?php") else f"<?php\n{code}\n")
        script = f'source "{world.state}"\nexec php "{source}"\n'
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=world.cwd,
        env=world.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{block} exited {done.returncode}:\n{code}\n---\n{output}"
    if not block.fails:
        assert not _FAILURE.search(output), f"{block} got a failure:\n{code}\n---\n{output}"
    return output


def test_every_command_block_of_the_docs_runs(world: World) -> None:
    if shutil.which("php") is None and os.environ.get("CI") != "true":
        pytest.skip("php-cli is not installed (CI installs it)")
    ran, skipped = [], []
    for document in DOCUMENTS:
        for block in blocks(document):
            if block.skip is not None:
                skipped.append(f"{block}: {block.skip}")
                continue
            run_block(world, block)
            ran.append(str(block))
    assert len(ran) >= 10, ran
    # Skips are few and each says why (shown with -rA).
    assert len(skipped) <= 3, skipped
    print("ran:", *ran, "skipped:", *skipped, sep="\n  ")


@pytest.mark.unit
def test_the_block_reader_finds_marks_and_languages(tmp_path: Path) -> None:
    text = textwrap.dedent(
        """\
        <!-- doc-test: skip: starts the server -->
        ```sh
        make run
        ```
        ```json
        {"not": "run"}
        ```
        <!-- doc-test: fails -->

        ```python
        print(1)
        ```
        """
    )
    (tmp_path / "sample.md").write_text(text)
    found = blocks("sample.md", tmp_path)
    assert [(b.language, b.skip, b.fails, b.line) for b in found] == [
        ("sh", "starts the server", False, 2),
        ("python", None, True, 10),
    ]
