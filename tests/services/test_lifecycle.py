"""Every row of lifecycle.md's deadline table, with real sandboxes, on SQLite and PostgreSQL.

The VMs, their agents and the captures are real and take the time they take; the deadlines
and the loops' periods are on a ``ManualClock`` the test moves (``advance``), so a test
waits for no deadline on the wall. "Never early" is checked by moving the clock to just
before a deadline and looking at the runtime, then to the deadline itself; ``destroyed_at``
on the tombstone says it happened no earlier.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta

import pytest

from airlock.clock import ManualClock
from airlock.domain.sessions import SessionStatus
from airlock.domain.vms import VmState
from airlock.services.core import Core
from airlock.store.tables import Vm
from tests.lifecycle_helpers import (
    ACCESS_TOKEN,
    REFRESH_TOKEN,
    advance,
    finish_login,
    running_ids,
    token_response,
    wait_for,
)
from tests.services.conftest import CoreFactory

pytestmark = pytest.mark.sandbox


def metric(core: Core, name: str, **labels: str) -> float:
    value = core.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def start_session(core: Core, user: str = "alice") -> tuple[str, str]:
    session, vm = await core.sessions.start(user_id=user, provider_id="oauth2", actor="test")
    await wait_status(core, session.id, SessionStatus.AWAITING_USER)
    return session.id, vm.id


async def wait_status(
    core: Core, session_id: str, status: SessionStatus, timeout: float = 20
) -> None:
    async def reached() -> bool:
        session, _ = await core.sessions.get(session_id, None)
        if SessionStatus(session.status).terminal and session.status != status.value:
            raise AssertionError(f"session ended {session.status}: {session.failure_reason}")
        return session.status == status.value

    await wait_for(reached, timeout=timeout)


async def vm_row(core: Core, vm_id: str) -> Vm:
    return await core.vms.get(vm_id, None)


async def wait_vm_state(core: Core, vm_id: str, state: VmState, timeout: float = 20) -> Vm:
    async def reached() -> bool:
        return (await vm_row(core, vm_id)).state == state.value

    await wait_for(reached, timeout=timeout)
    return await vm_row(core, vm_id)


async def complete_login(core: Core) -> tuple[str, str, Vm]:
    session_id, vm_id = await start_session(core)
    await finish_login(core.runtime, vm_id)
    await wait_status(core, session_id, SessionStatus.COMPLETED)
    return session_id, vm_id, await vm_row(core, vm_id)


def seconds_until(clock: ManualClock, moment: datetime) -> float:
    return (moment - clock.now()).total_seconds()


async def test_completed_vm_lives_through_grace_then_goes(make_core: CoreFactory) -> None:
    clock = ManualClock()
    core = await make_core(clock=clock)
    session_id, vm_id, vm = await complete_login(core)
    assert vm.state == VmState.DRAINING.value
    session, _ = await core.sessions.get(session_id, None)
    assert session.completed_at is not None and vm.destroy_after is not None
    assert vm.destroy_after == session.completed_at + timedelta(milliseconds=1500)
    # Still there a millisecond before the deadline (never early) ...
    await advance(clock, seconds=seconds_until(clock, vm.destroy_after) - 0.001)
    assert (await vm_row(core, vm_id)).state == VmState.DRAINING.value
    assert vm_id in await running_ids(core.runtime)
    # ... and gone once it comes.
    await advance(clock, seconds=0.001)
    done = await wait_vm_state(core, vm_id, VmState.DESTROYED, timeout=5)
    assert done.destroyed_at is not None and done.destroyed_at >= vm.destroy_after
    assert done.destroy_reason == "grace_ended"
    assert vm_id not in await running_ids(core.runtime)


async def test_credentials_stored_encrypted_and_wiped_from_the_vm(
    make_core: CoreFactory,
) -> None:
    core = await make_core(grace_success_ms=10_000)
    session_id, vm_id, _ = await complete_login(core)
    credential = await core.sessions.credential(session_id)
    assert credential is not None
    assert ACCESS_TOKEN.encode() not in credential.ciphertext
    assert REFRESH_TOKEN.encode() not in credential.ciphertext
    if core.db.url.startswith("sqlite"):
        raw = b"".join(p.read_bytes() for p in core.settings.data_dir.glob("airlock.db*"))
        assert ACCESS_TOKEN.encode() not in raw and REFRESH_TOKEN.encode() not in raw
    # The file the login wrote is gone from the browser VM.
    from airlock.agent.client import AgentClient

    reader, writer = await core.runtime.open_agent(vm_id)
    agent = AgentClient(reader, writer)
    try:
        result = await agent.run(["sh", "-c", "ls -A $HOME/.airlock/oauth2/"], timeout_s=5)
    finally:
        await agent.close()
    assert result.exit_code == 0
    assert "tokens.json" not in result.stdout


async def test_keepalive_while_draining_extends_but_not_past_max_drain(
    make_core: CoreFactory,
) -> None:
    clock = ManualClock()
    core = await make_core(clock=clock, grace_success_ms=1000, max_drain_ms=3000)
    session_id, vm_id, vm = await complete_login(core)
    session, _ = await core.sessions.get(session_id, None)
    assert session.completed_at is not None
    cap = session.completed_at + timedelta(milliseconds=3000)
    deadlines = []
    for _ in range(8):  # keep "looking" every 0.4 s, past the cap
        await advance(clock, seconds=0.4)
        deadline = await core.sessions.keepalive(session_id, None)
        if deadline is None:
            break
        deadlines.append(deadline)
    assert deadlines[0] > vm.destroy_after  # extended
    assert max(deadlines) == cap  # but never past completed + max_drain
    done = await wait_vm_state(core, vm_id, VmState.DESTROYED, timeout=5)
    assert done.destroyed_at is not None and done.destroyed_at >= cap


async def test_complete_destroys_at_once_and_ten_calls_make_one_destroy(
    make_core: CoreFactory,
) -> None:
    core = await make_core(grace_success_ms=30_000)
    session_id, vm_id, _ = await complete_login(core)
    results = await asyncio.gather(
        *(core.sessions.complete(session_id, "alice", "user:alice") for _ in range(10))
    )
    # One call destroyed it; the others answered at once while it was being destroyed.
    states = [vm.state for _, vm in results if vm is not None]
    assert set(states) <= {VmState.DESTROYING.value, VmState.DESTROYED.value}
    assert VmState.DESTROYED.value in states
    assert (await vm_row(core, vm_id)).state == VmState.DESTROYED.value
    assert vm_id not in await running_ids(core.runtime)
    session, _ = await core.sessions.get(session_id, None)
    events = await core.sessions.events(session)
    destroyed = [e for e in events if e.to_state == VmState.DESTROYED.value]
    assert len(destroyed) == 1
    assert metric(core, "airlock_vm_destroys_total", role="browser", reason="completed") == 1


async def test_complete_before_the_login_ends_is_refused(make_core: CoreFactory) -> None:
    core = await make_core()
    session_id, vm_id = await start_session(core)
    from airlock.errors import Conflict

    with pytest.raises(Conflict):
        await core.sessions.complete(session_id, None, "test")
    assert (await vm_row(core, vm_id)).state == VmState.RUNNING.value


async def test_racing_complete_cancel_and_deadline_make_one_destroy(
    make_core: CoreFactory,
) -> None:
    clock = ManualClock()
    core = await make_core(clock=clock, grace_success_ms=300)
    session_id, vm_id, vm = await complete_login(core)
    assert vm.destroy_after is not None
    clock.advance(seconds=seconds_until(clock, vm.destroy_after))  # due, and not yet settled
    results = await asyncio.gather(
        core.sessions.complete(session_id, None, "user:alice"),
        core.sessions.cancel(session_id, None, "user:alice"),
        core.sessions.complete(session_id, None, "service:web"),
        core.scheduler.tick(),
        return_exceptions=True,
    )
    assert not [r for r in results if isinstance(r, BaseException)]
    done = await wait_vm_state(core, vm_id, VmState.DESTROYED, timeout=5)
    assert done.destroyed_at is not None
    session, _ = await core.sessions.get(session_id, None)
    assert session.status == SessionStatus.COMPLETED.value  # cancel after completion: no-op
    events = await core.sessions.events(session)
    assert len([e for e in events if e.to_state == VmState.DESTROYED.value]) == 1
    destroys = [
        s.value
        for family in core.metrics.destroys.collect()
        for s in family.samples
        if s.name == "airlock_vm_destroys_total"
    ]
    assert sum(destroys) == 1


async def test_cancel_destroys_now(
    make_core: CoreFactory, caplog: pytest.LogCaptureFixture
) -> None:
    core = await make_core()
    session_id, vm_id = await start_session(core)
    await asyncio.sleep(0.3)  # the capture watch is connected to the agent

    def watching() -> bool:
        return any(t.get_name() == f"core:watch:{session_id}" for t in asyncio.all_tasks())

    assert watching()
    session, vm = await core.sessions.cancel(session_id, "alice", "user:alice")
    assert session.status == SessionStatus.CANCELLED.value
    assert vm is not None and vm.state == VmState.DESTROYED.value
    assert vm.destroy_reason == "cancelled"
    assert vm_id not in await running_ids(core.runtime)
    again, _ = await core.sessions.cancel(session_id, "alice", "user:alice")  # idempotent
    assert again.status == SessionStatus.CANCELLED.value
    await wait_for(lambda: not watching(), timeout=10)
    # The watch saw its agent go with the VM and ended: expected, so no warning for the
    # operator.
    assert not [r for r in caplog.records if "agent unreachable" in r.getMessage()]


async def test_failure_destroys_after_grace_failure(make_core: CoreFactory) -> None:
    clock = ManualClock()
    core = await make_core(clock=clock, grace_failure_ms=800)
    session_id, vm_id = await start_session(core)
    # Complete JSON (the agent waits out half-written files) but not a token response.
    await finish_login(core.runtime, vm_id, b'{"access_token": 12}')
    await wait_status(core, session_id, SessionStatus.FAILED)
    session, vm = await core.sessions.get(session_id, None)
    assert session.failure_reason is not None
    assert session.failure_reason.startswith("capture_failed")
    assert vm is not None and vm.state == VmState.DRAINING.value
    assert vm.destroy_after is not None
    await advance(clock, seconds=seconds_until(clock, vm.destroy_after) - 0.001)
    assert vm_id in await running_ids(core.runtime)  # never early
    await advance(clock, seconds=0.001)
    done = await wait_vm_state(core, vm_id, VmState.DESTROYED, timeout=5)
    assert done.destroy_reason == "failed"
    assert vm.destroy_after is not None and done.destroyed_at is not None
    assert done.destroyed_at >= vm.destroy_after


async def test_failure_with_debug_keep_is_retained(make_core: CoreFactory) -> None:
    clock = ManualClock()
    core = await make_core(clock=clock, debug_keep_failed_vms=True, debug_retention_ms=0)
    session_id, vm_id = await start_session(core)
    await finish_login(core.runtime, vm_id, token_response(access_token=None))
    await wait_status(core, session_id, SessionStatus.FAILED)
    vm = await vm_row(core, vm_id)
    assert vm.state == VmState.RETAINED.value and vm.destroy_after is None
    for _ in range(2):  # two reconcile rounds, each over: a retained VM is not an orphan
        await advance(clock, seconds=0.5)
    assert vm_id in await running_ids(core.runtime)
    assert (await vm_row(core, vm_id)).state == VmState.RETAINED.value
    deleted = await core.vms.delete(vm_id, user_id="alice", actor="user:alice")
    assert deleted.state == VmState.DESTROYED.value and deleted.destroy_reason == "owner_delete"


async def test_login_deadline_expires_the_session(make_core: CoreFactory) -> None:
    clock = ManualClock()
    core = await make_core(clock=clock, login_timeout_ms=2500)
    session_id, vm_id = await start_session(core)
    await advance(clock, seconds=2.499)  # never early
    session, _ = await core.sessions.get(session_id, None)
    assert session.status == SessionStatus.AWAITING_USER.value
    assert vm_id in await running_ids(core.runtime)
    await advance(clock, seconds=0.001)
    await wait_status(core, session_id, SessionStatus.EXPIRED, timeout=10)
    done = await wait_vm_state(core, vm_id, VmState.DESTROYED, timeout=5)
    assert done.destroy_reason == "login_timeout"
    session, _ = await core.sessions.get(session_id, None)
    assert session.failure_reason == "login_timeout"


async def test_sandbox_started_behind_the_databases_back_is_reaped(
    make_core: CoreFactory,
) -> None:
    clock = ManualClock()
    core = await make_core(clock=clock, reconcile_interval_ms=500)
    from airlock.domain.vms import VmRole
    from airlock.runtimes.base import VmSpec

    await core.runtime.create(VmSpec(vm_id="vm-0rphan", role=VmRole.CLI, user_id="nobody"))
    assert "vm-0rphan" in await running_ids(core.runtime)
    # The next reconcile round (one period on) reaps it: gone, and counted, once it is over.
    await advance(clock, seconds=0.5)
    assert await _gone(core, "vm-0rphan")
    assert metric(core, "airlock_orphan_vms_reaped_total") == 1


async def _gone(core: Core, vm_id: str) -> bool:
    return vm_id not in await running_ids(core.runtime)


async def test_sandbox_killed_behind_its_back_becomes_lost(make_core: CoreFactory) -> None:
    clock = ManualClock()
    core = await make_core(clock=clock, reconcile_interval_ms=500)
    session_id, vm_id = await start_session(core)
    running = {vm.vm_id: vm for vm in await core.runtime.list()}
    pid = running[vm_id].pid
    assert pid is not None
    import os
    import signal

    os.kill(pid, signal.SIGKILL)
    await wait_for(lambda: _gone(core, vm_id), timeout=5)
    await advance(clock, seconds=0.5)  # the next reconcile round finds it gone
    vm = await vm_row(core, vm_id)
    assert vm.state == VmState.LOST.value
    assert vm.destroy_reason == "vanished"
    session, _ = await core.sessions.get(session_id, None)
    assert session.status == SessionStatus.FAILED.value
    assert session.failure_reason is not None and session.failure_reason.startswith("vm_lost")
    assert metric(core, "airlock_premature_vm_destructions_total") == 1


async def test_cli_vm_has_no_deadline_and_survives_reconciles(make_core: CoreFactory) -> None:
    clock = ManualClock()
    core = await make_core(clock=clock, reconcile_interval_ms=300)
    vm = await core.vms.create_cli(user_id="alice", actor="user:alice")
    assert vm.state == VmState.RUNNING.value and vm.destroy_after is None
    for _ in range(3):  # three reconcile rounds, each over
        await advance(clock, seconds=0.3)
    assert (await vm_row(core, vm.id)).state == VmState.RUNNING.value
    assert vm.id in await running_ids(core.runtime)
    gone = await core.vms.delete(vm.id, user_id="alice", actor="user:alice")
    assert gone.state == VmState.DESTROYED.value


async def test_two_hosts_on_one_database_leave_each_others_vms_alone(
    make_core: CoreFactory,
) -> None:
    """Scale-out: host b's reconciler does not list host a's VMs, and must not call them
    lost; host b's scheduler must not try to destroy them."""
    clock = ManualClock()  # one time for both hosts, as NTP gives them
    a = await make_core(clock=clock, node="a", grace_success_ms=1500)
    b = await make_core(clock=clock, node="b", reconcile_interval_ms=300)
    _, vm_id, vm = await complete_login(a)
    for _ in range(3):  # several of b's reconcile rounds during a's grace period
        await advance(clock, seconds=0.3)
    assert (await vm_row(b, vm_id)).state == VmState.DRAINING.value
    assert metric(b, "airlock_premature_vm_destructions_total") == 0
    assert vm.destroy_after is not None
    await advance(clock, seconds=seconds_until(clock, vm.destroy_after))
    done = await wait_vm_state(a, vm_id, VmState.DESTROYED, timeout=5)
    assert vm.destroy_after is not None and done.destroyed_at is not None
    assert done.destroyed_at >= vm.destroy_after
    assert metric(a, "airlock_vm_destroys_total", role="browser", reason="grace_ended") == 1
    assert metric(b, "airlock_vm_destroys_total", role="browser", reason="grace_ended") == 0
