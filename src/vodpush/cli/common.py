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

from vodpush.config import Settings, load_settings
from vodpush.core.accounts import AccountError
from vodpush.operations import Refused
from vodpush.service import Service


class UserError(click.ClickException):
    """Shown as ``error: ...`` on stderr with exit code 1, no traceback."""

    def format_message(self) -> str:
        return self.message

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


def settings_or_fail() -> Settings:
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


def open_service() -> Service:
    try:
        return Service.open(settings_or_fail())
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
