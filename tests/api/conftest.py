"""The API, in process: ``create_app()`` with its lifespan running, over
``httpx.ASGITransport``, on a real SQLite database in ``tmp_path`` (through the
migrations), with real tokens.

These tests check the HTTP layer (identity rules, errors, validation, shapes), so they boot
no VM: ``NoVmRuntime`` runs nothing and refuses to create anything. Sessions and VMs that
a test needs are written as rows, the way the services write them.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from airlock.api.app import create_app
from airlock.clock import Clock
from airlock.domain.sessions import SessionStatus
from airlock.domain.vms import VmRole, VmState
from airlock.errors import RuntimeFailure
from airlock.providers.oauth2 import demo_oauth2_provider
from airlock.runtimes.base import RunningVm, Stream, VmSpec
from airlock.services.core import Core
from airlock.settings import Settings
from airlock.store.tables import AuthSession, Vm

BASE_URL = "http://airlock.test:4000"


class NoVmRuntime:
    """A ``Runtime`` for API tests: nothing runs here, and nothing can be started.

    ``list_fails`` makes ``list()`` fail, as a runtime that cannot be reached does.
    ``slow_boots`` makes ``create()`` wait (until the app closes) before it fails, as a
    boot in progress does: the session stays live meanwhile. ``boots_succeed`` makes
    ``create()`` answer at once as if a VM booted (nothing runs; its agent cannot be
    reached), so a CLI VM is created and a login fails later, at its agent."""

    name = "novm"

    def __init__(self) -> None:
        self.list_fails = False
        self.slow_boots = False
        self.boots_succeed = False
        self.destroyed: list[str] = []

    async def create(self, spec: VmSpec) -> RunningVm:
        if self.slow_boots:
            await asyncio.Event().wait()  # cancelled when the app closes
        if self.boots_succeed:
            return RunningVm(spec.vm_id, spec.role, None, Path("/nonexistent") / spec.vm_id)
        raise RuntimeFailure("no VMs in API tests")

    async def destroy(self, vm_id: str) -> bool:
        self.destroyed.append(vm_id)
        return False

    async def list(self) -> list[RunningVm]:
        if self.list_fails:
            raise RuntimeFailure("runtime unreachable (test)")
        return []

    async def open_agent(self, vm_id: str) -> Stream:
        raise RuntimeFailure("no VMs in API tests")

    async def open_vnc(self, vm_id: str) -> Stream:
        raise RuntimeFailure("no VMs in API tests")

    async def check(self) -> list[str]:
        return []


@dataclass
class Api:
    app: FastAPI
    core: Core
    runtime: NoVmRuntime
    client: httpx.AsyncClient
    tokens: dict[str, str] = field(default_factory=dict)

    def auth(self, who: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[who]}"}

    async def add_session(
        self,
        user_id: str,
        *,
        status: SessionStatus = SessionStatus.AWAITING_USER,
        vm_state: VmState = VmState.RUNNING,
        destroy_after: timedelta | None = timedelta(minutes=10),
        created: datetime | None = None,
    ) -> tuple[AuthSession, Vm]:
        """A session and its browser VM, written as ``SessionService.start`` and the boot
        would have left them."""
        now = created or self.core.clock.now()
        terminal_vm = VmState(vm_state).terminal
        vm = Vm(
            id="vm-" + secrets.token_hex(8),
            role=VmRole.BROWSER.value,
            runtime=self.runtime.name,
            user_id=user_id,
            state=vm_state.value,
            created_at=now,
            updated_at=now,
            running_at=now if vm_state is not VmState.CREATING else None,
            destroy_after=None if destroy_after is None else now + destroy_after,
            destroy_reason="login_timeout",
            destroyed_at=now if terminal_vm else None,
            destroy_attempts=0,
            warm=False,
            detail={},
        )
        session = AuthSession(
            id=secrets.token_hex(16),
            user_id=user_id,
            provider="oauth2",
            status=status.value,
            vm_id=vm.id,
            created_at=now,
            updated_at=now,
            ready_at=now if status is not SessionStatus.INITIALIZING else None,
            completed_at=now if status is SessionStatus.COMPLETED else None,
            ended_at=now if status.terminal else None,
        )
        async with self.core.db.transaction() as repo:
            repo.add_vm(vm)
            await repo.session.flush()
            repo.add_session(session)
        return session, vm

    async def add_vm(
        self, user_id: str, *, role: VmRole = VmRole.CLI, state: VmState = VmState.RUNNING
    ) -> Vm:
        now = self.core.clock.now()
        vm = Vm(
            id="vm-" + secrets.token_hex(8),
            role=role.value,
            runtime=self.runtime.name,
            user_id=user_id,
            state=state.value,
            created_at=now,
            updated_at=now,
            running_at=now,
            destroy_after=None,
            destroy_attempts=0,
            warm=False,
            detail={},
        )
        async with self.core.db.transaction() as repo:
            repo.add_vm(vm)
        return vm

    async def counts(self) -> tuple[int, int]:
        """(sessions, VMs) in the database: to prove a refused request changed nothing."""
        async with self.core.db.transaction() as repo:
            sessions = await repo.auth_sessions()
            vms = await repo.vms()
        return len(sessions), len(vms)


ApiFactory = Callable[..., Awaitable[Api]]


@pytest.fixture
async def make_api(
    tmp_path: Path, db_url: str, settings_factory: Callable[..., Settings]
) -> AsyncIterator[ApiFactory]:
    """Build an app (settings overridable), start its lifespan, make tokens for alice, bob
    and a service; everything is closed at the end of the test. Once on SQLite, once on
    PostgreSQL (``db_url``). ``clock=ManualClock()``: time moves only when the test says."""
    stack: list[tuple[Api, Any]] = []

    async def factory(clock: Clock | None = None, **overrides: Any) -> Api:
        if stack:
            raise RuntimeError("one app per test: they would share the database")
        values: dict[str, Any] = {
            "database_url": db_url,
            "public_url": BASE_URL,
            # The reconciler would judge the rows tests write as VMs that vanished.
            "reconcile_interval_ms": 3_600_000,
            **overrides,
        }
        settings = settings_factory(**values)
        runtime = NoVmRuntime()
        provider = demo_oauth2_provider(settings.demo_idp_port)
        core = Core(settings, runtime=runtime, providers={provider.id: provider}, clock=clock)
        app = create_app(core=core)
        lifespan = app.router.lifespan_context(app)
        await lifespan.__aenter__()
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE_URL)
        api = Api(app, core, runtime, client)
        stack.append((api, lifespan))
        for who, kind, subject in (
            ("alice", "user", "alice"),
            ("bob", "user", "bob"),
            ("service", "service", "web-backend"),
        ):
            api.tokens[who] = (await core.tokens.create(kind, subject)).value  # type: ignore[arg-type]
        return api

    yield factory
    for api, lifespan in stack:
        await api.client.aclose()
        await lifespan.__aexit__(None, None, None)


@pytest.fixture
async def api(make_api: ApiFactory) -> Api:
    return await make_api()
