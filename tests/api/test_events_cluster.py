"""Events across controllers: two controllers (each its own ``Core``, bus and uvicorn
server) on one PostgreSQL database. A change made through one reaches an SSE watcher on
the other by ``LISTEN/NOTIFY``, not by the safety re-read (set to an hour here); a dropped
listening connection comes back and loses nothing; and within one process a change wakes
the watchers of its session only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from airlock.api.app import create_app
from airlock.domain.vms import VmRole, VmState
from airlock.providers.oauth2 import demo_oauth2_provider
from airlock.services.core import Core
from airlock.settings import Settings
from airlock.store import notify
from airlock.store.notify import asyncpg_dsn
from airlock.store.tables import AuthSession, Vm
from tests.api.conftest import NoVmRuntime
from tests.api.live import serve
from tests.lifecycle_helpers import wait_for

HOUR_MS = 3_600_000
DELIVERY_S = 10.0  # generous on a loaded machine; the safety re-read is an hour away


@dataclass
class Node:
    name: str
    core: Core
    url: str
    client: httpx.AsyncClient


def node_settings(
    settings_factory: Callable[..., Settings], tmp_path: Path, db_url: str, name: str
) -> Settings:
    return settings_factory(
        data_dir=tmp_path / name,
        database_url=db_url,
        node_name=name,
        secret_key_file=tmp_path / "cluster.key",  # one key for the cluster
        events_resync_ms=HOUR_MS,  # the timer must not be what delivers anything
        reconcile_interval_ms=HOUR_MS,  # the rows these tests write run no VM
        idle_extension_ms=1_200_000,  # each keepalive moves destroyAfter: a visible change
    )


@contextlib.asynccontextmanager
async def node(settings: Settings, name: str) -> AsyncIterator[Node]:
    provider = demo_oauth2_provider(settings.demo_idp_port)
    core = Core(settings, runtime=NoVmRuntime(), providers={provider.id: provider})
    async with (
        serve(create_app(core=core), lifespan=True) as url,
        httpx.AsyncClient(base_url=url, timeout=30) as client,
    ):
        if core.channel is not None:
            await asyncio.wait_for(core.channel.connected.wait(), DELIVERY_S)
        yield Node(name, core, url, client)


async def add_session(core: Core, user_id: str) -> AuthSession:
    """A session awaiting its user, with a running browser VM (as a boot leaves them)."""
    now = core.clock.now()
    vm = Vm(
        id="vm-" + secrets.token_hex(8),
        role=VmRole.BROWSER.value,
        runtime="novm",
        user_id=user_id,
        state=VmState.RUNNING.value,
        created_at=now,
        updated_at=now,
        running_at=now,
        destroy_after=now + timedelta(minutes=5),
        destroy_reason="login_timeout",
        destroy_attempts=0,
        warm=False,
        detail={},
    )
    session = AuthSession(
        id=secrets.token_hex(16),
        user_id=user_id,
        provider="oauth2",
        status="awaiting_user",
        vm_id=vm.id,
        created_at=now,
        updated_at=now,
        ready_at=now,
    )
    async with core.db.transaction() as repo:
        repo.add_vm(vm)
        await repo.session.flush()
        repo.add_session(session)
    return session


class Watcher:
    """One SSE stream, read in the background: its ``session`` events as they come."""

    def __init__(self, client: httpx.AsyncClient, session_id: str, token: str) -> None:
        self.events: list[dict[str, Any]] = []
        self.arrived = asyncio.Condition()
        self.ended = False
        self._task = asyncio.get_running_loop().create_task(
            self._read(client, session_id, token), name=f"watch:{session_id}"
        )

    async def _read(self, client: httpx.AsyncClient, session_id: str, token: str) -> None:
        url = f"/api/auth/session/{session_id}/events"
        headers = {"Authorization": f"Bearer {token}"}
        try:
            async with client.stream("GET", url, headers=headers, timeout=None) as r:
                assert r.status_code == 200
                event = ""
                async for line in r.aiter_lines():
                    if line.startswith("event: "):
                        event = line[7:]
                    elif line.startswith("data: ") and event == "session":
                        async with self.arrived:
                            self.events.append(json.loads(line[6:]))
                            self.arrived.notify_all()
        finally:
            async with self.arrived:
                self.ended = True
                self.arrived.notify_all()

    async def until(self, check: Callable[[dict[str, Any]], bool]) -> float:
        """Wait for an event that passes ``check``; how long it took."""
        start = time.monotonic()
        async with asyncio.timeout(DELIVERY_S), self.arrived:
            await self.arrived.wait_for(lambda: any(map(check, self.events)) or self.ended)
        assert any(map(check, self.events)), f"the stream ended: {self.events}"
        return time.monotonic() - start

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


async def keepalive(node: Node, session_id: str, token: str) -> str:
    """A keepalive through ``node``: the new ``destroyAfter`` it answered."""
    r = await node.client.post(
        f"/api/auth/session/{session_id}/keepalive", headers={"Authorization": f"Bearer {token}"}
    )
    assert r.status_code == 200, r.text
    value = r.json()["destroyAfter"]
    assert isinstance(value, str)
    return value


def destroy_after(value: str) -> Callable[[dict[str, Any]], bool]:
    return lambda e: bool(e["vm"] and e["vm"]["destroyAfter"] == value)


async def _true(value: bool) -> bool:
    return value


@pytest.fixture
def pg_url(db_url: str) -> str:
    if not db_url.startswith("postgresql"):
        pytest.skip("LISTEN/NOTIFY is PostgreSQL's; SQLite is one node")
    return db_url


@pytest.mark.postgres
async def test_a_change_through_one_controller_reaches_a_watcher_on_the_other(
    pg_url: str, tmp_path: Path, settings_factory: Callable[..., Settings]
) -> None:
    settings = {n: node_settings(settings_factory, tmp_path, pg_url, n) for n in ("a", "b")}
    async with node(settings["a"], "a") as a, node(settings["b"], "b") as b:
        token = (await a.core.tokens.create("user", "alice")).value
        session = await add_session(a.core, "alice")
        on_a, on_b = Watcher(a.client, session.id, token), Watcher(b.client, session.id, token)
        try:
            await on_a.until(lambda e: e["sessionId"] == session.id)
            await on_b.until(lambda e: e["sessionId"] == session.id)
            value = await keepalive(a, session.id, token)  # the change, through node a
            assert await on_b.until(destroy_after(value)) < DELIVERY_S
            await on_a.until(destroy_after(value))
            # And the other way round, to the end of the stream: cancelled through b.
            r = await b.client.delete(
                f"/api/auth/session/{session.id}", headers={"Authorization": f"Bearer {token}"}
            )
            assert r.status_code == 200
            await on_a.until(lambda e: e["vm"]["state"] == "destroyed")
            assert on_a.events[-1]["status"] == "cancelled"
        finally:
            await on_a.close()
            await on_b.close()


@pytest.mark.postgres
async def test_a_dropped_listening_connection_recovers_and_misses_nothing(
    pg_url: str,
    tmp_path: Path,
    settings_factory: Callable[..., Settings],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A long back-off: the change below is surely made while b listens to nothing.
    monkeypatch.setattr(notify, "BACKOFF_FIRST_S", 3.0)
    settings = {n: node_settings(settings_factory, tmp_path, pg_url, n) for n in ("a", "b")}
    async with node(settings["a"], "a") as a, node(settings["b"], "b") as b:
        assert b.core.channel is not None
        token = (await a.core.tokens.create("user", "alice")).value
        session = await add_session(a.core, "alice")
        on_b = Watcher(b.client, session.id, token)
        try:
            await on_b.until(lambda e: e["sessionId"] == session.id)
            admin = await asyncpg.connect(asyncpg_dsn(pg_url))
            try:
                assert await admin.fetchval(
                    "SELECT pg_terminate_backend($1)", b.core.channel.backend_pid
                )
            finally:
                await admin.close()
            channel = b.core.channel
            await wait_for(lambda: _true(not channel.connected.is_set()), timeout=DELIVERY_S)
            missed = await keepalive(a, session.id, token)  # its NOTIFY reaches no b
            assert b.core.channel.connects == 1, "b reconnected before the change: no gap"
            # b connects again, wakes every watcher once, and the re-read finds the change.
            await on_b.until(destroy_after(missed))
            assert b.core.channel.connects == 2
            later = await keepalive(a, session.id, token)  # and it listens again
            await on_b.until(destroy_after(later))
        finally:
            await on_b.close()


async def test_a_change_wakes_only_the_watchers_of_its_session(
    db_url: str, tmp_path: Path, settings_factory: Callable[..., Settings]
) -> None:
    async with node(node_settings(settings_factory, tmp_path, db_url, "a"), "a") as a:
        token = (await a.core.tokens.create("user", "alice")).value
        sessions = [await add_session(a.core, "alice") for _ in range(4)]
        changed = sessions[0].id
        # Two watchers of the changed session, one of each of the others.
        watchers = [Watcher(a.client, s.id, token) for s in (sessions[0], *sessions)]
        try:
            for w, s in zip(watchers, (sessions[0], *sessions), strict=True):
                await w.until(lambda e, sid=s.id: e["sessionId"] == sid)
            # Every stream is waiting now.
            await wait_for(lambda: _true(len(a.core.bus) == len(sessions)), timeout=DELIVERY_S)
            heard = a.core.bus.heard
            value = await keepalive(a, changed, token)
            for w in watchers[:2]:
                await w.until(destroy_after(value))
            if a.core.channel is not None:  # PostgreSQL: our own NOTIFY comes back too
                await wait_for(lambda: _true(a.core.bus.heard > heard), timeout=DELIVERY_S)
            assert a.core.bus.wakes == 2  # the changed session's two, not the other three
            assert all(len(w.events) == 1 for w in watchers[2:])
        finally:
            for w in watchers:
                await w.close()


@pytest.mark.postgres
async def test_a_change_by_a_process_that_runs_no_loop_reaches_the_controllers(
    pg_url: str, tmp_path: Path, settings_factory: Callable[..., Settings]
) -> None:
    """As the CLI does (``Core.open()``, no loops): what it queued goes out at its close."""
    async with node(node_settings(settings_factory, tmp_path, pg_url, "a"), "a") as a:
        token = (await a.core.tokens.create("user", "alice")).value
        session = await add_session(a.core, "alice")
        on_a = Watcher(a.client, session.id, token)
        try:
            await on_a.until(lambda e: e["sessionId"] == session.id)
            provider = demo_oauth2_provider(0)
            cli = Core(
                node_settings(settings_factory, tmp_path, pg_url, "a"),
                runtime=NoVmRuntime(),
                providers={provider.id: provider},
            )
            await cli.open()
            try:
                await cli.sessions.cancel(session.id, None, actor="cli")
            finally:
                await cli.close()
            await on_a.until(lambda e: e["vm"]["state"] == "destroyed")
        finally:
            await on_a.close()
