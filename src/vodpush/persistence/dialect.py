"""Every difference between the databases, in one place: the rest of persistence asks
``for_engine(engine)`` (or ``for_url(url)``) and never tests a dialect name itself. A third
database is one more ``Dialect`` here plus its migrations.

SQLite: one file shared by the API and the worker threads (WAL), one writer at a time
(writes take the write lock up front, and this process's threads queue on a lock of ours).
PostgreSQL: many processes; claims skip rows another worker has locked, new requests are
announced with NOTIFY, and migrators serialise on an advisory lock.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    Connection,
    DateTime,
    Engine,
    Interval,
    Select,
    String,
    Table,
    and_,
    cast,
    create_engine,
    event,
    func,
    literal,
    text,
    type_coerce,
)
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import URL, make_url
from sqlalchemy.sql.elements import ColumnElement, UnaryExpression
from sqlalchemy.sql.operators import custom_op

from vodpush.core.filters import prefix_upper_bound
from vodpush.filemodes import create_private, restrict_to_owner

log = logging.getLogger(__name__)

# Workers LISTEN on this channel (PostgreSQL) to pick new requests up at once.
QUEUE_CHANNEL = "vodpush_queue"
# Any fixed number: serialises concurrent migrators on one PostgreSQL database.
_MIGRATION_LOCK_ID = 0x766F64707573


class Dialect:
    """What a database does its own way. The defaults are the plain SQL ones."""

    name = ""
    # A lone SELECT run by PreparedQuery on a raw DBAPI connection must be put in
    # autocommit by hand (else the driver opens a transaction the pool then rolls back).
    prepared_autocommit = False
    # Reads cost a fraction of a millisecond and never wait: the API may serve them on the
    # event loop instead of in a thread.
    inline_reads = False
    # Alembic must rebuild tables to alter them.
    migrations_render_as_batch = False
    # Execution options of a transaction that will write.
    write_options: dict[str, Any] = {}

    def make_engine(self, url: str, **kwargs: Any) -> Engine:
        return create_engine(url, **kwargs)

    def unavailable(self, error: BaseException) -> bool:
        """Whether ``error`` (SQLAlchemy's or the driver's) says the database could not
        answer for a reason that passes on its own: the connection was lost or refused, the
        server is restarting or shutting down, the transaction lost a serialization or
        deadlock race, the file is locked. The stores raise core.requests.StoreUnavailable
        for these; every other error (a bug, a constraint, bad SQL) stays what it is."""
        if isinstance(error, sa_exc.TimeoutError):
            return True  # no pooled connection came free in time: the pool is exhausted
        if isinstance(error, sa_exc.DBAPIError):
            # SQLAlchemy saw the connection die (it invalidates it, and the pool drops it).
            return error.connection_invalidated or self._passes(error.orig)
        return self._passes(error)

    def _passes(self, error: BaseException) -> bool:
        """``unavailable`` for an error of the driver itself."""
        return False

    def write_lock(self, engine: Engine) -> AbstractContextManager[Any]:
        """Held around every write transaction of this process."""
        return nullcontext()

    def skip_locked(self, pick: Select[Any]) -> Select[Any]:
        """The row-picking subquery of a claim: let concurrent claimers pass each other."""
        return pick

    def now(self, plus_seconds: float | ColumnElement[Any] = 0.0) -> ColumnElement[datetime]:
        """The database's own time (naive UTC, as the columns store it), ``plus_seconds``
        later: leases and due times are measured on this one clock, never a worker's.
        ``plus_seconds`` may be a bound parameter (a number of seconds), so that a statement
        with a varying delay is built once."""
        raise NotImplementedError(self.name)

    def for_update(self, read: Select[Any]) -> Select[Any]:
        """A read whose rows the transaction will then write: lock them."""
        return read.with_for_update()

    def lock_for_claim(self, read: Select[Any]) -> Select[Any] | None:
        """A read that locks its rows until the transaction ends, so that the statements
        after it see every change committed by an earlier holder of the lock (each statement
        reads a snapshot of its own): a claim serialises on its account's row this way. A
        weak lock (FOR NO KEY UPDATE): an INSERT whose foreign key names the row passes.
        None where a write transaction holds the whole database anyway."""
        return read.with_for_update(key_share=True)

    def least(self, *values: ColumnElement[Any]) -> ColumnElement[Any]:
        """The smallest of ``values`` that are not NULL; NULL when all are."""
        return func.least(*values)

    def upsert(
        self, table: Table, values: dict[str, Any], keys: list[Any], update: list[str]
    ) -> Any:
        """INSERT ``values``, or on a conflict of ``keys`` set the columns ``update``."""
        statement = self._insert(table).values(**values)
        return statement.on_conflict_do_update(
            index_elements=keys, set_={k: statement.excluded[k] for k in update}
        )

    def insert_new(
        self, table: Table, columns: list[str], rows: Select[Any], keys: list[Any]
    ) -> Any:
        """INSERT the ``rows`` selected into ``columns``, skipping any that conflict on
        ``keys`` (already there)."""
        return (
            self._insert(table)
            .from_select(columns, rows)
            .on_conflict_do_nothing(index_elements=keys)
        )

    def json_text(self, column: Any, key: str) -> ColumnElement[str]:
        """The text member ``key`` of a JSON document stored as text in ``column``."""
        raise NotImplementedError(self.name)

    def starts_with(self, column: Any, prefix: str) -> ColumnElement[bool]:
        """``column`` starts with ``prefix``, character for character and case-sensitive
        (see core.filters), in a form the column's index serves. Here a range of the
        column compared byte for byte (SQLite's BINARY collation, every text column's;
        SQLite's LIKE ignores case): the customer's ``%``, ``_`` and ``\\`` are plain
        characters, with nothing to escape."""
        upper = prefix_upper_bound(prefix)
        at_least = column >= prefix
        return at_least if upper is None else and_(at_least, column < upper)

    def unindexed(self, column: Any) -> ColumnElement[Any]:
        """``column`` as a condition names it when the condition must not choose the
        index (aws.status filters: see persistence.listing). A planner with
        statistics (PostgreSQL's) weighs the indexes itself."""
        return column  # type: ignore[no-any-return]

    def _insert(self, table: Table) -> Any:
        """The dialect's INSERT with ON CONFLICT (both spell the upsert alike)."""
        raise NotImplementedError(self.name)

    def notify_queued(self, conn: Connection) -> None:
        """In the enqueue transaction: tell listening workers (other processes) about it."""

    def notifications(self, engine: Engine) -> Any | None:
        """The wake-up channel workers listen on (core.ports.Notifications), or None."""
        return None

    @contextmanager
    def migration_lock(self, engine: Engine) -> Iterator[Connection | None]:
        """Serialise migrators; yields the connection to migrate on (None: any)."""
        yield None


_SQLITE_BUSY_TIMEOUT = 30.0  # seconds
_SQLITE_MAX_INTEGER = 2**63 - 1
# SQLITE_BUSY, SQLITE_LOCKED (primary result codes: "database is locked" and its kin).
_SQLITE_BUSY_CODES = (5, 6)
# PostgreSQL SQLSTATEs that pass: besides class 08 (connection exception).
_PG_PASSING = frozenset(
    {
        "40001",  # serialization_failure
        "40P01",  # deadlock_detected
        "53300",  # too_many_connections
        "57P01",  # admin_shutdown: pg_terminate_backend, a fast or smart shutdown
        "57P02",  # crash_shutdown: another backend crashed, the server restarts
        "57P03",  # cannot_connect_now: starting up or shutting down
    }
)


class _SQLite(Dialect):
    name = "sqlite"
    inline_reads = True
    migrations_render_as_batch = True
    # Read by the "begin" hook below: BEGIN IMMEDIATE.
    write_options: dict[str, Any] = {"sqlite_immediate": True}

    def __init__(self) -> None:
        # One lock per SQLite engine: its threads take turns at the write lock in this
        # process (an instant hand-over) instead of in SQLite's busy handler, which sleeps
        # up to 100 ms a try.
        self._write_locks: weakref.WeakKeyDictionary[Engine, threading.RLock] = (
            weakref.WeakKeyDictionary()
        )

    def make_engine(self, url: str, **kwargs: Any) -> Engine:
        """WAL and a busy timeout, so that the API and the worker threads share the file."""
        parsed = make_url(url)
        if parsed.database and parsed.database != ":memory:":
            _private_sqlite_file(Path(parsed.database).expanduser())
        # How long a write waits for another process's write lock before it fails as
        # "database is locked" (StoreUnavailable); ``?timeout=SECONDS`` in the URL sets it.
        busy = float(str(parsed.query.get("timeout", _SQLITE_BUSY_TIMEOUT)))
        engine = create_engine(
            url, connect_args={"check_same_thread": False, "timeout": busy}, **kwargs
        )

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            # Let SQLAlchemy, not pysqlite, decide when transactions begin.
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute(f"PRAGMA busy_timeout={int(busy * 1000)}")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Any) -> None:
            # A transaction that reads then writes takes the write lock up front (IMMEDIATE),
            # so two writers queue on the busy timeout instead of failing with "database is
            # locked" on lock upgrade. Readers stay DEFERRED and never wait under WAL.
            immediate = conn.get_execution_options().get("sqlite_immediate", False)
            conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

        self._write_locks[engine] = threading.RLock()
        return engine

    def write_lock(self, engine: Engine) -> AbstractContextManager[Any]:
        return self._write_locks.get(engine) or nullcontext()

    def _passes(self, error: BaseException) -> bool:
        # Another process (or connection) held the write lock past the busy timeout.
        if not isinstance(error, sqlite3.OperationalError):
            return False
        code = getattr(error, "sqlite_errorcode", None)
        if code is not None:
            return code & 0xFF in _SQLITE_BUSY_CODES
        return "locked" in str(error) or "busy" in str(error)

    def for_update(self, read: Select[Any]) -> Select[Any]:
        # A write transaction holds the database's write lock from its start (IMMEDIATE).
        return read

    def lock_for_claim(self, read: Select[Any]) -> Select[Any] | None:
        return None  # the write transaction has the database to itself

    def least(self, *values: ColumnElement[Any]) -> ColumnElement[Any]:
        # SQLite's min(a, b, ...) is NULL as soon as one value is: NULLs become the largest
        # integer first, and that integer NULL again at the end.
        top = literal(_SQLITE_MAX_INTEGER)
        return func.nullif(func.min(*(func.coalesce(v, top) for v in values)), top)

    def now(self, plus_seconds: float | ColumnElement[Any] = 0.0) -> ColumnElement[datetime]:
        # 'now' is UTC in SQLite, to the millisecond. SQLAlchemy stores a DateTime as text
        # with six decimals, and SQLite compares text: the same layout keeps comparisons
        # with stored times right and reads back as a datetime. '999': the end of the
        # millisecond, so a time stored by Python within it is due.
        if isinstance(plus_seconds, ColumnElement):
            modifier: Any = func.printf("%+.3f seconds", plus_seconds)
        else:
            modifier = f"{plus_seconds:+.3f} seconds"
        stamp = func.strftime("%Y-%m-%d %H:%M:%f", "now", modifier)
        return type_coerce(stamp.op("||")(literal("999")), DateTime)

    def json_text(self, column: Any, key: str) -> ColumnElement[str]:
        return func.json_extract(column, f"$.{key}", type_=String)

    def unindexed(self, column: Any) -> ColumnElement[Any]:
        # SQLite has no statistics (vodpush runs no ANALYZE) and weighs indexes by rules
        # of thumb: it takes `created_at > ?` for narrower than `state = ?`, and `id < ?`
        # for narrower than a path range. The unary "+" (a no-op on any value) keeps a term
        # off every index, so the index the filters call for serves the page.
        return UnaryExpression(column, operator=custom_op("+"), type_=column.type)

    def _insert(self, table: Table) -> Any:
        return sqlite_insert(table)


# libpq parameters of every connection, unless the URL gives its own (``?keepalives_idle=30``).
# A partition leaves TCP connections silent, not closed:
_PG_CONNECTION_DEFAULTS: dict[str, Any] = {
    # A server that does not answer a new connection fails it in seconds, not minutes.
    "connect_timeout": 10,
    # A client waiting for an answer sends nothing, so without keepalives it never finds
    # out that the server forgot the connection while the network was down (a restart, a
    # NAT or proxy timing it out: their reset was lost); it would wait forever, holding
    # its upload slot and, in the heartbeat thread, every lease of the worker. Probes after
    # 10 s of silence, 5 s apart, 3 unanswered: a dead connection is dropped within ~25 s.
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
}
# The server side: a client cut off inside a transaction never sends its COMMIT, and the
# transaction keeps the request's row locked; every claim skips a locked row, so no worker
# could take the request over when the lease runs out. Nothing here waits on anything but
# the database inside a transaction: one idle for 5 s (the shortest lease) is ended by the
# server, which releases its locks. Set with SET, not the startup ``options`` (PgBouncer
# refuses those); a URL with ``options`` of its own is left to them.
_IDLE_IN_TRANSACTION_MS = 5000


def _pg_connect_args(url: str | URL) -> dict[str, Any]:
    query = make_url(url).query
    return {k: v for k, v in _PG_CONNECTION_DEFAULTS.items() if k not in query}


class _PostgreSQL(Dialect):
    name = "postgresql"
    prepared_autocommit = True

    def make_engine(self, url: str, **kwargs: Any) -> Engine:
        kwargs.setdefault("pool_size", 10)
        kwargs.setdefault("max_overflow", 20)
        kwargs["connect_args"] = {**_pg_connect_args(url), **kwargs.get("connect_args", {})}
        # A pooled connection is checked before use: one killed while idle (a server
        # restart, pg_terminate_backend) is replaced instead of failing the next statement.
        engine = create_engine(url, pool_pre_ping=True, **kwargs)
        if "options" not in make_url(url).query:

            @event.listens_for(engine, "connect")
            def _idle_in_transaction_timeout(dbapi_conn: Any, _record: Any) -> None:
                with dbapi_conn.cursor() as cur:
                    cur.execute(
                        f"SET idle_in_transaction_session_timeout = {_IDLE_IN_TRANSACTION_MS}"
                    )
                dbapi_conn.commit()

        return engine

    def _passes(self, error: BaseException) -> bool:
        import psycopg

        if not isinstance(error, psycopg.Error):
            return False
        state = error.sqlstate
        if state is None:
            # Raised by the client, not the server: the connection failed, was lost or is
            # closed ("server closed the connection unexpectedly", "connection refused").
            return isinstance(error, psycopg.OperationalError | psycopg.InterfaceError)
        return state.startswith("08") or state in _PG_PASSING

    def skip_locked(self, pick: Select[Any]) -> Select[Any]:
        return pick.with_for_update(skip_locked=True)

    def now(self, plus_seconds: float | ColumnElement[Any] = 0.0) -> ColumnElement[datetime]:
        # now(): the transaction's start, the same for every statement in it.
        utc = func.timezone("UTC", func.now(), type_=DateTime)
        if isinstance(plus_seconds, ColumnElement):
            return utc + func.make_interval(0, 0, 0, 0, 0, 0, plus_seconds, type_=Interval)
        return utc + timedelta(seconds=plus_seconds) if plus_seconds else utc

    def json_text(self, column: Any, key: str) -> ColumnElement[str]:
        return func.json_extract_path_text(cast(column, JSON), key, type_=String)

    def starts_with(self, column: Any, prefix: str) -> ColumnElement[bool]:
        # LIKE: case-sensitive and character for character whatever the collation, and
        # the planner turns a pattern with a fixed prefix into a range of the index
        # ix_upload_requests_account_id_path (text_pattern_ops), estimating it from the
        # column's statistics (a range written by hand gets a blind default estimate, and
        # lost to the id index). The customer's %, _ and \ are escaped with the backslash,
        # PostgreSQL's default escape: no ESCAPE clause, which would hide the pattern from
        # the planner behind a function call.
        escaped = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        return column.like(escaped + "%")  # type: ignore[no-any-return]

    def _insert(self, table: Table) -> Any:
        return pg_insert(table)

    def notify_queued(self, conn: Connection) -> None:
        conn.execute(text(f"NOTIFY {QUEUE_CHANNEL}"))

    def notifications(self, engine: Engine) -> PostgresNotifications:
        return PostgresNotifications(engine)

    @contextmanager
    def migration_lock(self, engine: Engine) -> Iterator[Connection | None]:
        with engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": _MIGRATION_LOCK_ID})
            # The lock is the session's: commit at once, so that the migrator is not idle
            # in a transaction (and ended by the server) while alembic loads its scripts.
            conn.commit()
            try:
                yield conn
                conn.commit()
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _MIGRATION_LOCK_ID})
                conn.commit()


class PostgresNotifications:
    """core.ports.Notifications on LISTEN/NOTIFY; polling remains the fallback, so errors
    here only cost latency."""

    def __init__(self, engine: Engine) -> None:
        self._url = engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
        # The listening connection idles for good: keepalives find it dead after a partition.
        self._params = _pg_connect_args(engine.url)

    def listen(self, wake: Callable[[], None], stopping: threading.Event) -> None:
        import psycopg

        failures = 0
        while not stopping.is_set():
            try:
                with psycopg.connect(self._url, autocommit=True, **self._params) as conn:
                    conn.execute(f"LISTEN {QUEUE_CHANNEL}")
                    if failures:
                        log.info("LISTEN connection back", extra={"action": "worker.listen_ok"})
                    failures = 0
                    while not stopping.is_set():
                        for _ in conn.notifies(timeout=1.0, stop_after=1):
                            wake()
            except Exception as exc:
                failures += 1
                # Tried every 5 s: while the database is away, a line a minute is enough.
                if failures % 12 == 1:
                    log.warning(
                        "LISTEN connection lost: %s (%d failures in a row)",
                        type(exc).__name__,
                        failures,
                        extra={"action": "worker.listen_error", "failures": failures},
                    )
                stopping.wait(5)


def _private_sqlite_file(path: Path) -> None:
    """The database holds every account's encrypted secrets and every request: create it
    0600 before SQLite does (SQLite gives its -wal and -shm files the database file's mode),
    and restrict one that an older install left readable by others."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if create_private(path):
        return  # an empty file is a valid empty database
    for suffix in ("", "-wal", "-shm", "-journal"):
        restrict_to_owner(path.with_name(path.name + suffix), "database file")


SQLITE = _SQLite()
POSTGRESQL = _PostgreSQL()
_BY_NAME: dict[str, Dialect] = {d.name: d for d in (SQLITE, POSTGRESQL)}


def for_name(name: str) -> Dialect:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(f"unsupported database: {name}") from None


def for_engine(engine: Engine | Connection) -> Dialect:
    return for_name(engine.dialect.name)


def for_url(url: str) -> Dialect:
    return for_name(make_url(url).get_backend_name())
