"""`make demo` as a newcomer runs it: a local S3 server, a demo account, `vodpush serve`, one
upload queued over the API and read back from S3, then everything stopped."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import free_port

DEMO = Path(__file__).resolve().parent.parent / "demo" / "run.py"


def test_the_demo_ends_in_an_object_read_back_from_s3(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(DEMO), "--once", "--dir", str(tmp_path / "demo"),
         "--port", str(free_port())],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[-1].startswith("==> aws.status says 'Successfully Uploaded to AWS'; S3 has ")
    assert "262144 bytes, video/mp4" in lines[-1]
    # The server it started logged to the demo directory, where the newcomer is told to look.
    assert (tmp_path / "demo" / "serve.log").read_text()
