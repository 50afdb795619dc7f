"""The VNC proxy end to end: a real uvicorn server in process, a real sandbox (Xvnc +
Chromium on the demo IdP's login page), and an RFB client over ``websockets``, as noVNC
would connect. Whether input arrived (or did not) is the demo IdP's verdict on what was
typed: the sign-in completes or not. Lifecycle: an open viewer keeps a draining VM up to
``max_drain``;
closing it lets the VM go at the end of the grace period. Those two run on a ``ManualClock``
the test moves a keepalive period at a time (the viewer's keepalives, the deadlines and the
scheduler all wait on it), so they assert the deadline itself instead of a window of wall
time. On SQLite only: the proxy does nothing database-specific, and each test boots a VM."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from fastapi import FastAPI
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from airlock.api.app import create_app
from airlock.clock import Clock, ManualClock
from airlock.runtimes.base import Stream
from airlock.runtimes.sandbox import SandboxRuntime
from airlock.services.core import Core
from airlock.services.viewers import ViewerRegistry
from airlock.settings import Settings
from tests.api.conftest import ApiFactory
from tests.api.live import serve
from tests.e2e.conftest import free_port
from tests.lifecycle_helpers import advance, finish_login, loops_asleep, wait_for
from tests.rfb import RfbClient, WsTransport, start_xvnc

pytestmark = pytest.mark.sandbox

FAST = {
    "grace_success_ms": 1500,
    "grace_failure_ms": 800,
    "idle_extension_ms": 2000,
    "login_timeout_ms": 60_000,
    "reconcile_interval_ms": 500,
}
XK_TAB, XK_RETURN = 0xFF09, 0xFF0D


@dataclass
class Live:
    url: str
    core: Core
    client: httpx.AsyncClient  # as alice
    service: httpx.AsyncClient  # as a service (support staff's backend)
    app: FastAPI

    async def start(self) -> tuple[str, str, str]:
        """A session on the demo IdP, awaiting the user: (session id, VM id, viewer token)."""
        r = await self.client.post("/api/auth/start", json={"provider": "oauth2"})
        assert r.status_code == 201, r.text
        session_id = r.json()["sessionId"]
        body: dict[str, Any] = {}

        async def ready() -> bool:
            body.update((await self.client.get(f"/api/auth/session/{session_id}")).json())
            assert body["status"] in ("initializing", "awaiting_user"), body
            return body["status"] == "awaiting_user"

        await wait_for(ready, timeout=60, interval=0.1)
        [token] = parse_qs(urlsplit(body["novncURL"]).query)["token"]
        return session_id, body["vm"]["vmId"], token

    def vnc_url(self, session_id: str, token: str | None) -> str:
        ws = "ws" + self.url.removeprefix("http")
        query = f"?token={token}" if token is not None else ""
        return f"{ws}/api/auth/session/{session_id}/vnc{query}"

    async def vm_state(self, session_id: str) -> str:
        body = (await self.client.get(f"/api/auth/session/{session_id}")).json()
        return str(body["vm"]["state"])


LiveFactory = Callable[..., Awaitable[Live]]


@pytest.fixture
async def make_live(
    tmp_path: Path, settings_factory: Callable[..., Settings]
) -> AsyncIterator[LiveFactory]:
    async with contextlib.AsyncExitStack() as stack:

        async def factory(clock: Clock | None = None, **overrides: Any) -> Live:
            port = free_port()
            settings = settings_factory(
                public_url=f"http://127.0.0.1:{port}",
                demo_idp_port=free_port(),
                **{**FAST, **overrides},
            )
            core = Core(settings, demo=True, clock=clock)
            app = create_app(core=core, demo=True)
            url = await stack.enter_async_context(serve(app, lifespan=True, port=port))
            await loops_asleep(core.clock)
            alice = (await core.tokens.create("user", "alice")).value
            support = (await core.tokens.create("service", "support")).value
            client, service = [
                await stack.enter_async_context(
                    httpx.AsyncClient(
                        base_url=url, headers={"Authorization": f"Bearer {t}"}, timeout=30
                    )
                )
                for t in (alice, support)
            ]
            return Live(url, core, client, service, app)

        try:
            yield factory
        finally:
            await stack.aclose()
            runtime = SandboxRuntime(tmp_path / "data" / "vms")
            for vm in await runtime.list():
                await runtime.destroy(vm.vm_id)


@contextlib.asynccontextmanager
async def viewer(live: Live, session_id: str, token: str) -> AsyncIterator[RfbClient]:
    async with connect(
        live.vnc_url(session_id, token), subprotocols=["binary"], max_size=None
    ) as ws:  # type: ignore[list-item]
        assert ws.subprotocol == "binary"
        client = RfbClient(WsTransport(ws))
        init = await client.handshake()
        assert (init.width, init.height) == (1280, 800)
        yield client


async def closed(ws: ClientConnection, timeout: float = 15) -> tuple[int, str]:
    """Wait for the server to close ``ws`` (reading and discarding what still comes)."""
    async with asyncio.timeout(timeout):
        with contextlib.suppress(ConnectionClosed):
            while True:
                await ws.recv()
    assert ws.close_code is not None
    return ws.close_code, ws.close_reason or ""


def keysyms(text: str) -> list[int]:
    return [{"\t": XK_TAB, "\n": XK_RETURN}.get(c, ord(c)) for c in text]


async def test_rfb_through_the_proxy_input_view_only_and_the_vm_going(
    make_live: LiveFactory,
) -> None:
    live = await make_live()
    session_id, _, token = await live.start()

    async with viewer(live, session_id, token) as rfb:
        # A real handshake (in viewer()) and a full framebuffer update through the proxy.
        await rfb.request_update(incremental=False)
        assert await rfb.read_update() == 1280 * 800 * 4

        async def form_shown() -> bool:  # the form's white card on the grey page, not "Starting…"
            frame = await rfb.read_frame()
            # Off the centre, where Xvnc draws the pointer into the picture.
            card, page = rfb.pixel(frame, 850, 200), rfb.pixel(frame, 5, 5)
            return (card, page) == ((255, 255, 255), (238, 241, 245))

        await wait_for(form_shown, timeout=30, interval=0.3)
        # Keys from a normal token arrive: the login page's focused user name field.
        for keysym in keysyms("de"):
            await rfb.key(keysym)
        # A view-only token (minted by support staff): its input is dropped, its
        # framebuffer requests pass.
        r = await live.service.post(
            f"/api/auth/session/{session_id}/viewer-token", json={"viewOnly": True}
        )
        assert r.status_code == 201, r.text
        assert r.json()["viewOnly"] is True
        async with viewer(live, session_id, r.json()["token"]) as watcher:
            await watcher.pointer(10, 10, buttons=1)
            for keysym in keysyms("xyz\t\n"):
                await watcher.key(keysym)
            await watcher.request_update(incremental=False)
            assert await watcher.read_update() == 1280 * 800 * 4  # Xvnc has seen it all
            # The rest through the normal viewer: the demo IdP signs "demo" in only if
            # none of the watcher's keys (or its click, off the field) reached the form.
            for keysym in keysyms("mo\tdemo\n"):
                await rfb.key(keysym)
            await wait_for(lambda: _status_is(live, session_id, "completed"), timeout=30)
            # A message noVNC never sends closes the socket.
            await watcher.t.send(b"\x63" + b"\0" * 7)
            assert isinstance(watcher.t, WsTransport)
            assert await closed(watcher.t.ws) == (4400, "unknown client message type 99")

        # The VM goes (cancel): the open socket closes with 4001, and the token is refused.
        assert isinstance(rfb.t, WsTransport)
        r = await live.client.delete(f"/api/auth/session/{session_id}")
        assert r.status_code == 200, r.text
        assert await closed(rfb.t.ws) == (4001, "vm destroyed")

    async with connect(live.vnc_url(session_id, token)) as ws:
        assert await closed(ws) == (4404, "vm_not_viewable")


async def test_a_vm_that_dies_closes_its_viewers_as_lost(make_live: LiveFactory) -> None:
    live = await make_live()
    session_id, vm_id, token = await live.start()
    async with viewer(live, session_id, token) as rfb:
        [running] = [vm for vm in await live.core.runtime.list() if vm.vm_id == vm_id]
        assert running.pid is not None
        os.kill(running.pid, signal.SIGKILL)  # the sandbox dies under the viewer
        assert isinstance(rfb.t, WsTransport)
        assert await closed(rfb.t.ws) == (4002, "vm lost")
    assert await live.vm_state(session_id) == "lost"


async def keepalive_periods(live: Live, clock: ManualClock, until: datetime) -> None:
    """Move the clock a keepalive period at a time up to ``until``, each period's rounds
    (the viewer's keepalive, the scheduler's) over before the next."""
    period = viewer_registry(live).interval
    while clock.now() < until:
        await advance(clock, seconds=min(period, (until - clock.now()).total_seconds()))


def viewer_registry(live: Live) -> ViewerRegistry:
    registry = live.app.state.viewers
    assert isinstance(registry, ViewerRegistry)
    return registry


async def completed_at(live: Live, session_id: str) -> datetime:
    session, _ = await live.core.sessions.get(session_id, None)
    assert session.completed_at is not None
    return session.completed_at


async def test_open_viewer_keeps_a_draining_vm_up_to_max_drain(make_live: LiveFactory) -> None:
    clock = ManualClock()
    live = await make_live(clock=clock, max_drain_ms=5000)
    session_id, vm_id, token = await live.start()
    async with viewer(live, session_id, token) as rfb:
        await finish_login(live.core.runtime, vm_id)
        await wait_for(lambda: _status_is(live, session_id, "completed"))
        done = await completed_at(live, session_id)
        # Past the grace period (1.5 s), and to just before max_drain, the viewer keeps it.
        await keepalive_periods(live, clock, done + timedelta(seconds=3))
        assert await live.vm_state(session_id) == "draining"
        cap = done + timedelta(seconds=5)
        await keepalive_periods(live, clock, cap - timedelta(milliseconds=1))
        assert await live.vm_state(session_id) == "draining"
        assert isinstance(rfb.t, WsTransport)
        await advance(clock, milliseconds=1)  # max_drain: the viewer no longer keeps it
        assert await closed(rfb.t.ws, timeout=10) == (4001, "vm destroyed")

    async def gone() -> bool:
        return await live.vm_state(session_id) == "destroyed"

    await wait_for(gone, timeout=10)
    vm = await live.core.vms.get(vm_id, None)
    assert vm.destroy_after == cap and vm.destroyed_at == cap  # at max_drain, not before


async def test_closing_the_viewer_lets_the_vm_go_after_the_grace_period(
    make_live: LiveFactory,
) -> None:
    clock = ManualClock()
    live = await make_live(clock=clock, max_drain_ms=30_000)
    session_id, vm_id, token = await live.start()
    async with viewer(live, session_id, token):
        await finish_login(live.core.runtime, vm_id)
        await wait_for(lambda: _status_is(live, session_id, "completed"))
        done = await completed_at(live, session_id)
        # Twice the grace period: the viewer keeps it.
        await keepalive_periods(live, clock, done + timedelta(seconds=3))
        assert await live.vm_state(session_id) == "draining"
    await wait_for(lambda: viewer_registry(live).count(session_id) == 0)
    closed_at = clock.now()

    async def gone() -> bool:
        return await live.vm_state(session_id) == "destroyed"

    # The last keepalive was at most one period before the close: the VM goes at most a
    # grace period (1.5 s) after the close, however long the viewer had kept it.
    await advance(clock, seconds=1.5)
    await wait_for(gone, timeout=10, interval=0.1)
    vm = await live.core.vms.get(vm_id, None)
    assert vm.destroyed_at is not None and vm.destroy_after is not None
    assert vm.destroyed_at >= vm.destroy_after  # never early
    assert closed_at < vm.destroy_after <= closed_at + timedelta(seconds=1.5)


async def _status_is(live: Live, session_id: str, status: str) -> bool:
    body = (await live.client.get(f"/api/auth/session/{session_id}")).json()
    return bool(body["status"] == status)


@pytest.fixture
def xvnc(tmp_path: Path) -> Iterator[Path]:
    """A real Xvnc on a Unix socket, with no VM around it (as bench/vnc_proxy.py runs it)."""
    proc, path = start_xvnc(tmp_path)
    try:
        yield path
    finally:
        proc.terminate()
        proc.wait(timeout=10)


async def test_presence_on_connect_and_shutdown_closes_every_socket(
    make_api: ApiFactory, xvnc: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    api = await make_api(reconcile_interval_ms=3_600_000)

    async def open_vnc(vm_id: str) -> Stream:
        return await asyncio.open_unix_connection(xvnc)

    monkeypatch.setattr(api.runtime, "open_vnc", open_vnc)
    signer = api.app.state.viewer_signer
    registry: ViewerRegistry = api.app.state.viewers
    rows = [await api.add_session("alice", destroy_after=timedelta(seconds=5)) for _ in range(2)]
    async with contextlib.AsyncExitStack() as stack:
        url = await stack.enter_async_context(serve(api.app, lifespan=False))
        sockets = []
        for session, vm in (*rows, rows[0]):
            token = signer.mint(session.id, vm.id, now=datetime.now(UTC))
            ws = "ws" + url.removeprefix("http") + f"/api/auth/session/{session.id}/vnc"
            conn = await stack.enter_async_context(connect(f"{ws}?token={token}"))
            rfb = RfbClient(WsTransport(conn))
            await rfb.handshake()
            sockets.append(conn)
        assert registry.count() == 3 and registry.count(rows[0][0].id) == 2
        # A viewer connected: the VM's deadline moved to now + idle_extension (2 min).
        for session, _ in rows:
            _, vm = await api.core.sessions.get(session.id, None)
            assert vm is not None and vm.destroy_after is not None
            assert vm.destroy_after - datetime.now(UTC) > timedelta(seconds=100)
        # The controller stops: every socket closes, every watcher ends.
        await registry.close()
        for conn in sockets:
            assert await closed(conn) == (1001, "controller shutting down")
        await wait_for(lambda: _zero(registry))
        assert len(registry.tasks) == 0


async def _zero(registry: ViewerRegistry) -> bool:
    return registry.count() == 0
