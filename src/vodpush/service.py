"""Wiring: the settings, the database and the stores a process needs, built once."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Engine

from vodpush.config import Settings
from vodpush.crypto import SecretBox, load_secret_box
from vodpush.persistence import db
from vodpush.persistence.accounts import AccountStore
from vodpush.persistence.queue import QueueStore
from vodpush.persistence.requests import RequestStore


@dataclass
class Service:
    settings: Settings
    engine: Engine
    box: SecretBox
    accounts: AccountStore
    requests: RequestStore
    queue: QueueStore

    @classmethod
    def open(cls, settings: Settings, *, migrate: bool = True) -> Service:
        engine = db.make_engine(settings.database_url)
        if migrate:
            db.upgrade(engine)
        box = load_secret_box(settings)
        return cls(
            settings=settings,
            engine=engine,
            box=box,
            accounts=AccountStore(engine, box),
            requests=RequestStore(engine),
            queue=QueueStore(engine),
        )

    def close(self) -> None:
        self.engine.dispose()
