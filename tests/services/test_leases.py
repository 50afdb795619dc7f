"""A VM that ends itself: real sandboxes, real agents, on SQLite and PostgreSQL.

While a controller runs, it renews every browser VM's lease (warm ones too); when no
controller is left, each browser VM ends itself within lease + margin, and the controller
that comes back records ``destroyed`` with reason ``lease_expired``, not ``lost``. CLI VMs
have no lease. A VM that vanishes *before* its lease ran out is still ``lost``.
"""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta

import pytest

from airlock.agent.client import AgentClient
from airlock.domain.sessions import SessionStatus
from airlock.domain.vms import VmState
from airlock.services.core import Core
from tests.lifecycle_helpers import running_ids, wait_for
from tests.services.conftest import CoreFactory
from tests.services.test_lifecycle import metric, start_session, vm_row, wait_vm_state

pytestmark = pytest.mark.sandbox

SHORT = {"vm_lease_ms": 1500, "vm_lease_margin_ms": 1000, "vm_boot_timeout_ms": 30_000}
LEASE_AND_MARGIN_S = 2.5


async def lease_ends_in_ms(core: Core, vm_id: str) -> int:
    async with AgentClient(*await core.runtime.open_agent(vm_id)) as agent:
        value = (await agent.ping())["lease_ends_in_ms"]
    assert isinstance(value, int)
    return value


async def wait_renewed(core: Core, vm_id: str) -> None:
    """Until the VM holds a renewed lease, not its boot lease (boot time + lease)."""

    async def renewed() -> bool:
        return await lease_ends_in_ms(core, vm_id) <= 2500

    await wait_for(renewed, timeout=10)


async def test_a_running_controller_keeps_renewing_its_browser_vms(
    make_core: CoreFactory,
) -> None:
    core = await make_core(**SHORT)
    _, vm_id = await start_session(core)
    assert (await vm_row(core, vm_id)).guest_lease_until is not None
    await wait_renewed(core, vm_id)
    # Watch it for three times lease + margin: it lives on, and each renewal moved the
    # lease the row records (and the VM's own) forward.
    recorded = set()
    until = time.monotonic() + 3 * LEASE_AND_MARGIN_S
    while time.monotonic() < until:
        row = await vm_row(core, vm_id)
        assert row.state == VmState.RUNNING.value
        assert vm_id in await running_ids(core.runtime)
        ends_in = await lease_ends_in_ms(core, vm_id)
        assert 0 < ends_in <= 2500
        # The row never promises more life than the VM has (else a VM that ended itself
        # would be taken for a lost one).
        assert row.guest_lease_until is not None
        assert row.guest_lease_until <= core.clock.now() + timedelta(milliseconds=ends_in + 50)
        recorded.add(row.guest_lease_until)
        await asyncio.sleep(0.3)
    assert len(recorded) >= 5
    assert core.leases.failures == 0


async def test_with_no_controller_browser_vms_end_themselves_and_the_next_one_says_why(
    make_core: CoreFactory,
) -> None:
    core = await make_core(**SHORT)
    session_id, vm_id = await start_session(core)
    cli = await core.vms.create_cli(user_id="alice", actor="user:alice")
    await wait_renewed(core, vm_id)  # no longer its boot lease (boot time + lease)
    await core.close()  # the controller is gone; its VMs run on (they outlive it)
    gone_at = time.monotonic()
    assert {vm_id, cli.id} <= await running_ids(core.runtime)

    async def ended() -> bool:
        return vm_id not in await running_ids(core.runtime)

    took = await wait_for(ended, timeout=LEASE_AND_MARGIN_S + 10, interval=0.1)
    assert took <= LEASE_AND_MARGIN_S + 3  # within lease + margin (+ a slow machine's second)
    assert time.monotonic() - gone_at >= 1.0  # not before its lease (renewed up to the close)
    assert cli.id in await running_ids(core.runtime)  # a CLI VM has no lease

    # The controller comes back: it finds the browser VM gone and says why, quietly.
    again = await make_core(**SHORT)
    vm = await vm_row(again, vm_id)
    assert vm.state == VmState.DESTROYED.value
    assert vm.destroy_reason == "lease_expired"
    assert metric(again, "airlock_premature_vm_destructions_total") == 0
    session, _ = await again.sessions.get(session_id, None)
    assert session.status == SessionStatus.FAILED.value
    assert session.failure_reason is not None
    assert session.failure_reason.startswith("vm_lease_expired")
    assert (await vm_row(again, cli.id)).state == VmState.RUNNING.value
    await again.vms.delete(cli.id, user_id="alice", actor="user:alice")


async def test_warm_pool_vms_are_leased_too(make_core: CoreFactory) -> None:
    core = await make_core(warm_pool=1, **SHORT)

    async def warm_running() -> bool:
        rows = await core.vms.list(None)
        return any(r.warm and r.state == VmState.RUNNING.value for r in rows)

    await wait_for(warm_running, timeout=30)
    [warm] = [r for r in await core.vms.list(None) if r.warm]
    await wait_renewed(core, warm.id)
    await core.close()

    async def ended() -> bool:
        return warm.id not in await running_ids(core.runtime)

    await wait_for(ended, timeout=LEASE_AND_MARGIN_S + 10, interval=0.1)


async def test_a_vm_that_vanished_before_its_lease_ran_out_is_still_lost(
    make_core: CoreFactory,
) -> None:
    core = await make_core(reconcile_interval_ms=300, vm_lease_ms=60_000)
    session_id, vm_id = await start_session(core)
    await core.runtime.destroy(vm_id)  # behind the controller's back
    vm = await wait_vm_state(core, vm_id, VmState.LOST, timeout=10)
    assert vm.destroy_reason == "vanished"
    assert metric(core, "airlock_premature_vm_destructions_total") == 1
    session, _ = await core.sessions.get(session_id, None)
    assert session.failure_reason is not None and session.failure_reason.startswith("vm_lost")
