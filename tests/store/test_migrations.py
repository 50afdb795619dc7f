"""Migrations when many controllers start at the same moment (a DaemonSet's rolling start):
each is a process of its own on one database, empty or old, and every one must come up."""

from __future__ import annotations

import subprocess
import sys
import time

from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from airlock.store.db import Database

CONTROLLERS = 6
# Each process imports everything, then waits for the same instant to migrate: the race a
# rolling start makes, without the seconds that Python's start-up would spread it over.
MIGRATE = """
import asyncio, sys, time
from airlock.store.db import Database

async def main() -> None:
    db = Database(sys.argv[1])
    await asyncio.sleep(max(0.0, float(sys.argv[2]) - time.time()))
    try:
        await db.migrate()
    finally:
        await db.close()

asyncio.run(main())
"""


def _start_all(url: str) -> list[subprocess.CompletedProcess[str]]:
    at = time.time() + 4.0  # every process has imported by then, even on a busy machine
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", MIGRATE, url, str(at)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(CONTROLLERS)
    ]
    done = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return done


async def _versions(url: str) -> list[str]:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            rows = await conn.execute(text("SELECT version_num FROM alembic_version"))
            return [str(r[0]) for r in rows]
    finally:
        await engine.dispose()


async def test_controllers_that_start_together_all_migrate_once(db_url: str) -> None:
    for proc in _start_all(db_url):
        assert proc.returncode == 0, proc.stderr[-3000:]
    head = await _versions(db_url)
    assert len(head) == 1
    # Again, on a database that is already at head: nothing to do, nobody fails.
    for proc in _start_all(db_url):
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert await _versions(db_url) == head
    db = Database(db_url)
    try:
        await db.migrate()  # and in this process too
    finally:
        await db.close()
