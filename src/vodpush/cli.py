"""The ``vodpush`` command: thin subcommands over the library."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import wraps
from typing import Any

import click
from pydantic import ValidationError

from vodpush import logs
from vodpush.client_cli import client as client_group
from vodpush.config import Settings, load_settings
from vodpush.core.accounts import AccountError, S3Settings
from vodpush.core.options import SSE_CHOICES
from vodpush.operations import OperationContext, Refused, StatusQuery, status
from vodpush.service import Service


class UserError(click.ClickException):
    """Shown as ``error: ...`` on stderr with exit code 1, no traceback."""

    def format_message(self) -> str:
        return self.message

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


def _settings() -> Settings:
    try:
        return load_settings()
    except ValidationError as exc:
        problems = "; ".join(
            f"VODPUSH_{'_'.join(str(p) for p in err['loc']).upper()}: {err['msg']}"
            for err in exc.errors()
        )
        raise UserError(f"bad configuration: {problems}") from exc
    except FileNotFoundError as exc:
        raise UserError(str(exc)) from exc


def _open_service() -> Service:
    try:
        return Service.open(_settings())
    except ValueError as exc:
        raise UserError(str(exc)) from exc


def user_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn the library's user-facing errors into clean CLI errors."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (AccountError, Refused) as exc:
            raise UserError(str(exc)) from exc

    return wrapper


def _print_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, ensure_ascii=False))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """vodpush: a ScaleEngine-compatible service that pushes VOD files to S3."""


# -- serve -------------------------------------------------------------------------------


@cli.command()
@click.option("--host", default=None, help="Address to listen on [VODPUSH_HOST, 127.0.0.1].")
@click.option("--port", type=int, default=None, help="Port to listen on [VODPUSH_PORT, 8080].")
@click.option(
    "--worker/--no-worker",
    "embedded_worker",
    default=True,
    help="Run an upload worker in this process (default) or only the API.",
)
def serve(host: str | None, port: int | None, embedded_worker: bool) -> None:
    """Run the API (and, by default, an upload worker) until interrupted."""
    from vodpush.server import run_server

    settings = _settings()
    logs.configure(settings.log_level)
    service = _open_service()
    run_server(
        service,
        host=host or settings.host,
        port=port or settings.port,
        embedded_worker=embedded_worker,
    )


@cli.command()
@click.option(
    "--concurrency",
    type=click.IntRange(1, 256),
    default=None,
    help="Uploads at once [VODPUSH_WORKER_CONCURRENCY, 4].",
)
@click.option("--burst", is_flag=True, help="Work until the queue is empty, then exit.")
@click.option(
    "--metrics-port",
    type=int,
    default=None,
    help="Serve /metrics on this port [on VODPUSH_METRICS_HOST, or VODPUSH_HOST].",
)
def worker(concurrency: int | None, burst: bool, metrics_port: int | None) -> None:
    """Run an upload worker until SIGTERM/SIGINT (running uploads get a grace period)."""
    import signal

    from vodpush.worker.runner import Worker

    settings = _settings()
    logs.configure(settings.log_level)
    service = _open_service()
    runner = Worker(service, concurrency=concurrency)
    if metrics_port:
        from vodpush.metrics import start_metrics_server

        token = settings.metrics_token
        start_metrics_server(
            settings.metrics_host or settings.host,
            metrics_port,
            queue=None,
            token=token.get_secret_value() if token is not None else None,
        )
    signal.signal(signal.SIGTERM, lambda *_: runner.stop())
    signal.signal(signal.SIGINT, lambda *_: runner.stop())
    try:
        runner.run(burst=burst)
    finally:
        service.close()


@cli.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def queue_status(as_json: bool) -> None:
    """Queue depth by state (operator view, all accounts)."""
    service = _open_service()
    depth = service.queue.depth()
    service.close()
    if as_json:
        _print_json(depth)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("state", "requests")
    for state, count in depth.items():
        table.add_row(state, str(count))
    Console().print(table)


@cli.command()
def migrate() -> None:
    """Apply database migrations (serve and worker do this on start too)."""
    service = _open_service()
    try:
        shared = service.accounts.ensure_unique_usernames()
    finally:
        service.close()
    click.echo("database is up to date")
    if shared:
        click.echo(
            "warning: usernames shared by several accounts: "
            f"{', '.join(shared)}; their uploads are refused until you rename all but one "
            "(vodpush account rename REF NEW_USERNAME)",
            err=True,
        )


@cli.command()
def keygen() -> None:
    """Print a new key for VODPUSH_SECRET_KEY."""
    from vodpush.crypto import generate_key

    click.echo(generate_key())


@cli.command("config")
def show_config() -> None:
    """Print the effective settings (secrets masked)."""
    _print_json(_settings().public_dict())


# -- accounts ----------------------------------------------------------------------------


@cli.group()
def account() -> None:
    """Manage API accounts (operator)."""


def _s3_options(func: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--s3-endpoint", help="S3 endpoint URL (default: boto3's own)."),
        click.option("--s3-region", help="S3 region."),
        click.option("--s3-access-key-id", help="S3 access key id."),
        click.option(
            "--s3-secret-access-key",
            envvar="VODPUSH_S3_SECRET_ACCESS_KEY",
            help="S3 secret key (or VODPUSH_S3_SECRET_ACCESS_KEY, to keep it out of history).",
        ),
        click.option("--s3-sse", type=click.Choice(SSE_CHOICES), help="Server-side encryption."),
        click.option("--s3-sse-kms-key-id", help="KMS key id, with --s3-sse aws:kms."),
        click.option(
            "--s3-checksums/--no-s3-checksums",
            default=True,
            help="Send S3 checksums (turn off for stores that reject the headers).",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _s3_from(kwargs: dict[str, Any]) -> S3Settings:
    return S3Settings(
        endpoint_url=kwargs["s3_endpoint"],
        region=kwargs["s3_region"],
        access_key_id=kwargs["s3_access_key_id"],
        secret_access_key=kwargs["s3_secret_access_key"],
        sse=kwargs["s3_sse"],
        sse_kms_key_id=kwargs["s3_sse_kms_key_id"],
        checksums=kwargs["s3_checksums"],
    )


@account.command("create")
@click.option("--cdn", type=click.IntRange(min=1), required=True, help="ScaleEngine CDN id.")
@click.option("--username", required=True, help="User whose sestore directories it reads.")
@_s3_options
@user_errors
def account_create(cdn: int, username: str, **kwargs: Any) -> None:
    """Create an account; prints its api_key and api_secret (shown only now)."""
    service = _open_service()
    _print_json(service.accounts.create(cdn=cdn, username=username, s3=_s3_from(kwargs)))


@account.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@user_errors
def account_list(as_json: bool) -> None:
    """List accounts (never their secrets)."""
    service = _open_service()
    accounts = [a.public() for a in service.accounts.list()]
    if as_json:
        _print_json(accounts)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(
        "id", "cdn", "username", "api_key", "enabled", "s3 endpoint", "sse", "buckets", "webhook"
    )
    for a in accounts:
        table.add_row(
            str(a["id"]),
            str(a["cdn"]),
            a["username"] + (" (SHARED: rename)" if a["username_shared"] else ""),
            a["api_key"],
            "yes" if a["enabled"] else "no",
            a["s3_endpoint_url"] or "(default)",
            a["s3_sse"] or "",
            _buckets_cell(a),
            "own secret" if a["own_webhook_secret"] else "api secret",
        )
    Console().print(table)


def _buckets_cell(account: dict[str, Any]) -> str:
    if account["allowed_buckets"]:
        return " ".join(account["allowed_buckets"])
    # What an empty list means depends on whose credentials the account uses.
    return "(any its credentials reach)" if account["s3_access_key_id"] else "(none)"


@account.command("disable")
@click.argument("ref")
@user_errors
def account_disable(ref: str) -> None:
    """Disable an account (REF: api_key, id or cdn/username); its calls get code 0005."""
    _print_json(_open_service().accounts.set_enabled(ref, False).public())


@account.command("enable")
@click.argument("ref")
@user_errors
def account_enable(ref: str) -> None:
    """Enable a disabled account."""
    _print_json(_open_service().accounts.set_enabled(ref, True).public())


@account.command("rotate-secret")
@click.argument("ref")
@user_errors
def account_rotate(ref: str) -> None:
    """Give an account a new api_secret (printed once); the old one stops working."""
    _print_json(_open_service().accounts.rotate_secret(ref))


@account.command("allow-bucket")
@click.argument("ref")
@click.argument("patterns", metavar="BUCKET...", nargs=-1, required=True)
@user_errors
def account_allow_bucket(ref: str, patterns: tuple[str, ...]) -> None:
    """Let an account write to buckets (shell-style patterns such as 'cust-*')."""
    record = _open_service().accounts.allow_buckets(ref, list(patterns))
    for pattern in patterns:
        if not pattern.strip("*?"):
            click.echo(
                f"warning: {pattern!r} matches every bucket the account's credentials reach",
                err=True,
            )
    _print_json(record.public())


@account.command("disallow-bucket")
@click.argument("ref")
@click.argument("patterns", metavar="BUCKET...", nargs=-1, required=True)
@user_errors
def account_disallow_bucket(ref: str, patterns: tuple[str, ...]) -> None:
    """Remove bucket patterns (as listed) from an account; queued uploads to them fail."""
    _print_json(_open_service().accounts.disallow_buckets(ref, list(patterns)).public())


@account.command("rename")
@click.argument("ref")
@click.argument("new_username")
@user_errors
def account_rename(ref: str, new_username: str) -> None:
    """Give an account a new username: it then reads sestore<N>/NEW_USERNAME/ (move its
    files there). Usernames are unique across all CDNs."""
    _print_json(_open_service().accounts.rename(ref, new_username).public())


@account.command("rotate-webhook-secret")
@click.argument("ref")
@click.option(
    "--clear", is_flag=True, help="Drop the webhook secret: sign with the API secret again."
)
@user_errors
def account_rotate_webhook(ref: str, clear: bool) -> None:
    """Give an account its own callback signing secret (whsec_..., printed once); its
    callbacks are signed with it from now on, no longer with the API secret."""
    _print_json(_open_service().accounts.rotate_webhook_secret(ref, clear=clear))


@account.command("set-s3")
@click.argument("ref")
@_s3_options
@user_errors
def account_set_s3(ref: str, **kwargs: Any) -> None:
    """Replace an account's S3 settings (options left out are cleared)."""
    _print_json(_open_service().accounts.set_s3(ref, _s3_from(kwargs)).public())


# -- upload requests -----------------------------------------------------------------------


@cli.group("request")
def request_group() -> None:
    """Look at an account's upload requests (the operations the API runs)."""


@request_group.command("list")
@click.argument("ref")
@click.option("--limit", type=int, help="At most this many (default 25), newest first.")
@click.option("--offset", type=int, help="Skip this many of the newest first.")
@click.option("--id", "request_id", type=int, help="Only the request with this id.")
@click.option("--json", "as_json", is_flag=True, help="Print the aws.status records as JSON.")
@user_errors
def request_list(
    ref: str, limit: int | None, offset: int | None, request_id: int | None, as_json: bool
) -> None:
    """An account's requests (REF: api_key, id or cdn/username), as its aws.status shows
    them."""
    service = _open_service()
    try:
        ctx = OperationContext(
            account=service.accounts.find(ref), settings=service.settings, requests=service.requests
        )
        query = StatusQuery.from_values(
            {"limit": limit, "offset": offset, "id": request_id}, service.settings
        )
        found = status(ctx, query).records()
    finally:
        service.close()
    if as_json:
        _print_json(found)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("id", "state", "bucket", "destination_path", "path", "message", "updated")
    for record in found:
        table.add_row(
            str(record["id"]),
            record["state"],
            record["bucket"],
            record["destination_path"],
            record["path"],
            record["message"],
            record["last_updated"],
        )
    Console().print(table)


# -- secrets at rest -----------------------------------------------------------------------


@cli.group("secrets")
def secrets_group() -> None:
    """Encryption keys of the secrets stored in the database (operator)."""


_ENV_STEPS = """\
VODPUSH_SECRET_KEY holds one key, and this command cannot change the environment of the
vodpush processes. Rotate in three steps (a new key was made for you):
  1. on every vodpush process (API and workers, every host), put the new key in front of
     the old one, and restart it:
       VODPUSH_SECRET_KEY={new},<the current key>
  2. run `vodpush secrets rotate-key` once, with that setting: it re-encrypts every secret
     with the new key;
  3. set VODPUSH_SECRET_KEY to the new key alone on every process, and restart it.
When no other vodpush process is running, one command does it all:
  vodpush secrets rotate-key --new-key {new}
then set VODPUSH_SECRET_KEY={new}."""


@secrets_group.command("rotate-key")
@click.option(
    "--new-key",
    envvar="VODPUSH_NEW_SECRET_KEY",
    help="The key to rotate to (or VODPUSH_NEW_SECRET_KEY); default: a new one (key file).",
)
@click.option(
    "--keep-old-keys",
    is_flag=True,
    help="Leave the old keys in the key file (drop them by hand once every host has the new).",
)
@click.option(
    "--batch-size",
    type=click.IntRange(1, 10_000),
    default=100,
    show_default=True,
    help="Accounts per transaction.",
)
@click.option(
    "--pause",
    type=click.FloatRange(0, 60),
    default=0.0,
    help="Seconds to wait between batches, to spare a busy database.",
)
def secrets_rotate_key(
    new_key: str | None, keep_old_keys: bool, batch_size: int, pause: float
) -> None:
    """Re-encrypt every stored secret with a new key; then drop the old key.

    Keys in the key file (the default): the new key is written first in the file, every
    secret is re-encrypted, then the old key is dropped; running processes re-read the file.
    Interrupted, it resumes when run again. Keys in VODPUSH_SECRET_KEY: see the steps it
    prints (the environment of other processes cannot be changed from here).
    """
    from pathlib import Path

    from vodpush.crypto import generate_key, parse_keys
    from vodpush.persistence.rotation import RotationError, rotate_env_keys, rotate_file_keys

    settings = _settings()
    service = _open_service()
    try:
        with _progress_bar() as on_progress:
            try:
                if settings.secret_key is None:
                    report = rotate_file_keys(
                        service.database(),
                        Path(settings.secret_key_file),
                        new_key=new_key,
                        keep_old=keep_old_keys,
                        batch_size=batch_size,
                        pause=pause,
                        on_progress=on_progress,
                    )
                else:
                    keys = parse_keys(settings.secret_key.get_secret_value(), "VODPUSH_SECRET_KEY")
                    if len(keys) == 1 and new_key is None:
                        click.echo(_ENV_STEPS.format(new=generate_key()))
                        raise UserError("nothing changed: VODPUSH_SECRET_KEY holds one key")
                    if new_key is not None and len(keys) == 1:
                        parse_keys(new_key, "--new-key")
                        click.echo(
                            "warning: processes still running with only the old key cannot "
                            "read the re-encrypted secrets until they get the new key",
                            err=True,
                        )
                    report = rotate_env_keys(
                        service.database(),
                        keys,
                        new_key=new_key,
                        batch_size=batch_size,
                        pause=pause,
                        on_progress=on_progress,
                    )
            except (RotationError, ValueError) as exc:
                raise UserError(str(exc)) from exc
    finally:
        service.close()
    shown: dict[str, Any] = {
        "key_source": report.source,
        "resumed": report.resumed,
        "accounts": report.reencrypt.accounts,
        "secrets": report.reencrypt.secrets,
        "reencrypted": report.reencrypt.reencrypted,
        "passes": report.reencrypt.passes,
        "keys_before": report.keys_before,
        "keys_now": report.keys_after,
        "dropped": report.dropped,
    }
    if report.source == "file":
        shown["key_file"] = str(settings.secret_key_file)
    else:
        shown["next_step"] = (
            f"every secret is now encrypted with key {report.keys_after[0]}: set "
            "VODPUSH_SECRET_KEY to it alone on every vodpush process and restart them"
        )
    _print_json(shown)


@secrets_group.command("status")
def secrets_status() -> None:
    """Where the keys come from, and how many stored secrets each key decrypts."""
    from vodpush.persistence.rotation import count_by_key

    settings = _settings()
    service = _open_service()
    try:
        counts = count_by_key(service.database(), service.box)
    finally:
        service.close()
    keys = [
        {"fingerprint": fp, "encrypts": i == 0, "secrets": counts.get(i, 0)}
        for i, fp in enumerate(service.box.fingerprints)
    ]
    shown: dict[str, Any] = {"key_source": "env" if settings.secret_key is not None else "file"}
    if settings.secret_key is None:
        shown["key_file"] = str(settings.secret_key_file)
    _print_json({**shown, "keys": keys, "undecryptable": counts.get(None, 0)})
    if counts.get(None):
        raise UserError(f"{counts[None]} stored secret(s) decrypt with none of the keys")


@contextmanager
def _progress_bar() -> Iterator[Callable[[int, int], None]]:
    """A progress bar on stderr when it is a terminal (long rotations: many accounts)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    console = Console(stderr=True)
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not console.is_terminal,
        transient=True,
    ) as progress:
        task = progress.add_task("re-encrypting", total=None)

        def update(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        yield update


cli.add_command(client_group)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code instead of exiting, for tests."""
    try:
        # Without standalone mode click returns ctx.exit(n)'s code instead of exiting.
        code = cli.main(
            args=list(argv) if argv is not None else None,
            prog_name="vodpush",
            standalone_mode=False,
        )
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 1
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.exceptions.Exit as exc:
        return exc.exit_code
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
