"""Fuzz the API endpoint in process: random and mutated bodies, signed and unsigned, in all
three content types, against the real ASGI app with a real database and a real account.

Signed inputs are signed with the account's real secret, so they get past authentication and
reach the commands (aws.upload, aws.status) with mutated fields. Hypothesis generates the
inputs; every answer is recorded rather than asserted, so a bad input does not stop the run.

Prints the inputs tried, the HTTP statuses and API codes seen, and the three figures that must
be zero: 5xx answers (or exceptions out of the app), code 0004 answers, and log records with a
traceback or at ERROR level (plus log lines that could not be formatted). Exits 1 when any of
them is not zero.

    make fuzz                                               # 120 s on SQLite
    .venv/bin/python bench/fuzz_api.py --seconds 600
    .venv/bin/python bench/fuzz_api.py --database-url postgresql+psycopg://postgres@127.0.0.1/fuzz
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import ipaddress
import json
import logging
import random
import socket
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote_from_bytes

import anyio.from_thread
import httpx
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from vodpush.api.app import create_app
from vodpush.config import Settings
from vodpush.crypto import generate_key
from vodpush.logs import formatter as log_formatter
from vodpush.service import Service

CLIP = "sestore1/fz/videos/clip.mp4"
PATHS = ("/stable/", "/dev/", "/", "/stable", "/dev")

# -- what a hostile client sends ------------------------------------------------------------

ODD_CHARS = (
    "\x00",
    "\ud800",
    "\udfff",
    "\x7f",
    "\x1b",
    "\n",
    "\r",
    "\t",
    "\\",
    '"',
    "/",
    "é",
    "🎬",
    "\u2028",
    "\u0085",
    "\ufeff",
    "\uffff",
    "\U0010ffff",
    "\u202e",
)
ODD_STRINGS = (
    "",
    " ",
    "--1",
    "-",
    "-0",
    "+1",
    " 12 ",
    "1_000",
    "0x10",
    "１２",  # full-width digits: str.isdigit() says yes
    "٣",
    "²",
    "1e400",
    "NaN",
    "Infinity",
    "9" * 30,
    "9" * 5000,
    "-" + "9" * 5000,
    "aws.upload",
    "aws.status",
    CLIP,
    "sestore1/fz/../fz/videos/clip.mp4",
    CLIP + "\x00",
    "private",
    "public-read",
    "my-bucket",
    "my-bucket\n",
    "http://127.0.0.1:1/x",
    "http://[::1",
    "http://example.com:99999/",
    "http://",
    "www.example.com/hook",
    "a" * 5000,
    "x\x00y",
    "\ud800",
    "%00",
    "\\u0000",
)
DIGITISH = 18  # the first ODD_STRINGS: what a digit string may look like

# Values a path may take that only the file system can judge.
ODD_PATHS = (
    CLIP,
    "sestore1/fz/" + "a" * 300 + "/x.mp4",
    "sestore1/fz/" + "é" * 200 + ".mp4",
    "sestore1/fz/" + "/".join(["d" * 250] * 16),
    "sestore1/fz/" + "/".join(["d"] * 2000),
    "sestore1/fz/videos/clip.mp4/x",
    "sestore1/fz/videos/../videos/clip.mp4",
    "sestore1/fz/videos/./clip.mp4",
    "sestore1/fz/videos",
    "sestore1/fz/videos/clip.mp4\n",
    "sestore1/fz/videos/clip.mp4 ",
    "sestore999999/fz/x.mp4",
    "sestore1/../../etc/passwd",
    "sestore1/fz/\u202eclip.mp4",
)
ODD_NUMBERS: tuple[Any, ...] = (
    0,
    -1,
    1,
    2**31,
    2**53 + 1,
    2**63,
    -(2**63) - 1,
    10**30,
    10**400,
    1e308,
    -1e308,
    float("inf"),
    float("-inf"),
    float("nan"),
    -0.0,
    0.5,
    1e-320,
    True,
    False,
)
KEYS = (
    "command",
    "cdn",
    "api_key",
    "timestamp",
    "signature",
    "path",
    "destination_path",
    "bucket",
    "acl",
    "metadata",
    "callback",
    "limit",
    "offset",
    "id",
    "",
    "\x00",
    "\ud800",
    "k" * 300,
    "Content-Type",
)
# Raw JSON text no encoder produces from a Python value, spliced into the text.
RAW_TOKENS = (
    "\\u0000",
    "\\ud800",
    "\\udc00\\ud800",
    "1e400",
    "-1e400",
    "NaN",
    "-Infinity",
    "9" * 5000,
    "[" * 3000,
    "{" * 100,
    '{"a":' * 2000,
    "]",
    "}",
    '"',
    ",",
    ":",
    "\\",
    " ",
    "\n",
    "\x00",
    "\ud800",
    '"signature":"x"',
    '"command":["aws.status"]',
    '"command":{"a":1}',
    '"limit":"--1"',
    '"timestamp":1e400',
    '"cdn":' + "1" * 4400,
    ',"signature":"' + " " * 500 + '"',
)

odd_text = st.text(st.one_of(st.characters(), st.sampled_from(ODD_CHARS)), max_size=30)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.sampled_from(ODD_NUMBERS),
    odd_text,
    st.sampled_from(ODD_STRINGS),
)
keys = st.one_of(st.sampled_from(KEYS), odd_text)
json_values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(keys, children, max_size=4)
    ),
    max_leaves=12,
)
# What a mutated field becomes: the odd values above more often than chance would pick them.
field_values = st.one_of(
    st.sampled_from(ODD_STRINGS), st.sampled_from(ODD_NUMBERS), odd_text, json_values
)


def _hmac_b64(secret: str, text: str) -> str:
    # surrogatepass: a client may sign text that is not valid UTF-8; the server never can.
    message = text.encode("utf-8", "surrogatepass")
    return base64.b64encode(hmac.new(secret.encode(), message, hashlib.sha256).digest()).decode()


def _dumps(obj: Any, style: str) -> str:
    if style == "php":
        return json.dumps(obj, separators=(",", ":")).replace("/", "\\/")
    if style == "python":
        return json.dumps(obj)
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)  # ruby, perl


def sign(payload: dict[str, Any], secret: str, style: str) -> str:
    """The ``json`` field as each client language builds it (see tests/wire.py)."""
    unsigned = {k: v for k, v in payload.items() if k != "signature"}
    if style == "first":  # signature not last: only the server's fallback can verify it
        text = _dumps(unsigned, "ruby")
        return _dumps({"signature": _hmac_b64(secret, text), **unsigned}, "python")
    text = _dumps(unsigned, style)
    sig = _hmac_b64(secret, text)
    if style.startswith("perl"):
        if style == "perl_unpadded":
            sig = sig.rstrip("=")
        return (text[:-1] if text.endswith("}") else text) + ',"signature":"' + sig + '"}'
    return _dumps({**unsigned, "signature": sig}, style)


@dataclass
class Account:
    cdn: int
    api_key: str
    api_secret: str
    # The timestamp signed requests carry: set before each round of examples and constant
    # within it, since Hypothesis needs the same choices to give the same input.
    now: int = 0


def base_payload(account: Account, command: str) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "command": command,
        "api_key": account.api_key,
        "timestamp": account.now,
        "cdn": account.cdn,
    }
    if command == "aws.upload":
        payload |= {
            "path": CLIP,
            "destination_path": "fuzz/out.mp4",
            "bucket": "my-bucket",
            "acl": "private",
            "metadata": {"title": "Café / Crème"},
            "callback": "",
        }
    else:
        payload |= {"limit": 5}
    return payload


@st.composite
def mutate_fields(draw: st.DrawFn, payload: dict[str, Any]) -> dict[str, Any]:
    payload = dict(payload)
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.sampled_from(("set", "set", "add", "drop", "digits", "path")))
        key = draw(st.sampled_from(sorted(payload))) if payload else "command"
        if op == "path":
            payload["path"] = draw(st.sampled_from(ODD_PATHS) | odd_text)
        elif op == "set":
            payload[key] = draw(field_values)
        elif op == "add":
            payload[draw(keys)] = draw(field_values)
        elif op == "drop":
            payload.pop(key, None)
        else:  # integers as (odd) digit strings, the way Perl sends them
            payload[key] = draw(st.sampled_from(ODD_STRINGS[:DIGITISH]))
    return payload


@st.composite
def mutate_text(draw: st.DrawFn, text: str) -> str:
    for _ in range(draw(st.integers(1, 4))):
        pos = draw(st.integers(0, len(text)))
        op = draw(st.sampled_from(("insert", "delete", "replace", "duplicate", "truncate")))
        if op == "insert":
            text = text[:pos] + draw(st.sampled_from(RAW_TOKENS) | odd_text) + text[pos:]
        elif op == "delete":
            text = text[:pos] + text[pos + draw(st.integers(1, 8)) :]
        elif op == "replace":
            text = text[:pos] + draw(st.sampled_from(ODD_CHARS)) + text[pos + 1 :]
        elif op == "duplicate":
            text = text[:pos] + text[pos : pos + 40] + text[pos:]
        else:
            text = text[:pos]
    return text


def signature_variant(text: str, how: str) -> str:
    """The same signature written differently, or broken."""
    marker = '"signature":"'
    at = text.rfind(marker)
    if at < 0:
        return text
    start = at + len(marker)
    end = text.find('"', start)
    sig = text[start:end]
    variants = {
        "unpadded": sig.rstrip("="),
        "spaces": " " + sig + " ",
        "newline": sig + "\\n",
        "inner": sig[:10] + "\\n" + sig[10:],
        "bits": sig[:42] + ("B" if sig[42:43] == "A" else "A") + sig[43:],
        "huge": sig + " " * 100_000,
        "urlsafe": sig.replace("+", "-").replace("/", "_"),
        "empty": "",
    }
    return text[:start] + variants[how] + text[end:]


@st.composite
def json_fields(draw: st.DrawFn, account: Account) -> tuple[str, str]:
    """The text of the ``json`` field, and what kind of input it is."""
    kind = draw(st.sampled_from(("signed", "signed", "signed", "raw", "unsigned", "random")))
    if kind == "signed" or kind == "raw":
        command = draw(st.sampled_from(("aws.upload", "aws.status")))
        payload = base_payload(account, command)
        if kind == "signed":
            payload = draw(mutate_fields(payload))
        style = draw(st.sampled_from(("php", "python", "ruby", "perl", "perl_unpadded", "first")))
        try:
            text = sign(payload, account.api_secret, style)
        except (ValueError, TypeError):  # e.g. an int past str()'s digit limit
            text = json.dumps({"signature": "x"})
        if draw(st.integers(0, 5)) == 0:
            how = draw(
                st.sampled_from(
                    ("unpadded", "spaces", "newline", "inner", "bits", "huge", "urlsafe", "empty")
                )
            )
            text = signature_variant(text, how)
        if kind == "raw":
            text = draw(mutate_text(text))
        return kind, text
    if kind == "unsigned":
        obj = draw(st.dictionaries(keys, json_values, max_size=8))
        try:
            text = json.dumps(obj, ensure_ascii=draw(st.booleans()))
        except ValueError:
            text = "{}"
        return kind, draw(mutate_text(text)) if draw(st.booleans()) else text
    return kind, draw(st.one_of(odd_text, st.sampled_from(RAW_TOKENS), st.text(max_size=200)))


@st.composite
def bodies(draw: st.DrawFn, account: Account) -> tuple[str, str, bytes, dict[str, str]]:
    """(kind, path, body, headers): the field sent in one of the three encodings, or a
    broken envelope around it."""
    kind, text = draw(json_fields(account))
    data = text.encode("utf-8", "surrogatepass")
    encoding = draw(
        st.sampled_from(("urlencoded", "multipart", "raw", "none", "urlencoded", "raw"))
    )
    headers: dict[str, str] = {}
    if encoding in ("urlencoded", "none"):
        body = b"json=" + quote_from_bytes(data).encode()
        if draw(st.integers(0, 9)) == 0:
            body += b"&json=" + body[5:]  # a second json field
        if encoding == "urlencoded":
            headers["content-type"] = "application/x-www-form-urlencoded"
    elif encoding == "multipart":
        boundary = "fuzzb0undary"
        body = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="json"\r\n\r\n'.encode()
            + data
            + f"\r\n--{boundary}--\r\n".encode()
        )
        headers["content-type"] = f"multipart/form-data; boundary={boundary}"
        if draw(st.integers(0, 9)) == 0:
            headers["content-type"] = draw(
                st.sampled_from(
                    (
                        "multipart/form-data",
                        "multipart/form-data; boundary=other",
                        "multipart/form-data; boundary=" + "b" * 200,
                        'multipart/form-data; boundary="fuzzb0undary"; charset=latin-1',
                    )
                )
            )
    else:
        body = data
        headers["content-type"] = draw(
            st.sampled_from(
                ("application/json", "application/json; charset=utf-8", "APPLICATION/JSON")
            )
        )
    if draw(st.integers(0, 9)) == 0:  # damage the bytes themselves
        cut = draw(st.integers(0, len(body)))
        junk = draw(st.binary(max_size=8))
        body = body[:cut] + junk + body[cut + draw(st.integers(0, 4)) :]
    return kind, draw(st.sampled_from(PATHS)), body, headers


# -- watching the log -----------------------------------------------------------------------


class LogWatch(logging.Handler):
    """Formats every record as the service would (JSON lines) and counts the ones that must
    not happen for client input: tracebacks, ERROR records, lines that fail to format."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(log_formatter("json"))
        self.records = 0
        self.tracebacks = 0
        self.errors = 0
        self.format_failures = 0
        self.longest = 0
        self.samples: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records += 1
        try:
            line = self.format(record)
            line.encode("utf-8")  # what a UTF-8 log file would need
            self.longest = max(self.longest, len(line))
        except Exception as exc:
            self.format_failures += 1
            self._sample(f"unformattable log record {record.getMessage()!r}: {exc!r}")
            return
        if record.exc_info:
            self.tracebacks += 1
            self._sample(line)
        elif record.levelno >= logging.ERROR:
            self.errors += 1
            self._sample(line)

    def _sample(self, text: str) -> None:
        if len(self.samples) < 5:
            self.samples.append(text[:3000])


# -- the run ------------------------------------------------------------------------------


@dataclass
class Report:
    tried: int = 0
    by_kind: Counter[str] = field(default_factory=Counter)
    http: Counter[int] = field(default_factory=Counter)
    codes: Counter[str] = field(default_factory=Counter)
    kind_codes: Counter[str] = field(default_factory=Counter)
    messages: Counter[str] = field(default_factory=Counter)
    server_errors: int = 0  # HTTP 5xx, or an exception out of the app
    code_0004: int = 0
    tracebacks: int = 0
    error_records: int = 0
    format_failures: int = 0
    log_records: int = 0
    longest_log_line: int = 0
    seconds: float = 0.0
    samples: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        failures = (self.server_errors, self.code_0004, self.tracebacks)
        return not any(failures) and not self.error_records and not self.format_failures

    def lines(self) -> list[str]:
        return [
            f"inputs tried:        {self.tried} in {self.seconds:.0f} s "
            f"({self.tried / max(self.seconds, 1e-9):.0f}/s)",
            "inputs by kind:      " + _counts(self.by_kind),
            "HTTP statuses:       " + _counts(self.http),
            "API codes:           " + _counts(self.codes),
            "by kind:             " + _counts(self.kind_codes),
            f"5xx (or app raised): {self.server_errors}",
            f"code 0004:           {self.code_0004}",
            f"tracebacks logged:   {self.tracebacks}",
            f"ERROR records:       {self.error_records}",
            f"unformattable logs:  {self.format_failures}",
            f"log records:         {self.log_records} (longest line {self.longest_log_line} chars)",
        ]


def _counts(counter: Counter[Any]) -> str:
    return ", ".join(f"{key}: {n}" for key, n in sorted(counter.items(), key=str)) or "-"


@contextmanager
def _loopback_names_only() -> Iterator[None]:
    """Fuzzed callback URLs name random hosts, which aws.upload looks up: answer every name
    but localhost as missing (what a real resolver says of most of them), so the run never
    sends a DNS query beyond this machine."""
    real = socket.getaddrinfo

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        name = host.decode() if isinstance(host, bytes) else str(host)
        try:
            loopback = ipaddress.ip_address(name.split("%")[0]).is_loopback
        except ValueError:
            loopback = False
        if name == "localhost" or loopback:
            return real(host, *args, **kwargs)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    socket.getaddrinfo = getaddrinfo
    try:
        yield
    finally:
        socket.getaddrinfo = real


@contextmanager
def _service(database_url: str | None) -> Iterator[tuple[Service, Account]]:
    with tempfile.TemporaryDirectory(prefix="vodpush-fuzz-") as tmp:
        root = Path(tmp) / "stores"
        clip = root / CLIP
        clip.parent.mkdir(parents=True)
        clip.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"x" * 1000)
        settings_ = Settings(
            database_url=database_url or f"sqlite:///{Path(tmp) / 'fuzz.db'}",
            sestore_root=root,
            secret_key=generate_key(),
            secret_key_file=Path(tmp) / "unused.key",
            # One address and one account send everything: the rate limits would answer
            # most of it with 1000 and keep the inputs from the commands.
            rate_limit=0,
            failure_rate_limit=0,
            failure_global_rate_limit=0,
        )
        service = Service.open(settings_)
        try:
            created = service.accounts.create(cdn=158, username="fz")
            # Any bucket, so that uploads get past the bucket list to the later checks.
            service.accounts.allow_buckets(str(created["id"]), ["*"])
            yield service, Account(created["cdn"], created["api_key"], created["api_secret"])
        finally:
            service.close()


def run(
    seconds: float,
    *,
    database_url: str | None = None,
    seed_: int | None = None,
    min_inputs: int = 0,
) -> Report:
    """Fuzz for ``seconds`` (and on, until ``min_inputs`` were tried: a loaded machine may
    generate few in that time) and return the figures."""
    report = Report()
    watch = LogWatch()
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(watch)
    root.setLevel(logging.INFO)
    started = time.monotonic()
    deadline = started + seconds
    try:
        with (
            _loopback_names_only(),
            _service(database_url) as (service, account),
            anyio.from_thread.start_blocking_portal() as portal,
        ):
            app = create_app(service)
            client = portal.call(_client, app)

            async def send(path: str, body: bytes, headers: dict[str, str]) -> httpx.Response:
                return await client.post(path, content=body, headers=headers)

            @settings(
                max_examples=500,
                deadline=None,
                database=None,
                phases=[Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            @given(bodies(account))
            def one(case: tuple[str, str, bytes, dict[str, str]]) -> None:
                if time.monotonic() > deadline and report.tried >= min_inputs:
                    return
                kind, path, body, headers = case
                report.tried += 1
                report.by_kind[kind] += 1
                try:
                    response = portal.call(send, path, body, headers)
                except Exception as exc:
                    report.server_errors += 1
                    _sample(report, f"app raised {exc!r} for {body[:300]!r}")
                    return
                report.http[response.status_code] += 1
                if response.status_code >= 500:
                    report.server_errors += 1
                    _sample(report, f"HTTP {response.status_code} for {body[:300]!r}")
                try:
                    answer = response.json()
                    code = answer.get("code", answer.get("status"))
                    message = str(answer.get("message"))[:60]
                except (ValueError, AttributeError):
                    code = "not json"
                    message = response.text[:60]
                report.codes[str(code)] += 1
                report.kind_codes[f"{kind}/{code}"] += 1
                report.messages[f"{response.status_code} {code} {message}"] += 1
                if code == "0004":
                    report.code_0004 += 1
                    _sample(report, f"0004 for {body[:300]!r}")

            round_ = 0
            while time.monotonic() < deadline or report.tried < min_inputs:
                account.now = int(time.time())
                runner = one if seed_ is None else seed(seed_ + round_)(one)
                runner()
                round_ += 1
            portal.call(client.aclose)
    finally:
        root.removeHandler(watch)
        root.setLevel(old_level)
    report.seconds = time.monotonic() - started
    report.tracebacks = watch.tracebacks
    report.error_records = watch.errors
    report.format_failures = watch.format_failures
    report.log_records = watch.records
    report.longest_log_line = watch.longest
    report.samples.extend(watch.samples)
    return report


async def _client(app: Any) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 50000))
    return httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1", timeout=60)


def _sample(report: Report, text: str) -> None:
    if len(report.samples) < 10:
        report.samples.append(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--database-url", help="default: SQLite in a temporary directory")
    parser.add_argument("--seed", type=int, help="repeatable inputs")
    parser.add_argument("--messages", type=int, default=0, help="print the N commonest answers")
    args = parser.parse_args(argv)
    report = run(args.seconds, database_url=args.database_url, seed_=args.seed)
    for line in report.lines():
        print(line)
    for message, count in report.messages.most_common(args.messages):
        print(f"{count:7d}  {message}")
    for sample in report.samples:
        print("sample:", sample[:2000], file=sys.stderr)
    return 0 if report.clean else 1


if __name__ == "__main__":
    random.seed()
    sys.exit(main())
