"""``vodpush request``: an account's upload requests, through the same operations as the API."""

from __future__ import annotations

import click

from vodpush.cli.common import open_service, print_json, user_errors
from vodpush.operations import OperationContext, StatusQuery, status


@click.group("request")
def request_group() -> None:
    """Look at an account's upload requests (the operations the API runs)."""


@request_group.command("list")
@click.argument("ref")
@click.option("--limit", type=int, help="At most this many (default 25), newest first.")
@click.option("--offset", type=int, help="Skip this many of the newest first.")
@click.option("--id", "request_id", type=int, help="Only the request with this id.")
@click.option(
    "--state",
    "states",
    multiple=True,
    help="Only requests in this state (queued, running, retrying, succeeded, failed, "
    "canceled); repeat for several.",
)
@click.option("--bucket", help="Only requests to this bucket.")
@click.option("--path-prefix", help="Only requests whose source path starts with this, exactly.")
@click.option(
    "--created-from",
    metavar="TIME",
    help="Queued at or after TIME: 'YYYY-MM-DD HH:MM:SS' (UTC) or unix seconds.",
)
@click.option("--created-to", metavar="TIME", help="Queued at or before TIME (its whole second).")
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


# -- secrets at rest -----------------------------------------------------------------------
