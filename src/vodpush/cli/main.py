"""The ``vodpush`` command: the group, serving and operating commands, and ``main``."""

from __future__ import annotations

import sys
from collections.abc import Sequence

import click

from vodpush.cli.accounts import account
from vodpush.cli.common import (
    exit_after_stop,
    open_service,
    open_service_migrated,
    print_json,
    settings_or_fail,
    start_logging,
    stop_on_signals,
    warn_about_environment,
)
from vodpush.cli.orphans import reap
from vodpush.cli.requests import request_group
from vodpush.cli.secrets import secrets_group
from vodpush.cli.startup import CannotListenError, ExitCode, warn_if_no_sestore
from vodpush.client_cli import client as client_group


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """vodpush: a ScaleEngine-compatible service that pushes VOD files to S3."""


# -- serve -------------------------------------------------------------------------------


@cli.command()
@click.option("--host", default=None, help="Address to listen on [VODPUSH_HOST, 127.0.0.1].")
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=None,
    help="Port to listen on (0: any free port) [VODPUSH_PORT, 8080].",
)
@click.option(
    "--worker/--no-worker",
    "embedded_worker",
    default=True,
    help="Run an upload worker in this process (default) or only the API.",
)
def serve(host: str | None, port: int | None, embedded_worker: bool) -> None:
    """Run the API (and, by default, an upload worker) until interrupted.

    Exits at once, with one line on stderr, when it cannot start: 2 bad configuration,
    3 the port cannot be listened on, 4 the database cannot be used, 5 a data directory
    cannot be written."""
    from vodpush.server import CannotListen, run_server

    settings = settings_or_fail()
    start_logging(settings, cli)
    service = open_service(settings)
    warn_if_no_sestore(settings)
    try:
        run_server(
            service,
            host=host or settings.host,
            port=settings.port if port is None else port,
            embedded_worker=embedded_worker,
        )
    except CannotListen as exc:
        service.close()
        raise CannotListenError(str(exc)) from exc
    exit_after_stop()  # run_server returns only once a signal stopped it


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
    type=click.IntRange(1, 65535),
    default=None,
    help="Serve /metrics on this port [on VODPUSH_METRICS_HOST, or VODPUSH_HOST].",
)
def worker(concurrency: int | None, burst: bool, metrics_port: int | None) -> None:
    """Run an upload worker until SIGTERM/SIGINT (running uploads get a grace period)."""

    from vodpush.server import CannotListen, start_metrics
    from vodpush.worker.runner import Worker

    settings = settings_or_fail()
    start_logging(settings, cli)
    service = open_service(settings)
    warn_if_no_sestore(settings)
    runner = Worker(service, concurrency=concurrency)
    if metrics_port:
        try:
            start_metrics(
                settings.metrics_host or settings.host,
                metrics_port,
                queue=None,
                token=settings.metrics_token,
            )
        except CannotListen as exc:
            service.close()
            raise CannotListenError(str(exc)) from exc
    stop_on_signals(runner.stop)  # runner.run() holds locks on this (the main) thread
    try:
        runner.run(burst=burst)
    finally:
        service.close()
    if runner.stop_requested:
        exit_after_stop()


@cli.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def queue_status(as_json: bool) -> None:
    """Queue depth by state (operator view, all accounts)."""
    service = open_service()
    depth = service.queue.depth()
    service.close()
    if as_json:
        print_json(depth)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("state", "requests")
    for state, count in depth.items():
        table.add_row(state, str(count))
    Console().print(table)


@cli.command()
def migrate() -> None:
    """Apply database migrations (serve and worker do this on start too), and say which."""
    from vodpush.persistence.db import current_revision

    settings = settings_or_fail()
    warn_about_environment(cli)
    service, applied = open_service_migrated(settings)
    try:
        shared = service.accounts.ensure_unique_usernames()
        at = current_revision(service.database())
    finally:
        service.close()
    if applied:
        click.echo(f"applied {', '.join(map(str, applied))}; database is at {at}")
    else:
        click.echo(f"database is up to date at {at}")
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
    settings = settings_or_fail()
    warn_about_environment(cli)
    print_json(settings.public_dict())


# -- accounts ----------------------------------------------------------------------------


cli.add_command(account)
cli.add_command(reap)
cli.add_command(request_group)
cli.add_command(secrets_group)
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
        return ExitCode.ERROR
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.exceptions.Exit as exc:
        return exc.exit_code
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
