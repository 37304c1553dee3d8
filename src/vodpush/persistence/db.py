"""Engine creation for SQLite and PostgreSQL, and applying migrations on start."""

from __future__ import annotations

import logging
import threading
import weakref
from collections import namedtuple
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, Engine, Select, create_engine, event, text
from sqlalchemy.engine import make_url

from vodpush.filemodes import create_private, restrict_to_owner

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
# Any fixed number: serialises concurrent migrators on one PostgreSQL database.
_MIGRATION_LOCK_ID = 0x766F64707573
# One lock per SQLite engine: its threads take turns at the write lock in this process
# (an instant hand-over) instead of in SQLite's busy handler, which sleeps up to 100 ms a try.
_SQLITE_WRITE_LOCKS: weakref.WeakKeyDictionary[Engine, threading.RLock] = (
    weakref.WeakKeyDictionary()
)


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An engine tuned for the backend: WAL and a busy timeout on SQLite so that the API and
    the worker threads can share the file."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            _private_sqlite_file(Path(parsed.database).expanduser())
        engine = create_engine(
            url, connect_args={"check_same_thread": False, "timeout": 30}, **kwargs
        )

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            # Let SQLAlchemy, not pysqlite, decide when transactions begin.
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Any) -> None:
            # A transaction that reads then writes takes the write lock up front (IMMEDIATE),
            # so two writers queue on the busy timeout instead of failing with "database is
            # locked" on lock upgrade. Readers stay DEFERRED and never wait under WAL.
            immediate = conn.get_execution_options().get("sqlite_immediate", False)
            conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

        _SQLITE_WRITE_LOCKS[engine] = threading.RLock()
        return engine
    kwargs.setdefault("pool_size", 10)
    kwargs.setdefault("max_overflow", 20)
    return create_engine(url, pool_pre_ping=True, **kwargs)


def _private_sqlite_file(path: Path) -> None:
    """The database holds every account's encrypted secrets and every request: create it
    0600 before SQLite does (SQLite gives its -wal and -shm files the database file's mode),
    and restrict one that an older install left readable by others."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if create_private(path):
        return  # an empty file is a valid empty database
    for suffix in ("", "-wal", "-shm", "-journal"):
        restrict_to_owner(path.with_name(path.name + suffix), "database file")


@contextmanager
def write_transaction(engine: Engine) -> Iterator[Connection]:
    """A transaction that will write: on SQLite it holds the write lock from its start."""
    with _SQLITE_WRITE_LOCKS.get(engine) or nullcontext(), engine.connect() as conn:
        conn = conn.execution_options(sqlite_immediate=True)
        with conn.begin():
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
        self._autocommit = engine.dialect.name == "postgresql"
        self.row = namedtuple("Row", [c.key for c in statement.selected_columns])  # type: ignore[misc]

    def all(self, **params: Any) -> list[Any]:
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
        finally:
            conn.close()
        make = self.row._make
        return [make(row) for row in rows]

    def first(self, **params: Any) -> Any | None:
        rows = self.all(**params)
        return rows[0] if rows else None


def alembic_config(engine: Engine) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["engine"] = engine
    return cfg


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Bring the schema to ``revision``; safe to call from many processes at once."""
    cfg = alembic_config(engine)
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": _MIGRATION_LOCK_ID})
            try:
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, revision)
                conn.commit()
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _MIGRATION_LOCK_ID})
                conn.commit()
    else:
        command.upgrade(cfg, revision)
