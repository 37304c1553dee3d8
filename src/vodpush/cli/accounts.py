"""``vodpush account``: API accounts, their buckets, secrets and S3 settings (operator)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from vodpush.cli.common import open_service, print_json, user_errors
from vodpush.core.accounts import S3Settings
from vodpush.core.options import SSE_CHOICES


@click.group()
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
    service = open_service()
    print_json(service.accounts.create(cdn=cdn, username=username, s3=_s3_from(kwargs)))


@account.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@user_errors
def account_list(as_json: bool) -> None:
    """List accounts (never their secrets)."""
    service = open_service()
    accounts = [a.public() for a in service.accounts.list()]
    if as_json:
        print_json(accounts)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(
        "id",
        "cdn",
        "username",
        "api_key",
        "enabled",
        "s3 endpoint",
        "sse",
        "buckets",
        "webhook",
        "max in flight",
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
            _limit_cell(a["max_in_flight"]),
        )
    Console().print(table)


def _limit_cell(limit: int | None) -> str:
    return "(no limit)" if limit is None else str(limit)


def _buckets_cell(account: dict[str, Any]) -> str:
    if account["allowed_buckets"]:
        return " ".join(account["allowed_buckets"])
    # What an empty list means depends on whose credentials the account uses.
    return "(any its credentials reach)" if account["s3_access_key_id"] else "(none)"


@account.command("show")
@click.argument("ref")
@user_errors
def account_show(ref: str) -> None:
    """Show one account (REF: api_key, id or cdn/username), never its secrets."""
    print_json(open_service().accounts.find(ref).public())


@account.command("set-limit")
@click.argument("ref")
@click.option(
    "--max-in-flight",
    type=click.IntRange(min=1),
    help="Uploads of this account at once, across all workers.",
)
@click.option("--no-limit", is_flag=True, help="Remove the limit.")
@user_errors
def account_set_limit(ref: str, max_in_flight: int | None, no_limit: bool) -> None:
    """Limit how many uploads of an account run at once, across all workers; the rest
    wait in the queue while other accounts' uploads go on. Uploads already running beyond
    a lowered limit finish."""
    if (max_in_flight is None) == (not no_limit):
        raise click.UsageError("give --max-in-flight N or --no-limit (one of them)")
    limit = None if no_limit else max_in_flight
    print_json(open_service().accounts.set_max_in_flight(ref, limit).public())


@account.command("disable")
@click.argument("ref")
@user_errors
def account_disable(ref: str) -> None:
    """Disable an account (REF: api_key, id or cdn/username); its calls get code 0005."""
    print_json(open_service().accounts.set_enabled(ref, False).public())


@account.command("enable")
@click.argument("ref")
@user_errors
def account_enable(ref: str) -> None:
    """Enable a disabled account."""
    print_json(open_service().accounts.set_enabled(ref, True).public())


@account.command("rotate-secret")
@click.argument("ref")
@user_errors
def account_rotate(ref: str) -> None:
    """Give an account a new api_secret (printed once); the old one stops working."""
    print_json(open_service().accounts.rotate_secret(ref))


@account.command("allow-bucket")
@click.argument("ref")
@click.argument("patterns", metavar="BUCKET...", nargs=-1, required=True)
@user_errors
def account_allow_bucket(ref: str, patterns: tuple[str, ...]) -> None:
    """Let an account write to buckets (shell-style patterns such as 'cust-*')."""
    record = open_service().accounts.allow_buckets(ref, list(patterns))
    for pattern in patterns:
        if not pattern.strip("*?"):
            click.echo(
                f"warning: {pattern!r} matches every bucket the account's credentials reach",
                err=True,
            )
    print_json(record.public())


@account.command("disallow-bucket")
@click.argument("ref")
@click.argument("patterns", metavar="BUCKET...", nargs=-1, required=True)
@user_errors
def account_disallow_bucket(ref: str, patterns: tuple[str, ...]) -> None:
    """Remove bucket patterns (as listed) from an account; queued uploads to them fail."""
    print_json(open_service().accounts.disallow_buckets(ref, list(patterns)).public())


@account.command("rename")
@click.argument("ref")
@click.argument("new_username")
@user_errors
def account_rename(ref: str, new_username: str) -> None:
    """Give an account a new username: it then reads sestore<N>/NEW_USERNAME/ (move its
    files there). Usernames are unique across all CDNs."""
    print_json(open_service().accounts.rename(ref, new_username).public())


@account.command("rotate-webhook-secret")
@click.argument("ref")
@click.option(
    "--clear", is_flag=True, help="Drop the webhook secret: sign with the API secret again."
)
@user_errors
def account_rotate_webhook(ref: str, clear: bool) -> None:
    """Give an account its own callback signing secret (whsec_..., printed once); its
    callbacks are signed with it from now on, no longer with the API secret."""
    print_json(open_service().accounts.rotate_webhook_secret(ref, clear=clear))


@account.command("set-s3")
@click.argument("ref")
@_s3_options
@user_errors
def account_set_s3(ref: str, **kwargs: Any) -> None:
    """Replace an account's S3 settings (options left out are cleared)."""
    print_json(open_service().accounts.set_s3(ref, _s3_from(kwargs)).public())


# -- upload requests -----------------------------------------------------------------------
