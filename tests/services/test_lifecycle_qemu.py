"""The lifecycle rows that depend on the runtime, on the ``qemu`` runtime: real QEMU guests
(the minimal image, under TCG where KVM cannot run a stock kernel) behind a real Core.

The minimal image has no screen: its browser VMs run the login headless, which is all the
lifecycle needs (``finish_login`` completes the capture through the real agent). SQLite
only: the database side of these rows runs on both databases in ``test_lifecycle.py``;
here a boot costs seconds under TCG, so each VM earns its keep.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from airlock.clock import Clock, ManualClock
from airlock.domain.sessions import SessionStatus
from airlock.domain.vms import VmRole, VmState
from airlock.runtimes.base import VmSpec
from airlock.runtimes.qemu import QemuRuntime
from airlock.services.core import Core
from airlock.settings import Settings
from tests.lifecycle_helpers import advance, finish_login, loops_asleep, running_ids, wait_for
from tests.qemu_image import image_dir, minimal_image
from tests.services.conftest import FAST, CoreFactory
from tests.services.test_lifecycle import metric, vm_row, wait_status, wait_vm_state

# A test may build the image first (make test builds it before pytest; plain pytest may not).
pytestmark = [pytest.mark.qemu, pytest.mark.timeout(900)]

BOOT_S = 90.0  # under TCG on a loaded 2-core machine
MINIMAL = {VmRole.BROWSER: "minimal", VmRole.CLI: "minimal"}


def qemu_runtime(data_dir: Path) -> QemuRuntime:
    return QemuRuntime(data_dir / "vms", image_dir(), flavors=MINIMAL, boot_timeout_s=BOOT_S)


@pytest.fixture
async def make_core(tmp_path: Path) -> AsyncIterator[CoreFactory]:
    minimal_image()
    cores: list[Core] = []
    data_dir = tmp_path / "data"

    async def factory(clock: Clock | None = None, **overrides: Any) -> Core:
        settings = Settings(
            _env_file=None,
            data_dir=data_dir,
            database_url=f"sqlite+aiosqlite:///{tmp_path / 'airlock.db'}",
            demo_idp_port=4999,
            node_name="node-q",
            runtime="qemu",
            vm_boot_timeout_ms=int(BOOT_S * 1000),
            **{**FAST, **overrides},
        )
        core = Core(settings, demo=True, runtime=qemu_runtime(data_dir), clock=clock)
        cores.append(core)
        await core.start()
        await loops_asleep(core.clock)
        return core

    yield factory
    for core in cores:
        await core.close()
    leftover = qemu_runtime(data_dir)
    for vm in await leftover.list():
        await leftover.destroy(vm.vm_id)
    assert await leftover.list() == []


async def start_session(core: Core) -> tuple[str, str]:
    session, vm = await core.sessions.start(user_id="alice", provider_id="oauth2", actor="test")
    await wait_status(core, session.id, SessionStatus.AWAITING_USER, timeout=BOOT_S)
    return session.id, vm.id


async def test_grace_then_complete_then_crash_and_restart(make_core: CoreFactory) -> None:
    """Grace: a completed VM lives through its grace period. Complete: the frontend's
    complete destroys it at once. Crash-and-restart: a new controller on the same data dir
    adopts a draining VM and destroys it on its deadline, not before. The deadline is on a
    ManualClock both controllers share (as two processes share the host's clock)."""
    clock = ManualClock()
    core = await make_core(clock=clock, grace_success_ms=4000)
    session_id, vm_id = await start_session(core)
    assert (await vm_row(core, vm_id)).detail["accel"] in ("kvm", "tcg")
    await finish_login(core.runtime, vm_id)
    await wait_status(core, session_id, SessionStatus.COMPLETED, timeout=20)
    vm = await vm_row(core, vm_id)
    assert vm.state == VmState.DRAINING.value and vm.destroy_after is not None
    session, _ = await core.sessions.get(session_id, None)
    assert session.completed_at is not None
    assert vm.destroy_after == session.completed_at + timedelta(milliseconds=4000)

    # The controller dies (its VMs do not) and a new one starts on the same data dir.
    await core.close()
    assert vm_id in await running_ids(qemu_runtime(core.settings.data_dir))
    core2 = await make_core(clock=clock, grace_success_ms=4000)
    await wait_for(lambda: _listed(core2, vm_id), timeout=5)
    await advance(clock, seconds=(vm.destroy_after - clock.now()).total_seconds() - 0.001)
    assert vm_id in await running_ids(core2.runtime)  # never early
    assert (await vm_row(core2, vm_id)).state == VmState.DRAINING.value
    await advance(clock, seconds=0.001)
    done = await wait_vm_state(core2, vm_id, VmState.DESTROYED, timeout=15)
    assert done.destroyed_at is not None and done.destroyed_at >= vm.destroy_after
    assert done.destroy_reason == "grace_ended"
    assert vm_id not in await running_ids(core2.runtime)

    # Complete: a second login; complete destroys at once, ten calls make one destroy.
    session_id, vm_id = await start_session(core2)
    await finish_login(core2.runtime, vm_id)
    await wait_status(core2, session_id, SessionStatus.COMPLETED, timeout=20)
    results = await asyncio.gather(
        *(core2.sessions.complete(session_id, "alice", "user:alice") for _ in range(10))
    )
    states = [vm.state for _, vm in results if vm is not None]
    assert VmState.DESTROYED.value in states
    assert (await vm_row(core2, vm_id)).state == VmState.DESTROYED.value
    assert vm_id not in await running_ids(core2.runtime)
    session, _ = await core2.sessions.get(session_id, None)
    events = await core2.sessions.events(session)
    assert len([e for e in events if e.to_state == VmState.DESTROYED.value]) == 1


async def _listed(core: Core, vm_id: str) -> bool:
    return vm_id in await running_ids(core.runtime)


async def test_orphan_reaped_and_killed_vm_lost(make_core: CoreFactory, tmp_path: Path) -> None:
    # Orphan: a VM the database never heard of (booted before the controller starts, since
    # a VM without a row is reaped even while it boots) goes within a period or so.
    await qemu_runtime(tmp_path / "data").create(
        VmSpec(vm_id="vm-0rphan", role=VmRole.CLI, user_id="nobody")
    )
    core = await make_core(reconcile_interval_ms=500)
    took = await wait_for(lambda: _gone(core, "vm-0rphan"), timeout=15)
    assert took < 0.5 + 5.0, f"orphan reaped after {took:.2f} s"

    async def counted() -> bool:  # the count follows the destroy's return, after the kill
        return metric(core, "airlock_orphan_vms_reaped_total") == 1

    await wait_for(counted, timeout=10)
    # Lost: a session's VM killed behind the controller's back.
    session_id, vm_id = await start_session(core)
    running = {vm.vm_id: vm for vm in await core.runtime.list()}
    pid = running[vm_id].pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    vm = await wait_vm_state(core, vm_id, VmState.LOST, timeout=10)
    assert vm.destroy_reason == "vanished"
    session, _ = await core.sessions.get(session_id, None)
    assert session.status == SessionStatus.FAILED.value
    assert metric(core, "airlock_premature_vm_destructions_total") == 1


async def _gone(core: Core, vm_id: str) -> bool:
    return vm_id not in await running_ids(core.runtime)
