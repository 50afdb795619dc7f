"""The engine: SQLite (WAL) by default, PostgreSQL via asyncpg, schema through Alembic.

On SQLite, one process's transactions queue on an asyncio lock (SQLite has one writer
anyway) and start with ``BEGIN IMMEDIATE``, so another process (the CLI) waits on the busy
timeout instead of failing on a read-to-write upgrade. The queue has two lanes: ``urgent``
transactions (the scheduler's, which destroy VMs on time) go before the rest. ``read()``
transactions skip the queue altogether: WAL readers run beside the writer, on connections
that refuse to write (``PRAGMA query_only``). PostgreSQL uses its own row locks
(``FOR UPDATE SKIP LOCKED`` in ``repo``).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import event, text
from sqlalchemy import exc as sa_exc
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


def _sqlite_reader_pragmas(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.execute("PRAGMA query_only=ON")  # a write here is a bug: fail loudly
    cursor.close()


def _sqlite_begin_deferred(conn: Connection) -> None:
    conn.exec_driver_sql("BEGIN")  # a WAL snapshot at the first read; takes no write lock


def _sqlite_path(url: str) -> str:
    return url.split(":///", 1)[-1]


def database_unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` says the database cannot answer right now (the pool ran dry, the
    server refused or cut the connection, SQLite's file is locked or broken), as opposed to
    a query that is wrong: the first is worth a retry, the second is a bug."""
    if isinstance(exc, sa_exc.TimeoutError):  # the pool's limit, waited for in vain
        return True
    wrong = (sa_exc.IntegrityError, sa_exc.ProgrammingError, sa_exc.DataError)
    return isinstance(exc, sa_exc.DBAPIError) and not isinstance(exc, wrong)


def make_engine(url: str) -> AsyncEngine:
    if url.startswith("sqlite"):
        path = _sqlite_path(url)
        if path and path != ":memory:":
            _private_file(Path(path))
        engine = create_async_engine(url, connect_args={"timeout": 10})
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        event.listen(engine.sync_engine, "begin", _sqlite_begin)
        return engine
    return create_async_engine(url, pool_size=10, max_overflow=10, pool_pre_ping=True)


def _private_file(path: Path) -> None:
    """The database holds hashed tokens, sealed credentials and every user's history: its
    folder is created 0700 and the file 0600 before SQLite opens it (SQLite gives its
    ``-wal`` and ``-shm`` files the database file's mode). An existing file made with a
    looser mode by an older version is tightened."""
    if not path.parent.exists():
        path.parent.mkdir(parents=True, mode=0o700)
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
    for each in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        with contextlib.suppress(FileNotFoundError):
            if each.stat().st_mode & 0o077:
                each.chmod(0o600)


def make_reader_engine(url: str) -> AsyncEngine:
    """SQLite only: connections for ``Database.read()``."""
    engine = create_async_engine(url, connect_args={"timeout": 10})
    event.listen(engine.sync_engine, "connect", _sqlite_reader_pragmas)
    event.listen(engine.sync_engine, "begin", _sqlite_begin_deferred)
    return engine


class _Lanes:
    """A lock with two FIFO queues: an urgent waiter is served before any normal one.

    Why not ``asyncio.Lock``: when ten sessions start at once, the scheduler's claim of a
    due VM would wait behind every one of their transactions, and the VM would be destroyed
    late by that much (measured: claim waits p90 1.1 s at ten sessions at a time).
    """

    def __init__(self) -> None:
        self._held = False
        self._waiting: tuple[deque[asyncio.Future[None]], deque[asyncio.Future[None]]] = (
            deque(),
            deque(),
        )

    @asynccontextmanager
    async def hold(self, *, urgent: bool) -> AsyncIterator[None]:
        if self._held or any(self._waiting):
            turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiting[0 if urgent else 1].append(turn)
            try:
                await turn
            except asyncio.CancelledError:
                if turn.done() and not turn.cancelled():
                    self._release()  # handed the lock just as we were cancelled: pass it on
                raise
        self._held = True
        try:
            yield
        finally:
            self._release()

    def _release(self) -> None:
        for lane in self._waiting:
            while lane:
                turn = lane.popleft()
                if not turn.done():  # a cancelled waiter's future is done: skip it
                    turn.set_result(None)  # the lock passes straight to it: stays held
                    return
        self._held = False


def _alembic_config(connection: Connection) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


# Any constant of our own: the advisory lock every controller's migration takes.
MIGRATION_LOCK_KEY = 0x4149524C4F434B  # "AIRLOCK"


@asynccontextmanager
async def _sqlite_migration_lock(url: str) -> AsyncIterator[None]:
    path = _sqlite_path(url) if url.startswith("sqlite") else ""
    if path in ("", ":memory:"):
        yield
        return
    lock_path = Path(path).with_name(Path(path).name + ".migrate-lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        await asyncio.to_thread(fcntl.flock, fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


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
        self._serial = None if self.is_postgres else _Lanes()
        self._reader: AsyncEngine | None = None  # SQLite on a file only
        if self._serial is not None and _sqlite_path(url) not in ("", ":memory:"):
            self._reader = make_reader_engine(url)

    @property
    def is_postgres(self) -> bool:
        return self.engine.dialect.name == "postgresql"

    async def migrate(self) -> None:
        """Bring the schema to the newest migration (idempotent), once however many
        controllers start at the same moment: on PostgreSQL under an advisory lock held by
        the migrating transaction (without it, two controllers on an empty database both
        created ``alembic_version`` and the second crashed), on a SQLite file under a lock
        on a file beside it (the busy timeout alone gave up while others migrated)."""
        async with _sqlite_migration_lock(self.url), self.engine.begin() as conn:
            if self.is_postgres:
                await conn.execute(
                    text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY}
                )
            await conn.run_sync(_upgrade)

    @asynccontextmanager
    async def transaction(self, *, urgent: bool = False) -> AsyncIterator[Repo]:
        if self._serial is None:
            async with self._sessions() as session, session.begin():
                yield Repo(session, postgres=True, node=self.node)
            return
        # SQLite has one writer at a time; queueing here, in FIFO order, beats many
        # connections spinning on the busy handler (and starving past its timeout).
        async with (
            self._serial.hold(urgent=urgent),
            self._sessions() as session,
            session.begin(),
        ):
            yield Repo(session, postgres=False, node=self.node)

    @asynccontextmanager
    async def read(self) -> AsyncIterator[Repo]:
        """A transaction that only reads. On SQLite it does not queue behind writers;
        a write in it fails (``query_only``)."""
        if self._reader is None:
            async with self.transaction() as repo:
                yield repo
            return
        async with AsyncSession(self._reader, expire_on_commit=False) as session, session.begin():
            yield Repo(session, postgres=False, node=self.node)

    async def ping(self) -> None:
        async with self.transaction() as repo:
            await repo.ping()

    async def close(self) -> None:
        await self.engine.dispose()
        if self._reader is not None:
            await self._reader.dispose()


def new_session(db: Database) -> AsyncSession:
    return db._sessions()
