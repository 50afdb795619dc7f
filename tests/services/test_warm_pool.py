"""The warm pool with real sandboxes, on SQLite and PostgreSQL: it fills to N, a start takes
a warm VM (and answers ``awaiting_user`` at once), the pool refills, two concurrent starts
never share a VM, old warm VMs are retired at their maximum age, and a restarted controller
adopts the pool instead of booting a new one. The boots are real; the pool's maximum age and
its rounds are on a ``ManualClock`` the test moves where the test is about them."""

from __future__ import annotations

import asyncio

import pytest

from airlock.clock import ManualClock
from airlock.domain.sessions import SessionStatus
from airlock.domain.vms import DestroyReason, VmState
from airlock.errors import Unavailable
from airlock.services.core import Core
from airlock.services.warm_pool import CHECK_INTERVAL_S
from tests.lifecycle_helpers import advance, finish_login, running_ids, wait_for
from tests.services.conftest import CoreFactory

pytestmark = pytest.mark.sandbox


async def warm_ids(core: Core, *states: VmState) -> set[str]:
    async with core.db.transaction() as repo:
        rows = await repo.warm_vms(states or (VmState.RUNNING,))
    return {vm.id for vm in rows}


async def pool_ready(core: Core, size: int) -> set[str]:
    async def full() -> bool:
        return len(await warm_ids(core)) == size

    await wait_for(full, timeout=30)
    return await warm_ids(core)


async def test_start_takes_a_warm_vm_then_the_pool_refills(make_core: CoreFactory) -> None:
    core = await make_core(warm_pool=1)
    pool = await pool_ready(core, 1)
    assert pool <= await running_ids(core.runtime)

    session, vm = await core.sessions.start(user_id="alice", provider_id="oauth2", actor="test")

    assert vm.id in pool
    assert session.status == SessionStatus.AWAITING_USER.value  # in the start's own answer
    row = await core.vms.get(vm.id, "alice")  # the VM is now alice's, no longer warm
    assert not row.warm and row.state == VmState.RUNNING.value
    assert row.destroy_reason == DestroyReason.LOGIN_TIMEOUT.value
    refilled = await pool_ready(core, 1)
    assert vm.id not in refilled
    # The claimed VM is an ordinary session VM: the capture completes the session.
    await finish_login(core.runtime, vm.id)

    async def completed() -> bool:
        s, _ = await core.sessions.get(session.id, None)
        return s.status == SessionStatus.COMPLETED.value

    await wait_for(completed)


async def test_concurrent_starts_never_share_a_warm_vm(make_core: CoreFactory) -> None:
    core = await make_core(warm_pool=1)
    pool = await pool_ready(core, 1)
    results = await asyncio.gather(
        *(
            core.sessions.start(user_id=user, provider_id="oauth2", actor="test")
            for user in ("alice", "bob")
        )
    )
    vm_ids = [vm.id for _, vm in results]
    assert len(set(vm_ids)) == 2
    assert len(pool & set(vm_ids)) == 1  # one took the warm VM, the other booted cold
    cold = next(s for s, vm in results if vm.id not in pool)
    assert cold.status == SessionStatus.INITIALIZING.value

    async def both_ready() -> bool:
        rows = [await core.sessions.get(s.id, None) for s, _ in results]
        return all(s.status == SessionStatus.AWAITING_USER.value for s, _ in rows)

    await wait_for(both_ready, timeout=30)


async def test_warm_vms_retire_at_max_age_and_are_replaced(make_core: CoreFactory) -> None:
    clock = ManualClock()
    core = await make_core(clock=clock, warm_pool=1, warm_pool_max_age_ms=2500)
    first = await pool_ready(core, 1)
    (old,) = first
    await advance(clock, seconds=2.499)  # never before its maximum age
    assert old in await running_ids(core.runtime) and await warm_ids(core) == {old}
    await advance(clock, seconds=0.001)

    async def retired() -> bool:
        return (await core.vms.get(old, None)).state == VmState.DESTROYED.value

    await wait_for(retired, timeout=30)
    await advance(clock, seconds=CHECK_INTERVAL_S)  # the pool's next round replaces it
    new = await pool_ready(core, 1)
    assert old not in new
    tomb = await core.vms.get(old, None)
    assert tomb.destroy_reason == DestroyReason.WARM_RETIRED.value
    assert tomb.destroyed_at is not None and tomb.destroy_after is not None
    assert tomb.destroyed_at >= tomb.destroy_after  # never before its maximum age
    assert old not in await running_ids(core.runtime)
    # Retired by its deadline, not reaped by the reconciler as an orphan or lost VM.
    assert core.metrics.registry.get_sample_value("airlock_orphan_vms_reaped_total") == 0
    assert core.metrics.registry.get_sample_value("airlock_premature_vm_destructions_total") == 0


async def test_a_restarted_controller_adopts_the_pool(make_core: CoreFactory) -> None:
    first = await make_core(warm_pool=1)
    pool = await pool_ready(first, 1)
    await first.close()  # the VMs outlive the controller
    assert pool <= await running_ids(first.runtime)

    clock = ManualClock()
    second = await make_core(clock=clock, warm_pool=1)
    report = await second.reconciler.reconcile_once()
    assert report.actions == []  # a live row: not an orphan
    for _ in range(2):  # two pool rounds, each over
        await advance(clock, seconds=CHECK_INTERVAL_S)
    assert await warm_ids(second, VmState.CREATING, VmState.RUNNING) == pool  # no new boot
    session, vm = await second.sessions.start(user_id="bob", provider_id="oauth2", actor="test")
    assert vm.id in pool and session.status == SessionStatus.AWAITING_USER.value


async def test_warm_vms_count_toward_the_vm_limit(make_core: CoreFactory) -> None:
    clock = ManualClock()
    core = await make_core(clock=clock, warm_pool=3, max_concurrent_vms=2)
    await pool_ready(core, 2)  # not 3: the limit holds for the pool too
    await advance(clock, seconds=CHECK_INTERVAL_S)  # a pool round over: it stays at 2
    assert len(await warm_ids(core, VmState.CREATING, VmState.RUNNING)) == 2
    for user in ("alice", "bob"):  # each takes a warm VM; the pool may not refill past 2
        _, vm = await core.sessions.start(user_id=user, provider_id="oauth2", actor="test")
        assert vm.id in await running_ids(core.runtime)
    assert await warm_ids(core, VmState.CREATING, VmState.RUNNING) == set()
    with pytest.raises(Unavailable) as full:
        await core.sessions.start(user_id="carol", provider_id="oauth2", actor="test")
    assert full.value.code == "at_capacity"
    assert len(await running_ids(core.runtime)) == 2
