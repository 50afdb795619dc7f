"""Booting a VM row and recording how it went, when a destroy wins the race against the
boot (an owner's delete, the scheduler): real sandboxes, on SQLite and PostgreSQL.

The boot's own record loses cleanly: the row keeps the winner's tombstone, the caller gets
a clear error (or, for the warm pool, None), never ``IllegalTransition``, and nothing the
boot started is left running.
"""

from __future__ import annotations

import asyncio

import pytest

from airlock.domain.vms import DestroyReason, VmRole, VmState
from airlock.errors import AirlockError, Conflict, RuntimeFailure
from airlock.runtimes.base import VmSpec
from airlock.services.core import Core
from airlock.services.vm_boot import BootFailed, VmBooter, add_vm, new_vm
from airlock.store.tables import Vm
from tests.lifecycle_helpers import running_ids, wait_for
from tests.services.conftest import CoreFactory

pytestmark = pytest.mark.sandbox


async def cli_row(core: Core, user_id: str = "alice") -> Vm:
    """A CLI VM row as ``create_cli`` adds it, before its boot."""
    vm = new_vm(role=VmRole.CLI, runtime=core.runtime.name, user_id=user_id, now=core.clock.now())
    async with core.db.transaction() as repo:
        add_vm(repo, vm, cause="created", actor="test")
    return vm


def booter(core: Core, boot_timeout: float) -> VmBooter:
    return VmBooter(
        db=core.db,
        runtime=core.runtime,
        clock=core.clock,
        metrics=core.metrics,
        boot_timeout=boot_timeout,
    )


async def test_a_failed_boot_after_a_delete_won_keeps_the_deletes_tombstone(
    make_core: CoreFactory,
) -> None:
    """The boot fails after the owner's delete took the row: the boot's record is a lost
    race, reported as the boot's failure, and the tombstone is the delete's."""
    core = await make_core(start=False)  # no reconciler: it would reap the boot as an orphan
    vm = await cli_row(core)
    assert await core.scheduler.destroy_now(vm.id, reason=DestroyReason.OWNER_DELETE, actor="o")
    assert vm.state == VmState.CREATING.value  # the boot's copy: read before the delete

    spec = VmSpec(vm_id=vm.id, role=VmRole.CLI, user_id="alice")
    with pytest.raises(BootFailed) as failed:
        # No time at all to boot in: the boot fails, as a hung one would at its timeout.
        await booter(core, 0.0).boot_and_record(vm, spec, source="cold", actor="test")
    assert isinstance(failed.value.cause, TimeoutError)

    row = await core.vms.get(vm.id, None)
    assert row.state == VmState.DESTROYED.value
    assert row.destroy_reason == DestroyReason.OWNER_DELETE.value
    assert row.last_error is None  # the boot's error did not overwrite the winner's record

    # A create cut off by its timeout may still start its VM a moment after the boot gave up
    # (a step that ran in a thread); then the reconciler, which is what keeps a destroyed
    # row from leaving anything running, reaps it.
    async def nothing_runs() -> bool:
        if vm.id not in await running_ids(core.runtime):
            return True
        await core.reconciler.reconcile_once()
        return False

    await wait_for(nothing_runs, timeout=30, what="the failed boot's VM gone")


async def test_a_boot_that_ends_after_a_delete_won_leaves_nothing_running(
    make_core: CoreFactory,
) -> None:
    """The boot succeeds after the row was destroyed: not recorded as running, and the VM
    the boot started is destroyed again (the delete ran before it existed)."""
    core = await make_core(start=False)  # no reconciler: it would reap the boot as an orphan
    vm = await cli_row(core)
    assert await core.scheduler.destroy_now(vm.id, reason=DestroyReason.OWNER_DELETE, actor="o")

    spec = VmSpec(vm_id=vm.id, role=VmRole.CLI, user_id="alice")
    assert await booter(core, 60.0).boot_and_record(vm, spec, source="cold", actor="t") is None

    row = await core.vms.get(vm.id, None)
    assert row.state == VmState.DESTROYED.value
    assert row.running_at is None
    assert vm.id not in await running_ids(core.runtime)


async def test_deleting_a_cli_vm_while_it_boots_is_a_clear_error(
    make_core: CoreFactory,
) -> None:
    """``POST /api/vms`` racing ``DELETE``: the create answers a clear error (the boot was
    cut off, or the VM was destroyed under it), never ``IllegalTransition``."""
    core = await make_core()
    create = asyncio.create_task(core.vms.create_cli(user_id="alice", actor="alice"))

    async def booting() -> bool:
        return bool(await core.vms.list("alice", state=VmState.CREATING.value)) or create.done()

    await wait_for(booting, interval=0.005)
    [vm] = await core.vms.list("alice")
    deleted = await core.vms.delete(vm.id, user_id="alice", actor="alice")
    assert deleted.state == VmState.DESTROYED.value

    try:
        created = await create
    except AirlockError as exc:
        assert isinstance(exc, (RuntimeFailure, Conflict)), exc
        assert exc.code in ("runtime_failure", "vm_destroyed"), exc.code
    else:  # only if the boot was done before the delete came: the delete simply won after
        assert created.id == vm.id
    row = await core.vms.get(vm.id, None)
    assert row.state == VmState.DESTROYED.value
    assert row.destroy_reason == DestroyReason.OWNER_DELETE.value
    assert vm.id not in await running_ids(core.runtime)
