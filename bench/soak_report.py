"""The soak's figures, gathered after the drain from the things themselves: the requests
from the database, the object versions and open multipart uploads from the S3 server (not
through the proxy), the callbacks from the receiver, the latencies from the load, plus
the processes' logs; then one table, each figure with its target."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from sqlalchemy import Engine, select

from bench.soak_load import COMMANDS, UPLOAD, Load
from bench.soak_receiver import CallbackFigures, Delivery
from vodpush.core.requests import State
from vodpush.persistence.models import UploadRequest

PENDING_STATES = (State.QUEUED.value, State.RUNNING.value, State.RETRYING.value)


@dataclass
class Requests:
    """The upload_requests table, summed up."""

    total: int = 0
    by_state: Counter[str] = field(default_factory=Counter)
    failed_by_code: Counter[str] = field(default_factory=Counter)
    callbacks: Counter[str] = field(default_factory=Counter)  # callback_state of those with one
    keys_twice: int = 0  # (bucket, key) queued by more than one request
    rows: list[Any] = field(default_factory=list)

    @property
    def pending(self) -> int:
        return sum(self.by_state[state] for state in PENDING_STATES)


def read_requests(engine: Engine) -> Requests:
    t = UploadRequest.__table__
    with engine.connect() as conn:
        rows = conn.execute(
            select(
                t.c.id,
                t.c.bucket,
                t.c.destination_path,
                t.c.state,
                t.c.error_code,
                t.c.attempts,
                t.c.lease_expiries,
                t.c.callback,
                t.c.callback_state,
                t.c.callback_attempts,
            )
        ).all()
    out = Requests(total=len(rows), rows=rows)
    keys: Counter[tuple[str, str]] = Counter()
    for row in rows:
        out.by_state[row.state] += 1
        if row.state == State.FAILED.value:
            out.failed_by_code[row.error_code or "(none)"] += 1
        if row.callback:
            out.callbacks[row.callback_state] += 1
        keys[(row.bucket, row.destination_path)] += 1
    out.keys_twice = sum(1 for n in keys.values() if n > 1)
    return out


@dataclass
class Objects:
    """What the S3 server holds in the soak's buckets."""

    versions: Counter[tuple[str, str]] = field(default_factory=Counter)
    multipart_open: list[tuple[str, str, str]] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.versions.values())

    @property
    def duplicates(self) -> int:
        return sum(n - 1 for n in self.versions.values() if n > 1)


def read_objects(s3: Any, buckets: Iterable[str]) -> Objects:
    out = Objects()
    for bucket in buckets:
        for page in s3.get_paginator("list_object_versions").paginate(Bucket=bucket):
            for version in page.get("Versions", []):
                out.versions[(bucket, version["Key"])] += 1
        for page in s3.get_paginator("list_multipart_uploads").paginate(Bucket=bucket):
            for upload in page.get("Uploads", []):
                out.multipart_open.append((bucket, upload["Key"], upload["UploadId"]))
    return out


def log_problems(logs: Iterable[Path]) -> Counter[str]:
    """Log lines at error level (or with a traceback), by action, over every process."""
    found: Counter[str] = Counter()
    for path in logs:
        if not path.exists():
            continue
        for line in path.read_text(errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                if "Traceback" in line:
                    found["(traceback outside the JSON log)"] += 1
                continue
            if isinstance(entry, dict) and (
                entry.get("level") in ("error", "critical") or "exception" in entry
            ):
                found[str(entry.get("action", entry.get("message", "?")))] += 1
    return found


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


@dataclass
class Outcome:
    drained: bool
    drain_seconds: float
    requests: Requests
    objects: Objects
    callbacks: CallbackFigures
    load: Load
    faults: Counter[str]
    problems: Counter[str]
    deliveries: dict[str, list[Delivery]]


def missed_targets(o: Outcome) -> list[str]:
    """Every figure that must be zero (or true) and is not."""
    succeeded = {
        (row.bucket, row.destination_path)
        for row in o.requests.rows
        if row.state == State.SUCCEEDED.value
    }
    lost = sum(1 for key in succeeded if o.objects.versions[key] == 0)
    checks = {
        "drained (nothing queued, running, retrying or with a callback pending)": o.drained,
        "duplicates (object versions beyond one per request key)": o.objects.duplicates == 0,
        "orphaned multipart uploads": not o.objects.multipart_open,
        "callbacks delivered twice": o.callbacks.delivered_twice == 0,
        "callbacks with a bad signature": o.callbacks.bad_signatures == 0,
        "succeeded requests without an object": lost == 0,
        "aws.status records of another account": o.load.foreign_records == 0,
    }
    return [name for name, ok in checks.items() if not ok]


def render(console: Console, o: Outcome, *, seed: int, seconds: float) -> list[str]:
    """Print the tables; returns the missed targets."""
    r, obj, cb = o.requests, o.objects, o.callbacks
    missed = missed_targets(o)
    succeeded_keys = {
        (row.bucket, row.destination_path) for row in r.rows if row.state == State.SUCCEEDED.value
    }
    failed_keys = {
        (row.bucket, row.destination_path) for row in r.rows if row.state == State.FAILED.value
    }
    lost = sum(1 for key in succeeded_keys if obj.versions[key] == 0)
    failed_with_object = sum(1 for key in failed_keys if obj.versions[key] > 0)

    table = Table(title=f"vodpush soak: seed {seed}, {seconds:.0f} s of load", show_lines=False)
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_column("target", justify="right")

    def row(name: str, value: object, target: str = "", ok: bool | None = None) -> None:
        mark = "" if ok is None else (" [green]ok[/]" if ok else " [bold red]MISSED[/]")
        table.add_row(name, str(value), target + mark)

    upload_errors = sum(n for (cmd, _), n in o.load.errors.items() if cmd == UPLOAD)
    row("aws.upload calls", len(o.load.latencies.get(UPLOAD, [])))
    row("  refused or unanswered", upload_errors)
    row("requests queued", r.total)
    row("  succeeded", r.by_state[State.SUCCEEDED.value])
    row("  failed", r.by_state[State.FAILED.value])
    for code, n in sorted(r.failed_by_code.items()):
        row(f"    {code}", n)
    row(
        "  still pending",
        f"{r.pending} ({', '.join(f'{s} {r.by_state[s]}' for s in PENDING_STATES)})",
        "0",
        r.pending == 0,
    )
    row("  drained in", f"{o.drain_seconds:.0f} s" + ("" if o.drained else " (gave up)"))
    table.add_section()
    row("uploads (object versions)", obj.total)
    row("duplicates (versions beyond one a key)", obj.duplicates, "0", obj.duplicates == 0)
    row("  keys queued by two requests", r.keys_twice)
    row("succeeded without an object", lost, "0", lost == 0)
    row("failed, yet an object exists", failed_with_object)
    row("orphaned multipart uploads", len(obj.multipart_open), "0", not obj.multipart_open)
    table.add_section()
    row("requests with a callback", sum(r.callbacks.values()))
    for state in ("delivered", "failed", "pending"):
        row(f"  callback {state}", r.callbacks[state])
    row("callback POSTs received", cb.posts)
    row("callbacks delivered twice", cb.delivered_twice, "0", cb.delivered_twice == 0)
    row("  under two webhook-ids", cb.twice_ids)
    row("  again after a 2xx", cb.after_success)
    row("callbacks with a bad signature", cb.bad_signatures, "0", cb.bad_signatures == 0)
    row(
        "aws.status records of another account",
        o.load.foreign_records,
        "0",
        o.load.foreign_records == 0,
    )
    table.add_section()
    row("faults injected", sum(o.faults.values()))
    for kind, n in sorted(o.faults.items()):
        row(f"  {kind}", n)
    console.print(table)

    latency = Table(title="API latency (from when each call was due, client side)")
    for name in ("command", "calls", "errors", "p50 ms", "p99 ms", "max ms"):
        latency.add_column(name, justify="left" if name == "command" else "right")
    for command in COMMANDS:
        values = o.load.latencies.get(command, [])
        errors = sum(n for (cmd, _), n in o.load.errors.items() if cmd == command)
        latency.add_row(
            command,
            str(len(values)),
            str(errors),
            *(f"{1000 * percentile(values, q):.0f}" if values else "-" for q in (0.5, 0.99, 1.0)),
        )
    console.print(latency)
    if o.load.errors:
        console.print(
            "API errors: "
            + ", ".join(f"{cmd} {err}: {n}" for (cmd, err), n in sorted(o.load.errors.items()))
        )
    for line in examples(o):
        console.print(line, markup=False, highlight=False)
    if o.problems:
        console.print(
            "error-level log lines by action: "
            + ", ".join(f"{action} {n}" for action, n in o.problems.most_common())
        )
    return missed


def examples(o: Outcome, limit: int = 5) -> list[str]:
    """A few instances of each missed target, with what the database says of them, to
    start an investigation from (the logs are kept with --keep)."""
    by_key = {(row.bucket, row.destination_path): row for row in o.requests.rows}
    by_callback = {row.callback.rsplit("/", 1)[-1]: row for row in o.requests.rows if row.callback}

    def describe(row: Any) -> str:
        if row is None:
            return "no request"
        return (
            f"request {row.id} {row.state}, attempts {row.attempts}, "
            f"lease expiries {row.lease_expiries}, callback attempts {row.callback_attempts}"
        )

    lines = []
    dups = [(key, n) for key, n in o.objects.versions.items() if n > 1]
    for (bucket, key), n in dups[:limit]:
        lines.append(
            f"duplicate: {bucket}/{key}: {n} versions; {describe(by_key.get((bucket, key)))}"
        )
    for bucket, key, upload_id in o.objects.multipart_open[:limit]:
        lines.append(
            f"orphaned multipart upload: {bucket}/{key} ({upload_id[:16]}...); "
            f"{describe(by_key.get((bucket, key)))}"
        )
    twice = [
        (key, items)
        for key, items in sorted(o.deliveries.items())
        if len({d.msg_id for d in items}) > 1 or any(d.ok for d in items[:-1])
    ]
    for key, items in twice[:limit]:
        posts = ", ".join(f"{d.msg_id[-8:]} {'2xx' if d.ok else 'not answered'}" for d in items)
        lines.append(f"callback twice: {key}: {posts}; {describe(by_callback.get(key))}")
    return lines
