"""Real clients in other languages against a live server over HTTP: Perl (LWP, urlencoded,
encode_json, hand-padded base64, regex-appended signature), Ruby (rest-client, multipart,
JSON.generate twice) and curl (a bash script signing with openssl, urlencoded or multipart).
PHP has its own module, tests/test_interop_php.py.

Each script (tests/interop/client.*) reads the same environment as seed_client.php, prints
the answer on success, and exits 3 with "API error <code>: <message>" when the API answers
``status: failure`` (4 when HTTP itself fails), so the failure code is read by the client.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import IN_CI

INTEROP = Path(__file__).parent / "interop"
METADATA = {"title": "Café / Crème", "path": "a/b/c"}


def _first_line(argv: list[str]) -> str | None:
    """The first line of a version command, or None if it cannot run."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = (done.stdout or done.stderr).strip().splitlines()
    return lines[0].strip() if done.returncode == 0 and lines else None


def _perl_version() -> str | None:
    version = _first_line(["perl", "-e", "printf qq(perl %vd\\n), $^V"])
    modules = _first_line(
        [
            "perl",
            "-MLWP::UserAgent",
            "-MJSON::PP",
            "-MDigest::SHA",
            "-e",
            'print "LWP $LWP::UserAgent::VERSION, JSON::PP $JSON::PP::VERSION, '
            'Digest::SHA $Digest::SHA::VERSION\\n"',
        ]
    )
    return f"{version} ({modules})" if version and modules else None


def client_versions() -> dict[str, str | None]:
    """What runs the interop tests, for the record (None: not installed)."""
    return {
        "perl": _perl_version(),
        "ruby": _first_line(["ruby", "-v"]),
        "rest-client": _first_line(
            ["ruby", "-e", 'require "rest-client"; puts "rest-client #{RestClient::VERSION}"']
        ),
        "php": _first_line(["php", "-v"]),
        "curl": _first_line(["curl", "--version"]),
        "openssl": _first_line(["openssl", "version"]),
        "bash": _first_line(["bash", "--version"]),
    }


@pytest.fixture(scope="module")
def versions(request: pytest.FixtureRequest) -> dict[str, str | None]:
    """Collect the versions once and write them to the terminal, even under -q and capture."""
    found = client_versions()
    lines = [f"  {name}: {value or 'not installed'}" for name, value in found.items()]
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line("")
            reporter.write_line("interop client versions:")
            for line in lines:
                reporter.write_line(line)
    return found


@dataclass(frozen=True)
class Script:
    name: str
    argv: tuple[str, ...]
    needs: tuple[str, ...]  # keys of client_versions() that must be present
    install: str
    env: tuple[tuple[str, str], ...] = ()


SCRIPTS = {
    "perl": Script(
        "perl",
        ("perl", str(INTEROP / "client.pl")),
        ("perl",),
        "apt-get install perl libwww-perl",
    ),
    "ruby": Script(
        "ruby",
        ("ruby", str(INTEROP / "client.rb")),
        ("ruby", "rest-client"),
        "apt-get install ruby ruby-rest-client",
    ),
    "curl": Script(
        "curl",
        ("bash", str(INTEROP / "client.sh")),
        ("curl", "openssl", "bash"),
        "apt-get install curl openssl",
    ),
    "curl-multipart": Script(
        "curl-multipart",
        ("bash", str(INTEROP / "client.sh")),
        ("curl", "openssl", "bash"),
        "apt-get install curl openssl",
        env=(("VODPUSH_CURL_FORM", "1"),),
    ),
}


@pytest.fixture(params=sorted(SCRIPTS))
def script(request: pytest.FixtureRequest, versions: dict[str, str | None]) -> Script:
    chosen = SCRIPTS[request.param]
    missing = [name for name in chosen.needs if not versions.get(name)]
    if missing:
        reason = f"{', '.join(missing)} not installed ({chosen.install})"
        if IN_CI:
            pytest.fail(f"{reason}; required under CI=true (.ci/run installs it)")
        pytest.skip(reason)
    return chosen


@dataclass
class Outcome:
    code: int
    stdout: str
    stderr: str

    def answer(self) -> dict[str, Any]:
        assert self.code == 0, f"exit {self.code}: {self.stderr}{self.stdout}"
        return json.loads(self.stdout)


def run(
    script: Script,
    server_url: str,
    creds: Any,
    command: str,
    secret: str | None = None,
    endpoint: str = "/stable/",
    **fields: Any,
) -> Outcome:
    env = {
        **os.environ,
        **dict(script.env),
        "VODPUSH_URL": server_url + endpoint,
        "VODPUSH_COMMAND": command,
        "VODPUSH_API_KEY": creds.api_key,
        "VODPUSH_API_SECRET": secret or creds.api_secret,
        "VODPUSH_CDN": str(creds.cdn),
        # Raw UTF-8 and unescaped '/', as a person writes JSON by hand (the curl script
        # splices this text into the request as it is).
        "VODPUSH_REQUEST": json.dumps(fields, ensure_ascii=False, separators=(",", ":")),
    }
    done = subprocess.run(list(script.argv), env=env, capture_output=True, text=True, timeout=30)
    return Outcome(done.returncode, done.stdout, done.stderr)


def test_client_versions_are_recorded(versions: dict[str, str | None]) -> None:
    missing = sorted(name for name, value in versions.items() if value is None)
    if missing and IN_CI:
        pytest.fail(f"not installed: {', '.join(missing)} (required under CI=true)")
    for name, value in versions.items():
        if value is not None:
            assert any(ch.isdigit() for ch in value), (name, value)


def test_upload_with_unicode_metadata_round_trips(script, live_server, account, sestore_root):
    video = sestore_root / "sestore1" / "jb" / "dir with space" / "vidéo.mp4"
    video.parent.mkdir(parents=True)
    video.write_bytes(script.name.encode())
    uploaded = run(
        script,
        live_server.url,
        account,
        "aws.upload",
        path="sestore1/jb/dir with space/vidéo.mp4",
        destination_path="shows/2026/vidéo.mp4",
        bucket="my-bucket",
        acl="public-read",
        metadata=METADATA,
        callback="www.example.com/hook",
    ).answer()
    assert uploaded["status"] == "success", uploaded
    request_id = uploaded["data"]["id"]

    # Perl has numbers as strings more often than not; the server takes both.
    limit: Any = "25" if script.name == "perl" else 25
    listed = run(script, live_server.url, account, "aws.status", limit=limit, offset=0).answer()
    (record,) = listed["data"]
    assert record["id"] == request_id
    assert record["metadata"] == METADATA
    assert record["path"] == "sestore1/jb/dir with space/vidéo.mp4"
    assert record["destination_path"] == "shows/2026/vidéo.mp4"
    assert (record["acl"], record["callback"]) == ("public-read", "www.example.com/hook")

    one = run(script, live_server.url, account, "aws.status", id=request_id).answer()
    assert [r["id"] for r in one["data"]] == [request_id]
    assert one["data"][0]["metadata"] == METADATA


def test_wrong_secret_is_read_as_code_0003_from_an_http_200(script, live_server, account):
    outcome = run(script, live_server.url, account, "aws.status", secret="f" * 64)
    # Exit 3 is the script's "status: failure" branch; non-200 answers exit 4.
    assert outcome.code == 3, outcome.stderr
    assert any(line.startswith("API error 0003: ") for line in outcome.stderr.splitlines())
    assert "signature does not match" in outcome.stderr


def test_missing_field_is_read_as_code_0006(script, live_server, account):
    outcome = run(script, live_server.url, account, "aws.upload", path="sestore1/jb/a.mp4")
    assert outcome.code == 3, outcome.stderr
    assert any(line.startswith("API error 0006: ") for line in outcome.stderr.splitlines())
    assert "destination_path" in outcome.stderr


def test_http_errors_are_not_mistaken_for_answers(script, live_server, account):
    # No API at this path: a 404, which every client must treat as an HTTP failure.
    outcome = run(script, live_server.url, account, "aws.status", endpoint="/nope/")
    assert outcome.code == 4, outcome.stderr
    # The client's own line; Ruby's mime-types gem may log a registry warning before it.
    assert any(line.startswith("HTTP error: ") for line in outcome.stderr.splitlines())
    assert "404" in outcome.stderr
