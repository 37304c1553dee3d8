"""Engine creation for SQLite and PostgreSQL, and applying migrations on start."""

from __future__ import annotations

import logging
from collections import namedtuple
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext, MigrationInfo
from sqlalchemy import Connection, Engine, Select

from vodpush.core.requests import StoreUnavailable
from vodpush.persistence import dialect

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).parent / "migrations"


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An engine tuned for the backend (see persistence.dialect)."""
    return dialect.for_url(url).make_engine(url, **kwargs)


def unavailable(engine: Engine, error: BaseException) -> StoreUnavailable | None:
    """The StoreUnavailable that ``error`` amounts to (see Dialect.unavailable), or None."""
    if not dialect.for_engine(engine).unavailable(error):
        return None
    cause = getattr(error, "orig", None) or error
    # The driver's first line ("terminating connection due to administrator command",
    # "database is locked"): for the operator's log, never shown to a customer.
    first = (str(cause).strip().splitlines() or [""])[0]
    return StoreUnavailable(f"database unavailable: {type(cause).__name__}: {first}")


@contextmanager
def _translated(engine: Engine) -> Iterator[None]:
    try:
        yield
    except Exception as error:
        translated = unavailable(engine, error)
        if translated is None:
            raise
        raise translated from error


@contextmanager
def write_transaction(engine: Engine) -> Iterator[Connection]:
    """A transaction that will write: on SQLite it holds the write lock from its start.
    Errors that pass (a lost connection, SQLite busy...) leave as StoreUnavailable."""
    db = dialect.for_engine(engine)
    with _translated(engine), db.write_lock(engine), engine.connect() as conn:
        conn = conn.execution_options(**db.write_options)
        with conn.begin():
            yield conn


@contextmanager
def read(engine: Engine) -> Iterator[Connection]:
    """A connection for reads; errors that pass leave as StoreUnavailable."""
    with _translated(engine), engine.connect() as conn:
        yield conn


class PreparedQuery:
    """A Core SELECT compiled once for the engine's dialect and run on a pooled DBAPI cursor.

    Every API call runs two reads (the account, then its requests); SQLAlchemy's per-call
    execution machinery costs more than the queries themselves, so the hot paths skip it.
    Values come back as the driver gives them (SQLite: datetimes as ISO text).
    """

    def __init__(self, engine: Engine, statement: Select[Any]) -> None:
        compiled = statement.compile(dialect=engine.dialect)
        self._engine = engine
        self._sql = str(compiled)
        # qmark (SQLite) wants a sequence in order; pyformat (psycopg) a mapping.
        self._order = compiled.positiontup
        # SQLite connections here are in autocommit already (SQLAlchemy emits BEGIN itself).
        self._autocommit = dialect.for_engine(engine).prepared_autocommit
        self.row = namedtuple("Row", [c.key for c in statement.selected_columns])  # type: ignore[misc]

    def all(self, **params: Any) -> list[Any]:
        try:
            rows = self._run(params)
        except Exception as error:
            translated = unavailable(self._engine, error)
            if translated is None:
                raise
            raise translated from error
        make = self.row._make
        return [make(row) for row in rows]

    def _run(self, params: dict[str, Any]) -> list[Any]:
        args: Any = [params[name] for name in self._order] if self._order else params
        conn = self._engine.raw_connection()
        try:
            if self._autocommit:
                # A lone SELECT needs no transaction: without one, psycopg sends no BEGIN and
                # the pool no ROLLBACK on return, two round trips of the three (a third of
                # an aws.status call on PostgreSQL).
                conn.driver_connection.autocommit = True  # type: ignore[union-attr]
            try:
                cursor = conn.cursor()
                cursor.execute(self._sql, args)
                rows = cursor.fetchall()
                cursor.close()
            finally:
                if self._autocommit:
                    conn.driver_connection.autocommit = False  # type: ignore[union-attr]
        except Exception as error:
            if dialect.for_engine(self._engine).unavailable(error):
                # Dead or unusable: the pool must not hand it out again (its reset on
                # return would fail too, and log that).
                conn.invalidate(error)
            raise
        finally:
            conn.close()
        return rows

    def first(self, **params: Any) -> Any | None:
        rows = self.all(**params)
        return rows[0] if rows else None


def alembic_config(engine: Engine) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["engine"] = engine
    return cfg


@dataclass(frozen=True)
class Migration:
    revision: str  # "0005"
    title: str  # "control": the first words of the migration's docstring

    def __str__(self) -> str:
        return f"{self.revision} {self.title}".strip()


def upgrade(engine: Engine, revision: str = "head") -> list[Migration]:
    """Bring the schema to ``revision``; safe to call from many processes at once. Returns
    the migrations this call applied, in order (none: the schema was there already)."""
    cfg = alembic_config(engine)
    applied: list[Migration] = []

    def note(*, step: MigrationInfo, **_: Any) -> None:
        if step.is_upgrade:
            doc = (step.up_revision.doc or "").strip().splitlines()
            title = doc[0].split(":")[0].strip() if doc else ""
            applied.append(Migration(step.up_revision_id or "", title))

    cfg.attributes["on_version_apply"] = (note,)
    with dialect.for_engine(engine).migration_lock(engine) as conn:
        if conn is not None:
            cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)
    return applied


def current_revision(engine: Engine) -> str | None:
    """The schema revision the database is at (None: no schema yet)."""
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()
