"""``vodpush request``: upload requests, through the same operations as the API."""

from __future__ import annotations

from typing import Any

import click

from vodpush.cli.common import open_service, print_json, user_errors
from vodpush.client_cli import status_filter_options
from vodpush.operations import (
    Changed,
    OperationContext,
    RequestRef,
    StatusQuery,
    cancel_any,
    history,
    retry_any,
    status,
)


@click.group("request")
def request_group() -> None:
    """Look at upload requests, cancel or retry them (the operations the API runs)."""


@request_group.command("list")
@click.argument("ref")
@click.option("--limit", type=int, help="At most this many (default 25), newest first.")
@click.option("--offset", type=int, help="Skip this many of the newest first.")
@click.option("--id", "request_id", type=int, help="Only the request with this id.")
@status_filter_options
@click.option("--after-id", type=int, help="Only requests below this id (the next page).")
@click.option("--json", "as_json", is_flag=True, help="Print the aws.status records as JSON.")
@user_errors
def request_list(
    ref: str,
    limit: int | None,
    offset: int | None,
    request_id: int | None,
    states: tuple[str, ...],
    bucket: str | None,
    path_prefix: str | None,
    created_from: str | None,
    created_to: str | None,
    after_id: int | None,
    as_json: bool,
) -> None:
    """An account's requests (REF: api_key, id or cdn/username), as its aws.status shows
    them, with the same filters (all together)."""
    service = open_service()
    try:
        ctx = OperationContext(
            account=service.accounts.find(ref), settings=service.settings, requests=service.requests
        )
        query = StatusQuery.from_values(
            {
                "limit": limit,
                "offset": offset,
                "id": request_id,
                "state": list(states) or None,
                "bucket": bucket,
                "path_prefix": path_prefix,
                "created_from": created_from,
                "created_to": created_to,
                "after_id": after_id,
            },
            service.settings,
        )
        page = status(ctx, query)
        found = page.records()
    finally:
        service.close()
    if as_json:
        print_json(found)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(
        "id",
        "state",
        "attempts",
        "next attempt (UTC)",
        "bucket",
        "destination_path",
        "path",
        "message",
        "updated",
    )
    for record in found:
        table.add_row(
            str(record["id"]),
            record["state"],
            str(record["attempts"]),
            record["next_attempt_at"],  # only while retrying
            record["bucket"],
            record["destination_path"],
            record["path"],
            record["message"],
            record["last_updated"],
        )
    if page.total is not None:
        table.caption = f"{len(found)} of {page.total} matching"
    # Paths and messages are the customer's text (and S3's): never read them as markup.
    Console(markup=False, highlight=False).print(table)


def _console() -> Any:
    from rich.console import Console

    # Paths and messages are the customer's text (and S3's): never read them as markup.
    return Console(markup=False, highlight=False)


@request_group.command("show")
@click.argument("request_id", metavar="ID", type=int)
@click.option("--json", "as_json", is_flag=True, help="Print the record and its events as JSON.")
@user_errors
def request_show(request_id: int, as_json: bool) -> None:
    """Request ID (of any account) as aws.status shows it, and its history: every step
    (queued, retrying, succeeded, failed, canceled, retried), oldest first."""
    service = open_service()
    try:
        found = history(service.requests, RequestRef(request_id))
    finally:
        service.close()
    if as_json:
        print_json(found.to_dict())
        return
    from rich.table import Table

    record = found.record
    console = _console()
    for name in ("id", "cdn_id", "state", "message", "attempts", "bucket", "destination_path"):
        console.print(f"{name}: {record[name]}")
    console.print(f"path: {record['path']}")
    console.print(f"created: {record['created']}  last_updated: {record['last_updated']}")
    table = Table("at (UTC)", "event", "state", "attempts", "error_code", "message")
    for event in found.events:
        table.add_row(
            event["at"],
            event["event"],
            event["state"],
            str(event["attempts"]),
            event["error_code"] or "",
            event["message"] or "",
        )
    console.print(table)


def _changed(done: Changed, as_json: bool) -> None:
    if as_json:
        print_json(done.record)
        return
    record = done.record
    click.echo(
        f"request {record['id']}: {done.previous} -> {record['state']} ({record['message']})"
    )


@request_group.command("cancel")
@click.argument("request_id", metavar="ID", type=int)
@click.option("--json", "as_json", is_flag=True, help="Print the request's record as JSON.")
@user_errors
def request_cancel(request_id: int, as_json: bool) -> None:
    """Cancel request ID (of any account) if it is queued, running or retrying; its
    message says the operator canceled it, its callback (if any) is sent."""
    service = open_service()
    try:
        done = cancel_any(service.requests, RequestRef(request_id))
    finally:
        service.close()
    _changed(done, as_json)


@request_group.command("retry")
@click.argument("request_id", metavar="ID", type=int)
@click.option("--json", "as_json", is_flag=True, help="Print the request's record as JSON.")
@user_errors
def request_retry(request_id: int, as_json: bool) -> None:
    """Queue request ID (of any account) again if it failed or was canceled: due now, its
    attempts from 0, a new callback when it finishes."""
    service = open_service()
    try:
        done = retry_any(service.requests, RequestRef(request_id))
    finally:
        service.close()
    _changed(done, as_json)
