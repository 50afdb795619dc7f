"""The engine: SQLite (WAL) by default, PostgreSQL via asyncpg, schema through Alembic.

On SQLite, one process's transactions queue on an asyncio lock (SQLite has one writer
anyway) and start with ``BEGIN IMMEDIATE``, so another process (the CLI) waits on the busy
timeout instead of failing on a read-to-write upgrade. PostgreSQL uses its own row locks
(``FOR UPDATE SKIP LOCKED`` in ``repo``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import event
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from airlock.store.repo import Repo

MIGRATIONS = Path(__file__).parent / "migrations"


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.isolation_level = None  # we issue BEGIN ourselves
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _sqlite_begin(conn: Connection) -> None:
    conn.exec_driver_sql("BEGIN IMMEDIATE")


def make_engine(url: str) -> AsyncEngine:
    if url.startswith("sqlite"):
        path = url.split(":///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(url, connect_args={"timeout": 10})
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        event.listen(engine.sync_engine, "begin", _sqlite_begin)
        return engine
    return create_async_engine(url, pool_size=10, max_overflow=10, pool_pre_ping=True)


def _alembic_config(connection: Connection) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def _upgrade(connection: Connection) -> None:
    command.upgrade(_alembic_config(connection), "head")


class Database:
    """The engine plus a ``transaction()`` that hands out a ``Repo`` bound to one
    transaction: committed when the block ends, rolled back when it raises."""

    def __init__(self, url: str, *, node: str = "") -> None:
        self.url = url
        self.node = node
        self.engine = make_engine(url)
        self._sessions = async_sessionmaker(self.engine, expire_on_commit=False)
        self._serial = None if self.is_postgres else asyncio.Lock()

    @property
    def is_postgres(self) -> bool:
        return self.engine.dialect.name == "postgresql"

    async def migrate(self) -> None:
        """Bring the schema to the newest migration (idempotent)."""
        async with self.engine.begin() as conn:
            await conn.run_sync(_upgrade)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Repo]:
        if self._serial is None:
            async with self._sessions() as session, session.begin():
                yield Repo(session, postgres=True, node=self.node)
            return
        # SQLite has one writer at a time; queueing here, in FIFO order, beats many
        # connections spinning on the busy handler (and starving past its timeout).
        async with self._serial, self._sessions() as session, session.begin():
            yield Repo(session, postgres=False, node=self.node)

    async def ping(self) -> None:
        async with self.transaction() as repo:
            await repo.ping()

    async def close(self) -> None:
        await self.engine.dispose()


def new_session(db: Database) -> AsyncSession:
    return db._sessions()
