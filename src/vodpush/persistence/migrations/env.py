"""Alembic environment: the engine (or connection) is handed in by vodpush.persistence.db."""

from __future__ import annotations

from alembic import context

from vodpush.persistence import dialect
from vodpush.persistence.models import Base

config = context.config
target_metadata = Base.metadata
# vodpush.persistence.db.upgrade collects the migrations applied (on_version_apply).
on_version_apply = config.attributes.get("on_version_apply", ())


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            on_version_apply=on_version_apply,
        )
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = config.attributes["engine"]
    with engine.connect() as conn:
        context.configure(
            connection=conn,
            target_metadata=target_metadata,
            render_as_batch=dialect.for_engine(conn).migrations_render_as_batch,
            on_version_apply=on_version_apply,
        )
        with context.begin_transaction():
            context.run_migrations()
        conn.commit()


run_migrations_online()
