"""``vodpush account``: API accounts, their buckets, secrets and S3 settings (operator)."""

from __future__ import annotations

import shlex
import time
from collections.abc import Callable
from typing import Any

import click

from vodpush.cli.common import UserError, open_service, print_json, user_errors
from vodpush.core.accounts import AccountRecord, S3Settings, role_session_name
from vodpush.core.options import API_ACLS, SSE_CHOICES
from vodpush.core.preflight import Check, PreflightReport, Verdict


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
        click.option(
            "--role-arn",
            help="IAM role to assume through STS for uploads "
            "(arn:aws:iam::<account>:role/<name>), with the keys above or the service's.",
        ),
        click.option(
            "--external-id",
            envvar="VODPUSH_S3_EXTERNAL_ID",
            help="External id the role's trust policy asks for (or VODPUSH_S3_EXTERNAL_ID).",
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
        role_arn=kwargs["role_arn"],
        external_id=kwargs["external_id"],
    )


@account.command("create")
@click.option("--cdn", type=click.IntRange(min=1), required=True, help="ScaleEngine CDN id.")
@click.option("--username", required=True, help="User whose sestore directories it reads.")
@click.option(
    "--export",
    "as_exports",
    is_flag=True,
    help="Print shell exports of VODPUSH_CDN, VODPUSH_API_KEY and VODPUSH_API_SECRET "
    "(for `eval`) instead of JSON.",
)
@_s3_options
@user_errors
def account_create(cdn: int, username: str, as_exports: bool, **kwargs: Any) -> None:
    """Create an account; prints its api_key and api_secret (shown only now)."""
    service = open_service()
    created = service.accounts.create(cdn=cdn, username=username, s3=_s3_from(kwargs))
    if not as_exports:
        print_json(created)
        return
    # What `vodpush client` and the client library read (with VODPUSH_URL).
    exports = {
        "VODPUSH_CDN": created["cdn"],
        "VODPUSH_API_KEY": created["api_key"],
        "VODPUSH_API_SECRET": created["api_secret"],
    }
    click.echo(" ".join(["export", *(f"{k}={shlex.quote(str(v))}" for k, v in exports.items())]))


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
    own = account["s3_access_key_id"] or account["s3_role_arn"]
    return "(any its credentials reach)" if own else "(none)"


@account.command("show")
@click.argument("ref")
@user_errors
def account_show(ref: str) -> None:
    """Show one account (REF: api_key, id or cdn/username), secrets masked."""
    print_json(open_service().accounts.find(ref).public())


@account.command("check")
@click.argument("ref")
@click.option(
    "--bucket",
    "buckets",
    multiple=True,
    help="Bucket to check (repeatable; default: the account's buckets named without wildcards).",
)
@click.option(
    "--key",
    default=None,
    help="Object key to test writing (default: .vodpush-preflight/check). Nothing is left "
    "behind: a multipart upload is started and aborted.",
)
@click.option(
    "--acl",
    type=click.Choice(sorted({*API_ACLS, "bucket-default"})),
    default="private",
    show_default=True,
    help="ACL the uploads will ask for (public-read is checked against the bucket's "
    "public access block and Object Ownership).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the reports as JSON.")
@user_errors
def account_check(
    ref: str, buckets: tuple[str, ...], key: str | None, acl: str, as_json: bool
) -> None:
    """Check that the account's S3 settings work: the role can be assumed, the keys are
    valid, each bucket exists and takes an upload with the ACL; exit 1 when one does not."""
    from vodpush.transfer.preflight import CHECK_KEY, run_preflight

    service = open_service()
    record = service.accounts.find(ref)
    names = list(dict.fromkeys(buckets)) or _literal_buckets(record)
    if not names:
        raise UserError(
            "name the bucket(s) to check with --bucket (the account's list has no bucket "
            "named without wildcards)"
        )
    reports = []
    for bucket in names:
        report = run_preflight(
            record.s3,
            bucket=bucket,
            key=key or CHECK_KEY,
            acl=acl,
            session_name=role_session_name(record.id),
            deadline=time.monotonic() + service.settings.preflight_timeout,
        )
        reports.append((_allowed(record, bucket), report))
    if as_json:
        print_json(
            {
                "account": _who(record),
                "passed": all(_passed(a, r) for a, r in reports),
                "buckets": [{**r.as_dict(), "allowed": a.as_dict()} for a, r in reports],
            }
        )
    else:
        click.echo(_who(record))
        for allowed, report in reports:
            verdict = "passed" if _passed(allowed, report) else "FAILED"
            click.echo(
                f"bucket {report.bucket!r} (key {report.key!r}, acl {report.acl}): {verdict}"
            )
            for check in (allowed, *report.checks):
                click.echo(f"  {check.verdict.value:<8} {check.name:<12} {check.detail}")
    if not all(_passed(a, r) for a, r in reports):
        raise click.exceptions.Exit(1)


def _literal_buckets(record: AccountRecord) -> list[str]:
    return [b for b in record.allowed_buckets if not any(c in b for c in "*?[")]


def _allowed(record: AccountRecord, bucket: str) -> Check:
    refused = record.may_use_bucket(bucket)
    if refused is None:
        return Check("allowed", Verdict.OK, "the account may write to this bucket")
    return Check("allowed", Verdict.FAILED, refused)


def _passed(allowed: Check, report: PreflightReport) -> bool:
    return allowed.verdict is not Verdict.FAILED and report.passed


def _who(record: AccountRecord) -> str:
    s3 = record.s3
    if s3.role_arn:
        identity = f"role {s3.role_arn}" + (" (with an external id)" if s3.external_id else "")
        identity += ", assumed with " + (
            f"key {s3.access_key_id}" if s3.access_key_id else "the service's credentials"
        )
    elif s3.access_key_id:
        identity = f"key {s3.access_key_id}"
    else:
        identity = "the service's credentials"
    return (
        f"account {record.id} ({record.cdn}/{record.username}): {identity}; "
        f"endpoint {s3.endpoint_url or '(default)'}, region {s3.region or '(default)'}"
    )


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
