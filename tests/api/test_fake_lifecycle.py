"""The whole lifecycle through the HTTP API and the real services, with ``AIRLOCK_RUNTIME=fake``
(``runtimes/fake.py``): a CLI VM, a login whose credentials are injected into it, complete,
and every VM gone from the runtime afterwards; keys typed through the viewer's WebSocket reach
the fake VM's screen. On SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

import asyncpg
import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy.engine import make_url
from websockets.asyncio.client import connect

from airlock.api.app import create_app
from airlock.providers.oauth2 import TOKENS_PATH, demo_oauth2_provider
from airlock.runtimes.fake import FakeRuntime
from airlock.runtimes.vmdir import proc_stat, read_pid
from airlock.services import session_login
from airlock.services.core import Core
from airlock.settings import Settings
from tests.api.live import serve
from tests.e2e.conftest import free_port
from tests.lifecycle_helpers import REFRESH_TOKEN, finish_login, running_ids, wait_for
from tests.rfb import RfbClient, WsTransport

BASE_URL = "http://airlock.test:4000"


@dataclass
class FakeApi:
    core: Core
    runtime: FakeRuntime
    client: httpx.AsyncClient
    service: dict[str, str]
    alice: dict[str, str]

    async def session(self, session_id: str) -> dict[str, Any]:
        r = await self.client.get(f"/api/auth/session/{session_id}", headers=self.alice)
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        return body

    async def wait_session(self, session_id: str, status: str) -> dict[str, Any]:
        async def reached() -> bool:
            body = await self.session(session_id)
            assert body["status"] in (status, "initializing", "awaiting_user"), body
            return bool(body["status"] == status)

        await wait_for(reached, timeout=30)
        return await self.session(session_id)


@pytest.fixture
async def fake_api(
    db_url: str, settings_factory: Callable[..., Settings]
) -> AsyncIterator[FakeApi]:
    settings = settings_factory(
        database_url=db_url,
        public_url=BASE_URL,
        runtime="fake",
        grace_success_ms=30_000,
        reconcile_interval_ms=500,
    )
    provider = demo_oauth2_provider(settings.demo_idp_port)
    core = Core(settings, providers={provider.id: provider})  # the runtime from the settings
    assert isinstance(core.runtime, FakeRuntime)
    app: FastAPI = create_app(core=core)
    lifespan = app.router.lifespan_context(app)
    await lifespan.__aenter__()
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE_URL)
    service = (await core.tokens.create("service", "web-backend")).value
    alice = (await core.tokens.create("user", "alice")).value
    try:
        yield FakeApi(
            core,
            core.runtime,
            client,
            {"Authorization": f"Bearer {service}"},
            {"Authorization": f"Bearer {alice}"},
        )
    finally:
        await client.aclose()
        await lifespan.__aexit__(None, None, None)
        await core.runtime.close()
        leftover = FakeRuntime(settings.vms_dir)
        for vm in await leftover.list():
            await leftover.destroy(vm.vm_id)
        assert await leftover.list() == []


def _pid(runtime: FakeRuntime, vm_id: str) -> int:
    record = read_pid(runtime.vms_dir / vm_id)
    assert record is not None
    return record.pid


def _alive(pid: int) -> bool:
    found = proc_stat(pid)
    return found is not None and found[0] not in ("Z", "X")


async def test_login_with_handoff_then_complete_through_the_api(fake_api: FakeApi) -> None:
    api = fake_api
    r = await api.client.post("/api/vms", json={"role": "cli"}, headers=api.alice)
    assert r.status_code == 201, r.text
    cli_vm = r.json()
    assert cli_vm["state"] == "running" and cli_vm["runtime"] == "fake"
    cli_pid = _pid(api.runtime, cli_vm["vmId"])
    assert _alive(cli_pid)

    r = await api.client.post(
        "/api/auth/start",
        json={"provider": "oauth2", "userId": "alice", "cliVmId": cli_vm["vmId"]},
        headers=api.service,
    )
    assert r.status_code == 201, r.text
    session_id = r.json()["sessionId"]
    ready = await api.wait_session(session_id, "awaiting_user")
    browser_vm = ready["vm"]["vmId"]
    assert ready["vm"]["state"] == "running" and ready["novncURL"]
    assert browser_vm in await running_ids(api.runtime)

    # The login program's last step: the token file appears where the provider watches it.
    await finish_login(api.runtime, browser_vm)
    done = await api.wait_session(session_id, "completed")
    assert done["credentials"]["captured"] is True
    assert done["vm"]["state"] == "draining"

    async def injected() -> bool:
        body = await api.session(session_id)
        return body["credentials"]["injected"] is not None

    await wait_for(injected, timeout=30)
    body = await api.session(session_id)
    assert body["credentials"]["injected"]["vmId"] == cli_vm["vmId"]
    assert body["credentials"]["injected"]["verified"] is True
    # The handoff wrote the vendor's file into the CLI VM's home, 0600, byte for byte; the
    # capture was wiped from the browser VM.
    written = api.runtime.vms_dir / cli_vm["vmId"] / "home" / TOKENS_PATH
    assert REFRESH_TOKEN in written.read_text()
    assert written.stat().st_mode & 0o777 == 0o600
    assert not (api.runtime.vms_dir / browser_vm / "home" / TOKENS_PATH).exists()

    browser_pid = _pid(api.runtime, browser_vm)
    r = await api.client.post(f"/api/auth/session/{session_id}/complete", headers=api.alice)
    assert r.status_code == 200, r.text

    async def browser_gone() -> bool:
        body = await api.session(session_id)
        return bool(body["vm"]["state"] == "destroyed")

    await wait_for(browser_gone, timeout=30)
    assert browser_vm not in await running_ids(api.runtime)
    assert not _alive(browser_pid)
    assert not (api.runtime.vms_dir / browser_vm).exists()

    # The CLI VM was untouched by all that, and goes when its owner deletes it.
    assert _alive(cli_pid)
    r = await api.client.delete(f"/api/vms/{cli_vm['vmId']}", headers=api.alice)
    assert r.status_code in (200, 202, 204), r.text

    async def cli_gone() -> bool:
        r = await api.client.get(f"/api/vms/{cli_vm['vmId']}", headers=api.alice)
        return bool(r.json()["state"] == "destroyed")

    await wait_for(cli_gone, timeout=30)
    assert not _alive(cli_pid)
    assert await running_ids(api.runtime) == set()


async def test_credentials_injected_later_through_the_api(fake_api: FakeApi) -> None:
    """``POST /api/vms/{id}/credentials``: a CLI VM created after the login gets them."""
    api = fake_api
    r = await api.client.post(
        "/api/auth/start", json={"provider": "oauth2", "userId": "alice"}, headers=api.service
    )
    session_id = r.json()["sessionId"]
    ready = await api.wait_session(session_id, "awaiting_user")
    await finish_login(api.runtime, ready["vm"]["vmId"])
    await api.wait_session(session_id, "completed")

    r = await api.client.post("/api/vms", json={"role": "cli"}, headers=api.alice)
    vm_id = r.json()["vmId"]
    r = await api.client.post(
        f"/api/vms/{vm_id}/credentials", json={"provider": "oauth2"}, headers=api.alice
    )
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["injected"]["verified"] is True and out["sessionId"] == session_id
    assert out["files"] == [TOKENS_PATH]
    written = api.runtime.vms_dir / vm_id / "home" / TOKENS_PATH
    assert REFRESH_TOKEN in written.read_text()
    assert os.stat(written).st_uid == os.geteuid()


async def test_a_person_types_into_a_fake_vm_through_the_viewer_socket(
    db_url: str, settings_factory: Callable[..., Settings]
) -> None:
    """The viewer path (novncURL's token, the VNC WebSocket, the proxy's RFB filter) on a
    real server with the fake runtime: what the person types reaches the VM."""
    port = free_port()
    settings = settings_factory(
        database_url=db_url,
        public_url=f"http://127.0.0.1:{port}",
        demo_idp_port=free_port(),
        runtime="fake",
    )
    core = Core(settings, demo=True)
    runtime = core.runtime
    assert isinstance(runtime, FakeRuntime)
    try:
        async with serve(create_app(core=core, demo=True), lifespan=True, port=port) as url:
            alice = (await core.tokens.create("user", "alice")).value
            headers = {"Authorization": f"Bearer {alice}"}
            async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30) as client:
                r = await client.post("/api/auth/start", json={"provider": "oauth2"})
                session_id = r.json()["sessionId"]

                async def ready() -> bool:
                    body = (await client.get(f"/api/auth/session/{session_id}")).json()
                    return bool(body["status"] == "awaiting_user")

                await wait_for(ready, timeout=30)
                body = (await client.get(f"/api/auth/session/{session_id}")).json()
                [token] = parse_qs(urlsplit(body["novncURL"]).query)["token"]
                vm_id = body["vm"]["vmId"]
                ws_url = "ws" + url.removeprefix("http")
                ws_url += f"/api/auth/session/{session_id}/vnc?token={token}"
                async with connect(ws_url, subprotocols=["binary"], max_size=None) as ws:  # type: ignore[list-item]
                    rfb = RfbClient(WsTransport(ws))
                    init = await rfb.handshake()
                    assert (init.width, init.height) == (1280, 800)
                    await rfb.true_colour()
                    assert (await rfb.screenshot()).share((0x44, 0x44, 0x44), step=97) == 1.0
                    for keysym in b"demo":
                        await rfb.key(keysym)

                    async def typed() -> bool:
                        return bytes(runtime.vm(vm_id).keys) == b"demo"

                    await wait_for(typed, timeout=15)
    finally:
        await runtime.close()
        for vm in await runtime.list():
            await runtime.destroy(vm.vm_id)


@contextlib.asynccontextmanager
async def database_away(db_url: str) -> AsyncIterator[None]:
    """The controller's database stops answering for a while, then comes back. SQLite: the
    sessions table goes away (every read of it fails). PostgreSQL: the database refuses new
    connections and its open ones are cut, which is what a failover looks like to a client."""
    url = make_url(db_url)
    if url.get_backend_name() == "sqlite":
        path = url.database
        assert path is not None

        def rename(old: str, new: str) -> None:
            with sqlite3.connect(path, timeout=30) as conn:
                conn.execute(f"ALTER TABLE {old} RENAME TO {new}")

        await asyncio.to_thread(rename, "auth_sessions", "auth_sessions_away")
        try:
            yield
        finally:
            await asyncio.to_thread(rename, "auth_sessions_away", "auth_sessions")
        return
    server = make_url(os.environ["AIRLOCK_TEST_POSTGRES_URL"])
    admin = await asyncpg.connect(
        host=server.host,
        port=server.port,
        user=server.username,
        password=server.password,
        database=server.database,
    )
    name = url.database
    try:
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = $1 AND pid <> pg_backend_pid()",
            name,
        )
        try:
            yield
        finally:
            await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
    finally:
        await admin.close()


async def test_a_login_completes_after_the_database_was_away_while_it_was_watched(
    fake_api: FakeApi,
    db_url: str,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A capture watch that meets a database error keeps watching. It used to end there
    (a pool timeout under load did it), and that session never saw its capture."""
    # The watch reads the rows every round, not every third: it meets the outage within
    # one capture poll.
    monkeypatch.setattr(session_login, "ROWS_EVERY", 1)
    api = fake_api
    r = await api.client.post(
        "/api/auth/start", json={"provider": "oauth2", "userId": "alice"}, headers=api.service
    )
    session_id = r.json()["sessionId"]
    ready = await api.wait_session(session_id, "awaiting_user")
    caplog.set_level(logging.WARNING, logger="airlock.sessions")

    async def watch_saw_the_outage() -> bool:
        return any(
            "capture watch cannot read the session" in record.getMessage()
            for record in caplog.records
        )

    async with database_away(db_url):
        await wait_for(watch_saw_the_outage, timeout=60)  # one capture poll: 10 s

    await finish_login(api.runtime, ready["vm"]["vmId"])
    done = await api.wait_session(session_id, "completed")
    assert done["credentials"]["captured"] is True


async def test_a_request_while_the_database_is_away_is_told_to_retry(
    fake_api: FakeApi, db_url: str
) -> None:
    """503 ``database_unavailable`` with ``Retry-After``, not a bare 500, and the same
    request answers again once the database is back."""
    api = fake_api
    r = await api.client.post(
        "/api/auth/start", json={"provider": "oauth2", "userId": "alice"}, headers=api.service
    )
    session_id = r.json()["sessionId"]
    async with database_away(db_url):
        r = await api.client.get(f"/api/auth/session/{session_id}", headers=api.alice)
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "database_unavailable"
        assert r.headers["Retry-After"] == "5"
    r = await api.client.get(f"/api/auth/session/{session_id}", headers=api.alice)
    assert r.status_code == 200, r.text
