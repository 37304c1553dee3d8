"""PostgreSQL databases for tests: each test gets one of its own, migrated, empty, under a
name no test had before (the `pg_url` fixture).

Copying the migrated template is quick (CREATE DATABASE ... TEMPLATE, some 50 ms), but
DROP DATABASE waits for a checkpoint: 0.5 to 2 s on a busy machine, for each of some 300
tests. So a used database is recycled instead, on a thread of its own while the next test
runs: new connections are refused, the open ones cut, it is renamed (a process the test left
behind cannot find it again), emptied (its sequences restarted), and compared with the
template: a database whose schema, settings or version a test changed is dropped instead.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
import uuid

from psycopg import errors as pg_errors
from sqlalchemy import Connection, Engine, create_engine, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.pool import NullPool

# What a test could change about a database besides its rows; recycled only if unchanged.
_SCHEMA = """
SELECT 'column', concat_ws(' ', table_name, column_name, data_type, is_nullable,
                           column_default, character_maximum_length)
  FROM information_schema.columns WHERE table_schema NOT IN ('pg_catalog', 'information_schema')
UNION ALL SELECT 'index', indexdef::text FROM pg_indexes
  WHERE schemaname NOT IN ('pg_catalog', 'information_schema')
UNION ALL SELECT 'constraint', concat_ws(' ', conrelid::regclass, pg_get_constraintdef(oid))
  FROM pg_constraint WHERE connamespace = 'public'::regnamespace
UNION ALL SELECT 'schema', nspname::text FROM pg_namespace WHERE nspname NOT LIKE 'pg_%temp_%'
UNION ALL SELECT 'relation', concat_ws(' ', relkind, oid::regclass)
  FROM pg_class WHERE relnamespace = 'public'::regnamespace
UNION ALL SELECT 'function', oid::regprocedure::text FROM pg_proc
  WHERE pronamespace = 'public'::regnamespace
UNION ALL SELECT 'trigger', tgname::text FROM pg_trigger WHERE NOT tgisinternal
UNION ALL SELECT 'extension', extname::text FROM pg_extension
UNION ALL SELECT 'setting', array_to_string(setconfig, ',') FROM pg_db_role_setting
  WHERE setdatabase = (SELECT oid FROM pg_database WHERE datname = current_database())
UNION ALL SELECT 'version', version_num::text FROM alembic_version
ORDER BY 1, 2
"""


def _new_name() -> str:
    return f"vodpush_t_{uuid.uuid4().hex[:12]}"


class Databases:
    """Test databases copied from ``template`` on the server of ``admin_url``."""

    def __init__(self, admin_url: str, template: str) -> None:
        self._admin: Engine = create_engine(admin_url, isolation_level="AUTOCOMMIT")
        self._server = admin_url.rsplit("/", 1)[0]
        self._template = template
        self._lock = threading.Lock()
        self._made: set[str] = set()  # every database of ours that exists, for close()
        self._ready: queue.Queue[str] = queue.Queue()
        self._used: queue.Queue[str | None] = queue.Queue()
        self._schema = self._read_schema(template)
        self._thread = threading.Thread(target=self._recycle_all, name="pg-recycler", daemon=True)
        self._thread.start()

    def url(self, name: str) -> str:
        return f"{self._server}/{name}"

    def take(self) -> str:
        """A database no test has used under this name: recycled, or a new copy."""
        try:
            return self._ready.get_nowait()
        except queue.Empty:
            pass
        name = _new_name()
        with self._admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}" TEMPLATE "{self._template}"'))
        with self._lock:
            self._made.add(name)
        return name

    def give_back(self, name: str) -> None:
        """The test is done with ``name``; it is recycled (or dropped) in the background."""
        self._used.put(name)

    def close(self) -> None:
        self._used.put(None)
        self._thread.join()
        with self._lock:
            names, self._made = sorted(self._made), set()
        for name in names:
            self._drop(name)
        self._admin.dispose()

    # -- the recycler thread ----------------------------------------------------------------

    def _recycle_all(self) -> None:
        while (name := self._used.get()) is not None:
            fresh = None
            with contextlib.suppress(Exception):
                fresh = self._recycle(name)
            if fresh is not None:
                self._ready.put(fresh)

    def _recycle(self, name: str) -> str | None:
        """``name`` emptied under a new name; None when it was dropped instead."""
        new = _new_name()
        with self._admin.connect() as conn:
            conn.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false'))
            if not self._rename(conn, name, new):
                self._drop(name)
                return None
            with self._lock:
                self._made.discard(name)
                self._made.add(new)
            conn.execute(text(f'ALTER DATABASE "{new}" ALLOW_CONNECTIONS true'))
        engine = create_engine(self.url(new), poolclass=NullPool)
        try:
            with engine.begin() as conn:
                if self._schema_of(conn) != self._schema:
                    raise RuntimeError("the test changed the database")
                self._empty(conn)
        except Exception:
            engine.dispose()
            self._drop(new)
            return None
        engine.dispose()
        return new

    @staticmethod
    def _rename(conn: Connection, name: str, new: str) -> bool:
        """Cut every connection to ``name`` and rename it; a backend being cut may linger a
        moment, so the rename is tried for a while."""
        deadline = time.monotonic() + 10
        while True:
            conn.execute(
                text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :d"),
                {"d": name},
            )
            try:
                conn.execute(text(f'ALTER DATABASE "{name}" RENAME TO "{new}"'))
                return True
            except sa_exc.DBAPIError as exc:
                if not isinstance(exc.orig, pg_errors.ObjectInUse):
                    raise
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)

    @staticmethod
    def _empty(conn: Connection) -> None:
        tables = (
            conn.execute(text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'"))
            .scalars()
            .all()
        )
        sequences = (
            conn.execute(text("SELECT sequencename FROM pg_sequences WHERE schemaname = 'public'"))
            .scalars()
            .all()
        )
        # No foreign key checks while every table is emptied (in any order).
        conn.execute(text("SET LOCAL session_replication_role = replica"))
        for table in tables:
            if table != "alembic_version":
                conn.execute(text(f'DELETE FROM "{table}"'))
        for sequence in sequences:
            conn.execute(text(f'ALTER SEQUENCE "{sequence}" RESTART'))

    def _read_schema(self, name: str) -> list[tuple[str, str]]:
        engine = create_engine(self.url(name), poolclass=NullPool)
        try:
            with engine.connect() as conn:
                return self._schema_of(conn)
        finally:
            engine.dispose()

    @staticmethod
    def _schema_of(conn: Connection) -> list[tuple[str, str]]:
        return [(kind, str(what)) for kind, what in conn.execute(text(_SCHEMA))]

    def _drop(self, name: str) -> None:
        with contextlib.suppress(Exception), self._admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        with self._lock:
            self._made.discard(name)
