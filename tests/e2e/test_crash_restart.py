"""kill -9 of the controller during a grace period, then a restart: the browser VM is
destroyed at its deadline, not before, and nothing else is destroyed. kill -9 and no
restart: the browser VMs end themselves when their lease runs out."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime
from typing import Any

import httpx
import pytest

from airlock.agent.client import AgentClient
from tests.e2e.conftest import Server
from tests.lifecycle_helpers import finish_login, wait_for

pytestmark = pytest.mark.e2e

GRACE_MS = 8000


async def poll(
    client: httpx.AsyncClient, path: str, key: str, want: str, timeout: float = 30
) -> Any:
    body: dict[str, Any] = {}

    async def reached() -> bool:
        body.update((await client.get(path)).json())
        return bool(body[key] == want)

    await wait_for(reached, timeout=timeout, what=f"{path}: {key} {want}")
    return body


def parse(ts: str) -> datetime:
    return datetime.fromisoformat(ts.replace("Z", "+00:00"))


async def test_kill9_during_grace_then_restart(server_factory: Any) -> None:
    server: Server = server_factory(grace_success_ms=GRACE_MS, reconcile_interval_ms=500)
    server.start()
    token = server.cli("tokens", "create", "--user", "alice")
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=30) as client:
        cli_vm = (await client.post("/api/vms", json={"role": "cli"})).json()
        assert cli_vm["state"] == "running", cli_vm
        body = (await client.post("/api/auth/start", json={"provider": "oauth2"})).json()
        session_id, vm_id = body["sessionId"], body["vm"]["vmId"]
        await poll(client, f"/api/auth/session/{session_id}", "status", "awaiting_user")
        await finish_login(server.runtime, vm_id)
        done = await poll(client, f"/api/auth/session/{session_id}", "status", "completed")
        destroy_after = parse(done["vm"]["destroyAfter"])

    server.kill9()  # mid-grace: no shutdown code runs
    running = {v.vm_id for v in await server.runtime.list()}
    assert {vm_id, cli_vm["vmId"]} <= running  # the VMs outlive the controller

    server.start()
    async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=30) as client:
        # Never early: still running shortly before the deadline.
        wait = (destroy_after - datetime.now(destroy_after.tzinfo)).total_seconds() - 0.5
        assert wait > 1, "the restart took longer than the grace period; raise GRACE_MS"
        await asyncio.sleep(wait)
        vm = (await client.get(f"/api/vms/{vm_id}")).json()
        running = {v.vm_id for v in await server.runtime.list()}
        # On a loaded host the two looks can end past the deadline: what they saw before it
        # must be a VM that still drains (the destroy's own time is checked below as well).
        if datetime.now(destroy_after.tzinfo) < destroy_after:
            assert vm["state"] == "draining" and vm_id in running
        else:
            assert vm["state"] in ("draining", "destroying", "destroyed")
        # Destroyed at the deadline by the new process.
        gone = await poll(client, f"/api/vms/{vm_id}", "state", "destroyed", timeout=5)
        assert parse(gone["destroyedAt"]) >= destroy_after
        assert (parse(gone["destroyedAt"]) - destroy_after).total_seconds() < 1.0
        assert vm_id not in {v.vm_id for v in await server.runtime.list()}
        # Nothing else was destroyed.
        cli_now = (await client.get(f"/api/vms/{cli_vm['vmId']}")).json()
        assert cli_now["state"] == "running"
        assert cli_vm["vmId"] in {v.vm_id for v in await server.runtime.list()}
        metrics = (await client.get("/metrics")).text
        assert "airlock_orphan_vms_reaped_total 0.0" in metrics
        assert "airlock_premature_vm_destructions_total 0.0" in metrics


LEASE_MS, MARGIN_MS = 2000, 1000


async def lease_ends_in_ms(server: Server, vm_id: str) -> int:
    async with AgentClient(*await server.runtime.open_agent(vm_id)) as agent:
        value = (await agent.ping())["lease_ends_in_ms"]
    assert isinstance(value, int)
    return value


async def test_kill9_and_never_back_browser_vms_end_themselves(server_factory: Any) -> None:
    """The controller is killed and does not come back: within lease + margin its browser
    VMs are gone, by themselves; its CLI VM is not. When a controller does come back, it
    records them destroyed with reason lease_expired, quietly (not lost)."""
    server: Server = server_factory(
        vm_lease_ms=LEASE_MS, vm_lease_margin_ms=MARGIN_MS, reconcile_interval_ms=500
    )
    server.start()
    token = server.cli("tokens", "create", "--user", "alice")
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=30) as client:
        cli_vm = (await client.post("/api/vms", json={"role": "cli"})).json()
        assert cli_vm["state"] == "running", cli_vm
        body = (await client.post("/api/auth/start", json={"provider": "oauth2"})).json()
        session_id, vm_id = body["sessionId"], body["vm"]["vmId"]
        await poll(client, f"/api/auth/session/{session_id}", "status", "awaiting_user")

    # Renewed by the controller (no longer its boot lease, which covers a whole boot).
    async def renewed() -> bool:
        return await lease_ends_in_ms(server, vm_id) <= LEASE_MS + MARGIN_MS

    await wait_for(renewed, timeout=15, interval=0.1, what="the controller renews the lease")

    server.kill9()
    killed_at = time.monotonic()
    assert {vm_id, cli_vm["vmId"]} <= {v.vm_id for v in await server.runtime.list()}

    async def ended() -> bool:
        return vm_id not in {v.vm_id for v in await server.runtime.list()}

    await wait_for(ended, timeout=(LEASE_MS + MARGIN_MS) / 1000 + 5, interval=0.1)
    gone_after = time.monotonic() - killed_at
    assert cli_vm["vmId"] in {v.vm_id for v in await server.runtime.list()}  # no lease

    server.start()
    async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=30) as client:
        vm = (await client.get(f"/api/vms/{vm_id}")).json()
        assert vm["state"] == "destroyed", vm
        assert vm["destroyReason"] == "lease_expired"
        session = (await client.get(f"/api/auth/session/{session_id}")).json()
        assert session["status"] == "failed"
        assert session["failureReason"].startswith("vm_lease_expired")
        cli_now = (await client.get(f"/api/vms/{cli_vm['vmId']}")).json()
        assert cli_now["state"] == "running"
        metrics = (await client.get("/metrics")).text
        assert "airlock_premature_vm_destructions_total 0.0" in metrics
        assert "airlock_orphan_vms_reaped_total 0.0" in metrics
    print(f"browser VM gone {gone_after:.2f} s after kill -9 (lease {LEASE_MS} + {MARGIN_MS} ms)")
