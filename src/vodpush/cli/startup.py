"""What a vodpush command checks before it works, and the exit code of each failure.

Exit codes of every vodpush command (`vodpush client` has its own, see client_cli):

    0  done (serve and worker: stopped by SIGTERM/SIGINT)
    1  an operation was refused or failed (``error: ...``)
    2  bad usage (click) or bad configuration (a VODPUSH_* value, the VODPUSH_CONFIG file)
    3  an address cannot be listened on (the API's or /metrics' port is in use...)
    4  the database cannot be used (URL, driver, server, migrations)
    5  a data directory cannot be written (the SQLite database's, the key file's)

Each failure is one line on stderr, ``error: ...``, never a traceback.
"""

from __future__ import annotations

import difflib
import logging
import os
import tempfile
from collections.abc import Iterable, Mapping
from enum import IntEnum
from pathlib import Path

import click
from sqlalchemy import Engine
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, make_url

from vodpush.config import ENV_PREFIX, Settings
from vodpush.core.requests import StoreUnavailable
from vodpush.logs import echo
from vodpush.persistence import db

log = logging.getLogger(__name__)


class ExitCode(IntEnum):
    OK = 0
    ERROR = 1
    USAGE = 2  # click's own code for a usage error; bad configuration shares it
    CANNOT_LISTEN = 3
    DATABASE = 4
    DATA_DIRECTORY = 5


class UserError(click.ClickException):
    """Shown as ``error: ...`` on stderr with exit code 1, no traceback."""

    exit_code = ExitCode.ERROR

    def format_message(self) -> str:
        return self.message

    def show(self, file: object = None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


class ConfigurationError(UserError):
    exit_code = ExitCode.USAGE


class CannotListenError(UserError):
    exit_code = ExitCode.CANNOT_LISTEN


class DatabaseUnusable(UserError):
    exit_code = ExitCode.DATABASE


class DirectoryUnwritable(UserError):
    exit_code = ExitCode.DATA_DIRECTORY


# -- data directories ---------------------------------------------------------------------


def check_directories(settings: Settings) -> None:
    """The directories vodpush writes to exist (made when missing, as a key file's always
    was) and take a new file: the SQLite database's (its -wal and -shm files live beside
    it) and, when the key must be generated, the key file's. DirectoryUnwritable if not."""
    database = sqlite_file(settings.database_url)
    if database is not None:
        _writable_directory(database.parent, "VODPUSH_DATABASE_URL")
        if database.exists() and not os.access(database, os.R_OK | os.W_OK):
            raise DirectoryUnwritable(
                f"the database file {database} cannot be written (VODPUSH_DATABASE_URL)"
            )
    key_file = Path(settings.secret_key_file)
    if settings.secret_key is None and not key_file.exists():
        _writable_directory(key_file.parent, "VODPUSH_SECRET_KEY_FILE, to generate the key")


def sqlite_file(url: str) -> Path | None:
    """The file of a SQLite URL (None: not SQLite, in memory, or not parseable)."""
    try:
        parsed = make_url(url)
    except (sa_exc.ArgumentError, ValueError):
        return None
    if parsed.get_backend_name() != "sqlite":
        return None
    database = parsed.database or ""
    if database in ("", ":memory:") or database.startswith("file:"):
        return None
    return Path(database)


def _writable_directory(directory: Path, why: str) -> None:
    directory = directory if str(directory) else Path(".")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        # Root passes every permission check: only creating a file tells (read-only mounts).
        with tempfile.TemporaryFile(dir=directory, prefix=".vodpush-probe-"):
            pass
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise DirectoryUnwritable(
            f"cannot write to the directory {directory} ({why}): {reason}"
        ) from exc


def warn_if_no_sestore(settings: Settings) -> None:
    """The sestore root is only read; a missing one refuses every upload, which is worth
    a line at start."""
    root = Path(settings.sestore_root)
    if not root.is_dir():
        log.warning(
            "the sestore root is not a directory: every aws.upload will be refused until it is",
            extra={"action": "config.no_sestore", "sestore_root": str(root)},
        )


# -- the database ---------------------------------------------------------------------------


def open_database(settings: Settings) -> tuple[Engine, list[db.Migration]]:
    """An engine on the database, migrated to the latest schema, and the migrations this
    applied. DatabaseUnusable (one line, no password) when the URL cannot be parsed, names
    a driver that is not here, or the server does not answer or refuses the migrations."""
    url = settings.database_url
    try:
        parsed = make_url(url)
    except (sa_exc.ArgumentError, ValueError) as exc:
        raise DatabaseUnusable(f"VODPUSH_DATABASE_URL cannot be parsed: {first_line(exc)}") from exc
    shown = _shown(parsed)
    try:
        engine = db.make_engine(url)
    except (sa_exc.ArgumentError, sa_exc.NoSuchModuleError, ImportError, ValueError) as exc:
        raise DatabaseUnusable(
            f"VODPUSH_DATABASE_URL {shown}: cannot use the driver {parsed.drivername!r} "
            f"({first_line(exc)}); use sqlite:///PATH or postgresql+psycopg://..."
        ) from exc
    try:
        applied = db.upgrade(engine)
    except (sa_exc.SQLAlchemyError, StoreUnavailable, OSError, ImportError) as exc:
        engine.dispose()
        raise DatabaseUnusable(f"cannot use the database {shown}: {first_line(exc)}") from exc
    if applied:
        log.info(
            f"database migrated: applied {', '.join(map(str, applied))}",
            extra={"action": "db.migrated", "applied": [m.revision for m in applied]},
        )
    return engine, applied


def _shown(url: URL) -> str:
    return url.render_as_string(hide_password=True)


def first_line(exc: BaseException) -> str:
    """The first line of the driver's own message (SQLAlchemy adds lines of its own)."""
    cause = getattr(exc, "orig", None) or exc
    lines = str(cause).strip().splitlines()
    text = lines[0].strip() if lines else type(cause).__name__
    return str(echo(text, 300))


# -- the environment ------------------------------------------------------------------------


def unknown_variables(
    environ: Mapping[str, str], known: Iterable[str]
) -> list[tuple[str, str | None]]:
    """(name, closest known name or None) for each VODPUSH_* variable that nothing reads.
    Names are compared in capitals, as the settings read them, and without the prefix
    every one shares (it would make any two names look alike)."""
    by_suffix = {name.upper().removeprefix(ENV_PREFIX): name.upper() for name in known}
    unknown = []
    for name in sorted(environ):
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX) or upper in by_suffix.values():
            continue
        suffix = upper.removeprefix(ENV_PREFIX)
        close = difflib.get_close_matches(suffix, sorted(by_suffix), n=1, cutoff=0.6)
        unknown.append((name, by_suffix[close[0]] if close else None))
    return unknown


def option_variables(root: click.Command) -> set[str]:
    """The variables the options of ``root`` and its subcommands read (``vodpush client``'s
    VODPUSH_URL..., the S3 secret of ``account set-s3``...)."""
    names: set[str] = set()
    commands = [root]
    while commands:
        command = commands.pop()
        if isinstance(command, click.Group):
            commands.extend(command.commands.values())
        for param in command.params:
            envvar = getattr(param, "envvar", None)
            if isinstance(envvar, str):
                names.add(envvar)
            elif envvar:
                names.update(envvar)
    return names


def warn_unknown_variables(environ: Mapping[str, str], known: Iterable[str]) -> None:
    """A warning line for each misspelt or unknown VODPUSH_* variable (names only: values
    may be secrets)."""
    for name, close in unknown_variables(environ, known):
        hint = f"; did you mean {close}?" if close else ""
        log.warning(
            f"unknown environment variable {echo(name, 100)}: no setting reads it{hint}",
            extra={
                "action": "config.unknown_variable",
                "variable": echo(name, 100),
                "closest": close,
            },
        )
