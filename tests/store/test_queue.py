"""SQLite's transaction queue: urgent transactions (the scheduler's) go first, a cancelled
waiter never strands the lock, and reads run beside a writer but cannot write."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from airlock.store.db import Database
from tests.lifecycle_helpers import wait_for


@pytest_asyncio.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    database = Database(f"sqlite+aiosqlite:///{tmp_path / 'airlock.db'}")
    await database.migrate()
    try:
        yield database
    finally:
        await database.close()


async def test_urgent_transactions_jump_the_queue(db: Database) -> None:
    order: list[str] = []
    release = asyncio.Event()

    async def holder() -> None:
        async with db.transaction():
            order.append("holder")
            await release.wait()

    async def waiter(name: str, urgent: bool) -> None:
        async with db.transaction(urgent=urgent):
            order.append(name)

    first = asyncio.create_task(holder())
    await wait_for(lambda: order == ["holder"], interval=0.01)  # it holds the lock
    tasks = [asyncio.create_task(waiter(f"normal{i}", False)) for i in range(3)]
    await asyncio.sleep(0.01)
    tasks.append(asyncio.create_task(waiter("urgent", True)))
    await asyncio.sleep(0.01)
    release.set()
    await asyncio.gather(first, *tasks)
    assert order == ["holder", "urgent", "normal0", "normal1", "normal2"]


async def test_a_cancelled_waiter_does_not_strand_the_lock(db: Database) -> None:
    release = asyncio.Event()

    async def holder() -> None:
        async with db.transaction():
            await release.wait()

    first = asyncio.create_task(holder())
    await asyncio.sleep(0.05)
    gone = asyncio.create_task(db.transaction().__aenter__())
    await asyncio.sleep(0.01)
    gone.cancel()
    release.set()
    await first
    with pytest.raises(asyncio.CancelledError):
        await gone
    async with asyncio.timeout(5), db.transaction() as repo:  # the lock is free again
        assert await repo.ping() is None


async def test_reads_do_not_wait_for_the_writer_and_cannot_write(db: Database) -> None:
    release = asyncio.Event()
    holding = asyncio.Event()

    async def writer() -> None:
        async with db.transaction():
            holding.set()
            await release.wait()

    task = asyncio.create_task(writer())
    await holding.wait()
    try:
        async with asyncio.timeout(5), db.read() as repo:  # while the writer holds the queue
            assert await repo.tokens() == []
            with pytest.raises(OperationalError, match="readonly"):
                await repo.session.execute(text("DELETE FROM tokens"))
    finally:
        release.set()
        await task
