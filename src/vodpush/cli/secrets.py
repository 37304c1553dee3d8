"""``vodpush secrets``: the keys of the secrets stored in the database (operator)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import click

from vodpush.cli.common import UserError, open_service, print_json, settings_or_fail


@click.group("secrets")
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

    settings = settings_or_fail()
    service = open_service()
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
    print_json(shown)


@secrets_group.command("status")
def secrets_status() -> None:
    """Where the keys come from, and how many stored secrets each key decrypts."""
    from vodpush.persistence.rotation import count_by_key

    settings = settings_or_fail()
    service = open_service()
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
    print_json({**shown, "keys": keys, "undecryptable": counts.get(None, 0)})
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
