"""``vodpush client``: queue uploads and follow them from the shell, over the HTTP API.

A thin layer over :class:`vodpush.client.Client`; credentials come from flags or from
``VODPUSH_URL``, ``VODPUSH_CDN``, ``VODPUSH_API_KEY`` and ``VODPUSH_API_SECRET``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import TYPE_CHECKING, Any

import click

from vodpush.client import ApiError, Client, ClientError, StatusRecord
from vodpush.core.options import API_ACLS

if TYPE_CHECKING:
    from rich.console import Console

__all__ = ["client"]

_CREDENTIALS = (
    # (option, environment variable, parameter name)
    ("--url", "VODPUSH_URL", "url"),
    ("--cdn", "VODPUSH_CDN", "cdn"),
    ("--api-key", "VODPUSH_API_KEY", "api_key"),
    ("--api-secret", "VODPUSH_API_SECRET", "api_secret"),
)


class _Failed(click.ClickException):
    """``error: ...`` on stderr, exit code 1, no traceback (as vodpush.cli.common.UserError)."""

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


class _Silent(click.ClickException):
    """Exit code 1 with nothing more to say (the outcome is already printed). Not
    click.exceptions.Exit: vodpush.cli.main reports only ClickException exit codes."""

    def __init__(self) -> None:
        super().__init__("")

    def show(self, file: Any = None) -> None:
        pass


def _credential_options(func: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option(
            "--url",
            envvar="VODPUSH_URL",
            show_envvar=True,
            help="API endpoint, e.g. https://host/stable/ (a bare host URL means /stable/).",
        ),
        click.option(
            "--cdn",
            envvar="VODPUSH_CDN",
            show_envvar=True,
            type=click.IntRange(min=1),
            help="Your CDN id.",
        ),
        click.option("--api-key", envvar="VODPUSH_API_KEY", show_envvar=True, help="API key."),
        click.option(
            "--api-secret",
            envvar="VODPUSH_API_SECRET",
            show_envvar=True,
            help="API secret (prefer the environment variable: flags end up in shell history).",
        ),
        click.option(
            "--timeout",
            type=click.FloatRange(min=0.1),
            default=10.0,
            show_default=True,
            help="Seconds to wait for each HTTP answer.",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


@contextmanager
def _api(kwargs: dict[str, Any]) -> Iterator[Client]:
    """A Client from the credential options; every client error becomes a clean CLI error."""
    missing = [f"{flag} (or {env})" for flag, env, name in _CREDENTIALS if not kwargs.get(name)]
    if missing:
        raise _Failed(f"missing {', '.join(missing)}")
    try:
        api = Client(
            kwargs["url"],
            kwargs["cdn"],
            kwargs["api_key"],
            kwargs["api_secret"],
            timeout=kwargs["timeout"],
        )
    except ValueError as exc:
        raise _Failed(str(exc)) from exc
    try:
        yield api
    except ApiError as exc:
        raise _Failed(f"{exc.message} (code {exc.code})") from exc
    except ClientError as exc:
        raise _Failed(str(exc)) from exc
    finally:
        api.close()


def _parse_metadata(items: tuple[str, ...]) -> dict[str, str] | None:
    if not items:
        return None
    metadata: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="'--metadata'")
        metadata[key] = value
    return metadata


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def client() -> None:
    """Call a vodpush API (aws.upload, aws.status) as a client."""


@client.command()
@click.argument("path")
@click.argument("destination")
@click.option("--bucket", required=True, help="Destination S3 bucket.")
@click.option("--acl", type=click.Choice(API_ACLS), required=True, help="Object ACL.")
@click.option(
    "--metadata",
    "metadata_items",
    multiple=True,
    metavar="KEY=VALUE",
    help="User metadata for the object; repeat for several.",
)
@click.option("--callback", default="", help="URL to POST the result to when done.")
@_credential_options
def upload(
    path: str,
    destination: str,
    bucket: str,
    acl: str,
    metadata_items: tuple[str, ...],
    callback: str,
    **kwargs: Any,
) -> None:
    """Queue PATH (sestore<N>/<user>/...) for upload to DESTINATION (the S3 key); prints
    the request id."""
    metadata = _parse_metadata(metadata_items)
    with _api(kwargs) as api:
        request_id = api.upload(
            path, destination, bucket, acl, metadata=metadata, callback=callback
        )
    click.echo(request_id)


def _when(at: datetime | None) -> str:
    """A time of the API as the API writes it (UTC)."""
    return "" if at is None else at.strftime("%Y-%m-%d %H:%M:%S")


def _progress_text(record: StatusRecord) -> str:
    if record.bytes_total:
        done = record.bytes_done or 0
        return f"{done}/{record.bytes_total} ({100 * done // record.bytes_total}%)"
    return ""


@client.command()
@click.option("--id", "request_id", type=click.IntRange(min=1), help="Only this request.")
@click.option("--limit", type=click.IntRange(min=1), default=25, show_default=True)
@click.option("--offset", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@_credential_options
def status(request_id: int | None, limit: int, offset: int, as_json: bool, **kwargs: Any) -> None:
    """List your upload requests, newest first."""
    with _api(kwargs) as api:
        records = api.status(limit=limit, offset=offset, id=request_id)
    if as_json:
        click.echo(json.dumps([r.to_dict() for r in records], indent=2, ensure_ascii=False))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(
        "id", "state", "next attempt (UTC)", "message", "path", "destination", "bytes", "updated"
    )
    for r in records:
        destination = f"{r.bucket}/{r.destination_path}" if r.bucket else r.destination_path
        # Values are user text: never let rich read them as markup.
        table.add_row(
            str(r.id),
            r.state or "",
            _when(r.next_attempt_at),  # only while retrying
            r.message,
            r.path,
            destination,
            _progress_text(r),
            r.last_updated,
        )
    for column in table.columns:
        column.overflow = "fold"
    Console(markup=False).print(table)


@client.command()
@click.argument("request_id", metavar="ID", type=click.IntRange(min=1))
@click.option(
    "--interval",
    type=click.FloatRange(min=0.05),
    default=1.0,
    show_default=True,
    help="Seconds between polls.",
)
@_credential_options
def wait(request_id: int, interval: float, **kwargs: Any) -> None:
    """Follow request ID until it succeeds (exit 0) or fails (exit 1).

    On a terminal, a progress bar shows bytes done, rate and time left (on stderr);
    elsewhere each new status message is printed as a line. The final line goes to stdout.
    """
    from rich.console import Console

    with _api(kwargs) as api:
        record = follow(
            lambda: api.get(request_id),
            label=f"request {request_id}",
            interval=interval,
            console=Console(stderr=True),
        )
    if record.succeeded:
        click.echo(f"request {request_id}: {record.message}")
        return
    click.echo(f"request {request_id} failed: {record.message}")
    raise _Silent()


def follow(
    poll: Callable[[], StatusRecord],
    *,
    label: str,
    interval: float,
    console: Console,
    sleep: Callable[[float], None] = time.sleep,
    get_time: Callable[[], float] | None = None,
) -> StatusRecord:
    """Poll a request until it is finished, showing its progress on ``console``; returns
    the last record. ``sleep`` and ``get_time`` exist for tests."""
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    live = console.is_terminal and not console.is_dumb_terminal
    record = poll()
    progress = Progress(
        TextColumn("{task.description}", markup=False),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        disable=not live,
        # One frame per poll: nothing changes in between, and no refresh thread is needed.
        auto_refresh=False,
        get_time=get_time,
    )
    shown: str | None = None
    with progress:
        task = progress.add_task(label, total=None)
        while True:
            progress.update(
                task,
                description=f"{label}: {_short(_headline(record))}",
                total=record.bytes_total or None,
                completed=record.bytes_done or 0,
            )
            # Off a terminal every new message is a line; on one, the bar shows the state,
            # and a retry (when, which attempt, the last error: too long for the bar) is
            # also a line above it, which stays.
            if record.message != shown and (not live or record.retrying):
                progress.console.print(
                    f"{label}: {record.message}", markup=False, highlight=False, soft_wrap=True
                )
            shown = record.message
            progress.refresh()
            if record.finished:
                return record
            sleep(interval)
            record = poll()


def _headline(record: StatusRecord) -> str:
    """The state in a few words, for the progress bar."""
    if record.retrying and record.next_attempt_at is not None:
        return f"retrying at {record.next_attempt_at:%H:%M:%S} UTC: {record.last_error}"
    return record.message


def _short(message: str, width: int = 48) -> str:
    return message if len(message) <= width else message[: width - 1] + "…"
