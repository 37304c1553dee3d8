"""``vodpush reap``: the orphaned multipart uploads (given up, abort not confirmed by S3),
listed or aborted now. The worker's reaper aborts them on its own, with backoff; this is
for an operator who does not want to wait (S3 is back) or wants to see what is left."""

from __future__ import annotations

from typing import Any

import click

from vodpush.cli.common import UserError, open_service, print_json
from vodpush.core.orphans import Orphan
from vodpush.core.records import format_time
from vodpush.service import Service

# From this many orphans on, a progress bar instead of a line each (failures still print).
PROGRESS_FROM = 20


@click.command("reap")
@click.option("--list", "only_list", is_flag=True, help="Only show the recorded orphans.")
@click.option("--json", "as_json", is_flag=True, help="With --list: print JSON, not a table.")
def reap(only_list: bool, as_json: bool) -> None:
    """Abort now every multipart upload that was given up while S3 did not confirm its
    abort (the worker retries these on its own, with backoff). Exits 1 if some still
    could not be aborted: they stay recorded."""
    if as_json and not only_list:
        raise click.UsageError("--json goes with --list")
    service = open_service()
    try:
        orphans = service.orphans.list()
        if only_list:
            _show(service, orphans, as_json=as_json)
            return
        failed = _reap_all(service, orphans)
    finally:
        service.close()
    if failed:
        raise UserError(
            f"{failed} of {len(orphans)} multipart uploads could not be aborted; they stay "
            "recorded and the worker tries again (vodpush reap --list shows why)"
        )


def _reap_all(service: Service, orphans: list[Orphan]) -> int:
    from rich.console import Console
    from rich.progress import Progress

    from vodpush.worker.clients import AccountClients
    from vodpush.worker.reaper import Reaper

    reaper = Reaper(service, AccountClients(service.settings))
    console = Console()
    aborted = gone = failed = 0
    quiet = len(orphans) >= PROGRESS_FROM
    with Progress(console=console, disable=not quiet, transient=True) as progress:
        task = progress.add_task("aborting", total=len(orphans))
        for orphan in orphans:
            outcome = reaper.reap_now(orphan.id)
            progress.advance(task)
            where = f"#{orphan.id} s3://{orphan.bucket}/{orphan.key} upload {orphan.upload_id}"
            if outcome is None:
                gone += 1  # another reaper's abort was confirmed meanwhile
            elif outcome[1] is None:
                aborted += 1
                if not quiet:
                    console.print(f"aborted {where}", markup=False, highlight=False, soft_wrap=True)
            else:
                failed += 1
                console.print(
                    f"FAILED  {where}: {outcome[1]}", markup=False, highlight=False, soft_wrap=True
                )
    summary = f"{aborted} aborted, {failed} failed"
    if gone:
        summary += f", {gone} aborted by a worker meanwhile"
    console.print(summary, markup=False, highlight=False, soft_wrap=True)
    return failed


def _show(service: Service, orphans: list[Orphan], *, as_json: bool) -> None:
    names = {a.id: f"{a.cdn}/{a.username}" for a in service.accounts.list()}
    if as_json:
        print_json([_as_dict(o, names) for o in orphans])
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table("id", "account", "request", "bucket", "key", "upload id", "recorded",
                  "attempts", "next try", "last error")  # fmt: skip
    for o in orphans:
        table.add_row(
            str(o.id),
            names.get(o.account_id, str(o.account_id)),
            str(o.request_id or ""),
            o.bucket,
            o.key,
            o.upload_id,
            format_time(o.created_at),
            str(o.attempts),
            format_time(o.next_at),
            o.last_error or "",
        )
    console.print(table)
    console.print(f"{len(orphans)} orphaned multipart uploads", highlight=False)


def _as_dict(orphan: Orphan, names: dict[int, str]) -> dict[str, Any]:
    return {
        "id": orphan.id,
        "account_id": orphan.account_id,
        "account": names.get(orphan.account_id),
        "request_id": orphan.request_id,
        "bucket": orphan.bucket,
        "key": orphan.key,
        "upload_id": orphan.upload_id,
        "recorded": format_time(orphan.created_at),
        "attempts": orphan.attempts,
        "next_try": format_time(orphan.next_at),
        "last_error": orphan.last_error,
    }
