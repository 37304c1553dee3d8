"""/metrics as an operator's Prometheus scrapes it: the queue depth of live states only, the
age of the longest-waiting due request, uploads in flight, bytes sent as they are sent,
per-account series only when asked for, no ``_created`` series; and the Grafana dashboard in
docs/ reads only series a real scrape has."""

from __future__ import annotations

import json
import re
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select, update

from tests.wire import call
from vodpush.persistence.models import UploadRequest
from vodpush.worker.runner import Worker

DASHBOARD = Path(__file__).resolve().parent.parent / "docs" / "grafana-dashboard.json"


def scrape(url: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Each sample name of a scrape -> its (labels, value) pairs."""
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    response = httpx.get(url + "/metrics", timeout=10)
    assert response.status_code == 200, response.text
    text = response.text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def exported_names(url: str) -> set[str]:
    """Every series name a scrape declares, with or without samples yet (a labelled
    counter has none until its first label set is used)."""
    text = httpx.get(url + "/metrics", timeout=10).text
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
        names.update(family.name + suffix for suffix in suffixes.get(family.type, ("",)))
    return names


def value(samples: dict[str, Any], name: str, **labels: str) -> float | None:
    for found, number in samples.get(name, []):
        if all(found.get(k) == v for k, v in labels.items()):
            return float(number)
    return None


def queue_upload(url: str, account: Any, sestore_root: Path, bucket: str, name: str, size: int):
    (sestore_root / "sestore1" / account.username / name).write_bytes(b"m" * size)
    answer = call(
        url, account, "aws.upload", path=f"sestore1/{account.username}/{name}",
        destination_path=f"metrics/{name}", bucket=bucket, acl="private",
    )  # fmt: skip
    assert answer["status"] == "success", answer
    return answer["data"]["id"]


def run_until_done(service: Any, url: str, account: Any, request_id: int) -> dict[str, Any]:
    worker = Worker(service)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while True:
            record = call(url, account, "aws.status", id=request_id)["data"][0]
            if record["state"] in ("succeeded", "failed"):
                return record
            assert time.monotonic() < deadline, record
            time.sleep(0.05)
    finally:
        worker.stop(grace=0)
        thread.join(10)


def test_a_scrape_shows_live_work_throughput_and_per_account_series(
    live_server, service, s3_account, bucket, sestore_root
) -> None:
    service.settings.metrics_per_account = True
    size = 300_000
    done = queue_upload(live_server.url, s3_account, sestore_root, bucket, "one.mp4", size)
    before = scrape(live_server.url)
    sent_before = value(before, "vodpush_upload_bytes_sent_total") or 0.0
    record = run_until_done(service, live_server.url, s3_account, done)
    assert record["state"] == "succeeded", record

    # A second request waits with no worker: due for a minute by the database's clock.
    waiting = queue_upload(live_server.url, s3_account, sestore_root, bucket, "two.mp4", 10)
    row = UploadRequest.__table__
    with service.engine.begin() as conn:
        due = conn.execute(select(row.c.not_before).where(row.c.id == waiting)).scalar_one()
        conn.execute(
            update(row).where(row.c.id == waiting).values(not_before=due - timedelta(minutes=1))
        )
    samples = scrape(live_server.url)

    assert not [name for name in samples if name.endswith("_created")]
    depth = {labels["state"] for labels, _ in samples["vodpush_queue_depth"]}
    assert {"queued", "retrying", "running"} <= depth
    assert not depth & {"succeeded", "failed", "canceled"}  # finished requests: not counted
    assert value(samples, "vodpush_queue_depth", state="queued") == 1
    oldest = value(samples, "vodpush_queue_oldest_due_seconds")
    assert oldest is not None and 59 <= oldest < 120
    assert (value(samples, "vodpush_upload_bytes_sent_total") or 0) - sent_before >= size
    assert value(samples, "vodpush_uploads_in_flight") == 0
    # Counters live as long as the process: compared with the scrape before the upload.
    account = str(service.accounts.find(s3_account.api_key).id)
    for name, labels, grew in (
        ("vodpush_account_uploads_total", {"account": account, "outcome": "success"}, 1),
        ("vodpush_account_uploaded_bytes_total", {"account": account}, size),
    ):
        now, then = value(samples, name, **labels), value(before, name, **labels) or 0.0
        assert now is not None and now - then == grew, (name, now, then)


def test_no_request_waits_means_an_oldest_age_of_zero(live_server) -> None:
    samples = scrape(live_server.url)
    assert value(samples, "vodpush_queue_oldest_due_seconds") == 0
    assert value(samples, "vodpush_database_up") == 1


# -- the dashboard -------------------------------------------------------------------------

_PROCESS_SERIES = re.compile(r"vodpush_[a-z_]+")


def test_the_grafana_dashboard_reads_only_series_vodpush_exports(
    live_server, service, s3_account, bucket, sestore_root
) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["title"] and dashboard["panels"]
    expressions = [
        target["expr"]
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
        if "expr" in target
    ]
    assert len(expressions) >= 8
    service.settings.metrics_per_account = True
    request_id = queue_upload(live_server.url, s3_account, sestore_root, bucket, "d.mp4", 1000)
    run_until_done(service, live_server.url, s3_account, request_id)
    exported = exported_names(live_server.url)
    # Histograms and counters are scraped as _bucket/_sum/_count and _total samples.
    used = {name for expr in expressions for name in _PROCESS_SERIES.findall(expr)}
    missing = sorted(name for name in used if name not in exported)
    assert not missing, f"the dashboard reads series vodpush does not export: {missing}"


@pytest.mark.unit
def test_the_dashboard_is_valid_grafana_json() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert panel["type"] in {"timeseries", "stat", "gauge"}
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"])
        for target in panel["targets"]:
            assert target["expr"].count("(") == target["expr"].count(")")
