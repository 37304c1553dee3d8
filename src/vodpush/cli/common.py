"""What every ``vodpush`` subcommand shares: settings, the service, user errors, JSON output."""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import sys
import threading
from collections.abc import Callable
from functools import wraps
from typing import Any, NoReturn

import click
from pydantic import ValidationError

from vodpush import logs
from vodpush.cli.startup import (
    ConfigurationError,
    DatabaseUnusable,
    UserError,
    check_directories,
    open_database,
    option_variables,
    warn_unknown_variables,
)
from vodpush.config import Settings, load_settings, setting_variables
from vodpush.core.accounts import AccountError
from vodpush.operations import Refused
from vodpush.persistence.db import Migration
from vodpush.service import Service


def settings_or_fail() -> Settings:
    """The settings; ConfigurationError (exit 2) naming each bad value, or DatabaseUnusable
    (exit 4) when the database URL is all that is wrong."""
    try:
        return load_settings()
    except ValidationError as exc:
        errors = exc.errors()
        problems = "; ".join(
            f"VODPUSH_{'_'.join(str(p) for p in err['loc']).upper()}: {err['msg']}"
            for err in errors
        )
        if all(tuple(err["loc"])[:1] == ("database_url",) for err in errors):
            raise DatabaseUnusable(f"bad configuration: {problems}") from exc
        raise ConfigurationError(f"bad configuration: {problems}") from exc
    except FileNotFoundError as exc:
        raise ConfigurationError(str(exc)) from exc


def open_service(settings: Settings | None = None) -> Service:
    """The service on the configured database, after the checks every command makes: the
    data directories (exit 5), the database and its migrations (exit 4)."""
    service, _ = open_service_migrated(settings)
    return service


def open_service_migrated(settings: Settings | None = None) -> tuple[Service, list[Migration]]:
    """open_service, and the migrations it applied."""
    settings = settings or settings_or_fail()
    check_directories(settings)
    engine, applied = open_database(settings)
    try:
        return Service.open(settings, engine=engine, migrate=False), applied
    except ValueError as exc:
        engine.dispose()
        raise UserError(str(exc)) from exc


def start_logging(settings: Settings, commands: click.Command) -> None:
    """Logs as configured, then warn_about_environment."""
    logs.configure(settings.log_level, settings.log_format)
    warn_about_environment(commands)


def warn_about_environment(commands: click.Command) -> None:
    """A warning line for each VODPUSH_* variable that neither the settings nor an option
    of ``commands`` (the vodpush command) reads. Through the log: where the command did not
    configure it, the standard library writes the bare message on stderr."""
    warn_unknown_variables(os.environ, setting_variables() | option_variables(commands))


def user_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn the library's user-facing errors into clean CLI errors."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (AccountError, Refused) as exc:
            raise UserError(str(exc)) from exc

    return wrapper


def exit_after_stop() -> NoReturn:
    """Exit (code 0) at once after a signal stopped the service and it closed its stores,
    without the interpreter's teardown: that teardown does nothing a stopped worker needs,
    takes seconds on a busy host (boto3's loaded models are garbage-collected; 2-3 s at a
    load of 15 on 2 cores) when shutdown has a bound to keep, and can abort when a thread
    left in an S3 call or a callback (its request handed back) writes a log line then."""
    logging.shutdown()  # flush the log handlers: nothing written so far is lost
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def stop_on_signals(stop: Callable[[], None]) -> None:
    """SIGTERM and SIGINT call ``stop`` from a thread of its own. A Python signal handler
    runs on the main thread between two bytecodes, possibly inside a lock that thread holds
    (the worker loop's Event, whose lock is not reentrant): calling ``stop`` there could wait
    on that lock forever. The handler only puts the signal on a SimpleQueue, whose put is
    reentrant and safe in a signal handler."""
    signals: queue.SimpleQueue[int] = queue.SimpleQueue()

    def relay() -> None:
        while True:
            signals.get()
            stop()

    threading.Thread(target=relay, name="signals", daemon=True).start()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda number, _frame: signals.put_nowait(number))


def print_json(obj: Any) -> None:
    """One line of JSON (for jq and scripts; the table views are the human ones)."""
    click.echo(json.dumps(obj, ensure_ascii=False))
