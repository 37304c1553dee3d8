"""``vodpush client``: queue uploads and follow them from the shell, over the HTTP API.

A thin layer over :class:`vodpush_client.Client`; credentials come from flags or from
``VODPUSH_URL``, ``VODPUSH_CDN``, ``VODPUSH_API_KEY`` and ``VODPUSH_API_SECRET`` (and the
timeout from ``VODPUSH_TIMEOUT``), the variables ``Client.from_env()`` reads.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import TYPE_CHECKING, Any

import click

from vodpush.core.options import API_ACLS, STORAGE_CLASSES
from vodpush_client import (
    ApiError,
    ApiWarning,
    CallbackHistory,
    Client,
    ClientError,
    StatusRecord,
    disposition_header,
)

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
            envvar="VODPUSH_TIMEOUT",
            show_envvar=True,
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
        with warnings.catch_warnings():
            # The server's warnings are printed as "warning: ..." lines instead.
            warnings.simplefilter("ignore", ApiWarning)
            yield api
    except ApiError as exc:
        raise _Failed(f"{exc.message} (code {exc.code})") from exc
    except ClientError as exc:
        raise _Failed(str(exc)) from exc
    finally:
        api.close()


def _parse_pairs(items: tuple[str, ...], option: str) -> dict[str, str] | None:
    """KEY=VALUE items of a repeated option as a dict (None when there are none)."""
    if not items:
        return None
    pairs: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint=f"'{option}'")
        pairs[key] = value
    return pairs


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def client() -> None:
    """Call a vodpush API (aws.upload, aws.status, aws.cancel, aws.retry, aws.callbacks,
    aws.redeliver) as a client."""


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
@click.option(
    "--idempotency-key",
    help="Submitting the same upload with this key again within 24 h gives the first id.",
)
@click.option("--content-type", help="Content-Type of the object (default: from the name).")
@click.option(
    "--storage-class", type=click.Choice(STORAGE_CLASSES), help="S3 storage class of the object."
)
@click.option(
    "--tag",
    "tag_items",
    multiple=True,
    metavar="KEY=VALUE",
    help="An object tag; repeat for several (at most 10).",
)
@click.option("--cache-control", help="Cache-Control of the object.")
@click.option(
    "--content-disposition",
    help="Content-Disposition of the object, e.g. 'attachment; filename=\"a.mp4\"'.",
)
@click.option(
    "--download-name",
    metavar="FILENAME",
    help="Shorthand for an attachment Content-Disposition with this file name (any Unicode).",
)
@click.option(
    "--preflight",
    is_flag=True,
    help="Check the bucket first (credentials, bucket, ACL, a test write); queue nothing "
    "if it would not take the upload.",
)
@_credential_options
def upload(
    path: str,
    destination: str,
    bucket: str,
    acl: str,
    metadata_items: tuple[str, ...],
    callback: str,
    idempotency_key: str | None,
    content_type: str | None,
    storage_class: str | None,
    tag_items: tuple[str, ...],
    cache_control: str | None,
    content_disposition: str | None,
    download_name: str | None,
    preflight: bool,
    **kwargs: Any,
) -> None:
    """Queue PATH (sestore<N>/<user>/...) for upload to DESTINATION (the S3 key); prints
    the request id."""
    metadata = _parse_pairs(metadata_items, "--metadata")
    tags = _parse_pairs(tag_items, "--tag")
    if download_name is not None:
        if content_disposition is not None:
            raise click.UsageError("give --content-disposition or --download-name, not both")
        content_disposition = disposition_header(download_name)
    with _api(kwargs) as api:
        request_id = api.upload(
            path,
            destination,
            bucket,
            acl,
            metadata=metadata,
            callback=callback,
            idempotency_key=idempotency_key,
            content_type=content_type,
            storage_class=storage_class,
            tags=tags,
            cache_control=cache_control,
            content_disposition=content_disposition,
            preflight=preflight,
        )
        for warning in api.last_warnings:
            click.echo(f"warning: {warning}", err=True)
    click.echo(request_id)


def _when(at: datetime | None) -> str:
    """A time of the API as the API writes it (UTC)."""
    return "" if at is None else at.strftime("%Y-%m-%d %H:%M:%S")


def _progress_text(record: StatusRecord) -> str:
    if record.bytes_total:
        done = record.bytes_done or 0
        return f"{done}/{record.bytes_total} ({100 * done // record.bytes_total}%)"
    return ""


def status_filter_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """The aws.status filters as options (parameters states, bucket, path_prefix,
    created_from, created_to), the same in `vodpush client status` and the operator's
    `vodpush request list`."""
    options = [
        click.option(
            "--state",
            "states",
            multiple=True,
            metavar="STATE",
            help="Only requests in this state (queued, running, retrying, succeeded, failed, "
            "canceled); repeat for several.",
        ),
        click.option("--bucket", help="Only requests to this bucket."),
        click.option(
            "--path-prefix", help="Only requests whose source path starts with this, exactly."
        ),
        click.option(
            "--created-from",
            metavar="TIME",
            help="Only requests queued at or after TIME: 'YYYY-MM-DD HH:MM:SS' (UTC) or unix "
            "seconds.",
        ),
        click.option(
            "--created-to",
            metavar="TIME",
            help="Only requests queued at or before TIME (its whole second), as --created-from.",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


@client.command()
@click.option("--id", "request_id", type=click.IntRange(min=1), help="Only this request.")
@click.option("--limit", type=click.IntRange(min=1), default=25, show_default=True)
@click.option("--offset", type=click.IntRange(min=0), default=0, show_default=True)
@status_filter_options
@click.option(
    "--after-id",
    type=click.IntRange(min=1),
    help="The page after the one that ended with this id (keyset paging; not with --offset).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@_credential_options
def status(
    request_id: int | None,
    limit: int,
    offset: int,
    states: tuple[str, ...],
    bucket: str | None,
    path_prefix: str | None,
    created_from: str | None,
    created_to: str | None,
    after_id: int | None,
    as_json: bool,
    **kwargs: Any,
) -> None:
    """List your upload requests, newest first; the filters all apply together. With a
    filter or --after-id the table's caption gives the total and the next page's
    --after-id."""
    with _api(kwargs) as api:
        records = api.status(
            limit=limit,
            offset=offset,
            id=request_id,
            state=list(states) or None,
            bucket=bucket,
            path_prefix=path_prefix,
            created_from=_digits_as_int(created_from),
            created_to=_digits_as_int(created_to),
            after_id=after_id,
        )
    for warning in records.warnings:
        click.echo(f"warning: {warning}", err=True)
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
            _when(r.last_updated),
        )
    for column in table.columns:
        column.overflow = "fold"
    if records.total is not None:
        table.caption = f"{len(records)} of {records.total} matching"
        if records and len(records) == limit:
            table.caption += f"; next page: --after-id {records[-1].id}"
    Console(markup=False).print(table)


def _print_change(record: StatusRecord, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(record.to_dict(), indent=2, ensure_ascii=False))
    else:
        click.echo(f"request {record.id}: {record.state} ({record.message})")


@client.command()
@click.argument("request_id", metavar="ID", type=click.IntRange(min=1))
@click.option("--json", "as_json", is_flag=True, help="Print the request's record as JSON.")
@_credential_options
def cancel(request_id: int, as_json: bool, **kwargs: Any) -> None:
    """Cancel request ID (queued, running or retrying): it stops within a few seconds and
    a multipart upload is aborted, nothing is stored."""
    with _api(kwargs) as api:
        record = api.cancel(request_id)
    _print_change(record, as_json)


@client.command()
@click.argument("request_id", metavar="ID", type=click.IntRange(min=1))
@click.option("--json", "as_json", is_flag=True, help="Print the request's record as JSON.")
@_credential_options
def retry(request_id: int, as_json: bool, **kwargs: Any) -> None:
    """Queue request ID (failed or canceled) again, its attempts from 0."""
    with _api(kwargs) as api:
        record = api.retry(request_id)
    _print_change(record, as_json)


@client.command()
@click.argument("request_id", metavar="ID", type=click.IntRange(min=1))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@_credential_options
def callbacks(request_id: int, as_json: bool, **kwargs: Any) -> None:
    """Show the callback of request ID: its state and its delivery attempts, newest first."""
    with _api(kwargs) as api:
        history = api.callbacks(request_id)
    if as_json:
        click.echo(json.dumps(history.to_dict(), indent=2, ensure_ascii=False))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console(markup=False, highlight=False)
    console.print(_callback_summary(history), soft_wrap=True)
    if not history.attempts:
        return
    table = Table("at (UTC)", "result", "HTTP", "error", "seconds")
    for a in history.attempts:
        # Errors may hold the receiver's text: never let rich read it as markup.
        table.add_row(
            _when(a.at),
            "ok" if a.ok else "failed",
            "" if a.http_status is None else str(a.http_status),
            a.error or "",
            "" if a.duration is None else f"{a.duration:.3f}",
        )
    for column in table.columns:
        column.overflow = "fold"
    console.print(table)
    if history.total > len(history.attempts):
        console.print(f"the newest {len(history.attempts)} of {history.total} attempts")


def _callback_summary(history: CallbackHistory) -> str:
    if not history.callback:
        return f"request {history.id} ({history.state}) has no callback URL"
    lines = [f"request {history.id} ({history.state}): callback {history.callback_state}"]
    lines.append(f"  url: {history.callback}")
    if history.webhook_id:
        lines.append(f"  webhook-id: {history.webhook_id}")
    lines.append(
        f"  attempts: {history.callback_attempts} of this delivery, {history.total} in all"
    )
    if history.next_attempt_at:
        lines.append(f"  next attempt: {_when(history.next_attempt_at)} UTC")
    if history.callback_error:
        lines.append(f"  last error: {history.callback_error}")
    if history.redeliveries:
        last = _when(history.last_redelivered)
        lines.append(f"  redeliveries: {history.redeliveries}, the last at {last} UTC")
    return "\n".join(lines)


@client.command()
@click.argument("request_id", metavar="ID", type=click.IntRange(min=1))
@_credential_options
def redeliver(request_id: int, **kwargs: Any) -> None:
    """Send the callback of finished request ID again, as a new message (new webhook-id)."""
    with _api(kwargs) as api:
        done = api.redeliver(request_id)
    when = f", due {_when(done.next_attempt_at)} UTC" if done.next_attempt_at else ""
    click.echo(
        f"request {done.id}: callback {done.callback_state} (webhook-id {done.webhook_id}{when})"
    )


def _digits_as_int(value: str | None) -> str | int | None:
    """Unix seconds as a number; anything else as given (the server checks it)."""
    return int(value) if value is not None and value.isascii() and value.isdigit() else value


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
    """Follow request ID until it succeeds (exit 0), fails or is canceled (exit 1).

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
    outcome = "canceled" if record.canceled else "failed"
    click.echo(f"request {request_id} {outcome}: {record.message}")
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
