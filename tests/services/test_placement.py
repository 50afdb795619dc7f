"""Placement across nodes (issue 13): any controller places a VM on a node with room; that
node claims and boots it exactly once; a node that is full when it claims hands the VM back
for another; with nowhere left the start is refused with 503 and ``Retry-After``. Real
controllers on one database (SQLite and PostgreSQL), real sandboxes."""

from __future__ import annotations

import pytest

from airlock.domain.nodes import NodeState
from airlock.domain.sessions import SessionStatus
from airlock.domain.vms import VmState
from airlock.errors import TooManyRequests, Unavailable
from airlock.services.core import Core
from tests.lifecycle_helpers import running_ids, wait_for
from tests.services.conftest import CoreFactory

NODES = {"node_heartbeat_ms": 200, "node_lease_ms": 3000, "node_grace_ms": 60_000}


async def _events(core: Core, vm_id: str) -> list[str]:
    async with core.db.read() as repo:
        return [e.cause for e in await repo.events_for_session("-", [vm_id])]


async def test_a_cli_vm_placed_on_another_node_is_booted_there_once(
    make_core: CoreFactory,
) -> None:
    a = await make_core(node="a", **NODES)
    b = await make_core(node="b", **NODES)
    await a.nodes.set_intent("node-a", NodeState.DRAINING, actor="test")
    vm = await a.vms.create_cli(user_id="alice", actor="user:alice")
    assert vm.node == "node-b" and vm.state == VmState.RUNNING.value
    assert vm.id in await running_ids(b.runtime)
    assert vm.id not in await running_ids(a.runtime)
    assert (await _events(a, vm.id)).count("booted") == 1
    # Cores without an HTTP server cannot relay the destroy: the row is made due now, and
    # its holder's scheduler destroys it (what a holder out of reach gets, too).
    await a.vms.delete(vm.id, user_id="alice", actor="user:alice")
    await wait_for(lambda: _destroyed(b, vm.id), timeout=15)
    assert vm.id not in await running_ids(b.runtime)


async def test_a_node_full_when_it_claims_hands_the_vm_back(make_core: CoreFactory) -> None:
    """node-b's row claims room it does not have (a stale registration): it claims the VM,
    finds itself full, and hands it back; node-a boots it."""
    a = await make_core(node="a", **NODES)
    b = await make_core(node="b", max_concurrent_cli_vms=1, **NODES)
    await a.nodes.set_intent("node-a", NodeState.DRAINING, actor="test")
    first = await a.vms.create_cli(user_id="alice", actor="user:alice")
    assert first.node == "node-b"
    async with a.db.transaction() as repo:
        await repo.set_node("node-b", cli_capacity=10)
    await a.nodes.set_intent("node-a", NodeState.ACTIVE, actor="test")
    # node-b looks freer (9 of 10) than node-a (64 of 64 is more, so rig a down to 3).
    async with a.db.transaction() as repo:
        await repo.set_node("node-a", cli_capacity=3)
    second = await a.vms.create_cli(user_id="alice", actor="user:alice")
    assert second.node == "node-a" and second.state == VmState.RUNNING.value
    assert second.detail.get("placed_on") == ["node-b"]
    assert "handed_back" in await _events(a, second.id)
    assert second.id in await running_ids(a.runtime)
    assert second.id not in await running_ids(b.runtime)


async def test_nowhere_to_place_is_503_with_retry_after_and_changes_nothing(
    make_core: CoreFactory,
) -> None:
    a = await make_core(node="a", max_concurrent_cli_vms=1, **NODES)
    b = await make_core(node="b", max_concurrent_cli_vms=1, user_max_cli_vms=1, **NODES)
    vms = [await a.vms.create_cli(user_id=u, actor=f"user:{u}") for u in ("alice", "bob")]
    assert {vm.node for vm in vms} == {"node-a", "node-b"}  # one each: the free one wins
    async with a.db.read() as repo:
        before = len(await repo.vms())
    with pytest.raises(Unavailable) as refused:
        await b.vms.create_cli(user_id="carol", actor="user:carol")
    assert refused.value.code == "at_capacity" and refused.value.retry_after
    async with a.db.read() as repo:
        assert len(await repo.vms()) == before
    # A user's own limit (across nodes: alice's VM is on one of them) is still a 429.
    with pytest.raises(TooManyRequests):
        await b.vms.create_cli(user_id="alice", actor="user:alice")


async def test_logins_land_only_on_active_nodes_and_boot_on_their_node(
    make_core: CoreFactory,
) -> None:
    a = await make_core(node="a", **NODES)
    b = await make_core(node="b", **NODES)
    c = await make_core(node="c", **NODES)
    await a.nodes.set_intent("node-c", NodeState.DRAINING, actor="test")
    started = [
        await core.sessions.start(user_id=f"u{i}", provider_id="oauth2", actor="test")
        for i, core in enumerate((a, b, c, a))
    ]
    placed = {vm.node for _, vm in started}
    assert placed <= {"node-a", "node-b"}
    by_name = {"node-a": a, "node-b": b}

    async def all_awaiting() -> bool:
        for session, _ in started:
            got, _vm = await a.sessions.get(session.id, None)
            if got.status != SessionStatus.AWAITING_USER.value:
                return False
        return True

    await wait_for(all_awaiting, timeout=90)
    for _session, vm in started:
        assert vm.id in await running_ids(by_name[vm.node].runtime)
    assert await running_ids(c.runtime) == set()
    for session, _vm in started:
        await a.sessions.cancel(session.id, None, actor="test")
    for _session, vm in started:
        await wait_for(lambda vm=vm: _destroyed(a, vm.id), timeout=30)


async def _destroyed(core: Core, vm_id: str) -> bool:
    return (await core.vms.get(vm_id, None)).state == VmState.DESTROYED.value


async def test_a_node_whose_boot_fails_hands_the_login_back_and_another_boots_it(
    make_core: CoreFactory,
) -> None:
    """node-b is chosen (it looks freer) but cannot boot a browser VM (its Chromium is
    gone): it hands the row back, node-a boots it, and the person's login goes on there;
    nothing of it stays on b."""
    a = await make_core(node="a", **NODES)
    b = await make_core(node="b", **NODES)
    b.runtime.chromium = "/nonexistent/chromium"  # type: ignore[attr-defined]  # sandbox's
    async with a.db.transaction() as repo:
        await repo.set_node("node-a", browser_capacity=3)  # b (0 of 64) is the freer one
    session, vm = await a.sessions.start(user_id="alice", provider_id="oauth2", actor="test")
    assert vm.node == "node-b"

    async def awaiting() -> bool:
        got, _vm = await a.sessions.get(session.id, None)
        assert got.status != SessionStatus.FAILED.value, got.failure_message
        return got.status == SessionStatus.AWAITING_USER.value

    await wait_for(awaiting, timeout=90, what="the login awaits its user on another node")
    moved = await a.vms.get(vm.id, None)
    assert moved.node == "node-a"
    causes = await _events(a, vm.id)
    assert causes.count("handed_back") == 1 and causes.count("booted") == 1
    assert vm.id in await running_ids(a.runtime)
    assert vm.id not in await running_ids(b.runtime)
    await a.sessions.cancel(session.id, None, actor="test")
    await wait_for(lambda: _destroyed(a, vm.id), timeout=30)


async def test_a_warm_vm_on_another_node_is_taken_first(make_core: CoreFactory) -> None:
    """node-b keeps a warm VM, node-a none: a login started through node-a goes to b's warm
    VM (no cold boot anywhere), b starts the login on it and the person's login goes on."""
    from tests.services.test_warm_pool import pool_ready

    a = await make_core(node="a", **NODES)
    b = await make_core(node="b", warm_pool=1, **NODES)
    [warm] = await pool_ready(b, 1)
    session, vm = await a.sessions.start(user_id="alice", provider_id="oauth2", actor="test")
    assert (vm.id, vm.node) == (warm, "node-b")

    async def awaiting() -> bool:
        got, _vm = await a.sessions.get(session.id, None)
        assert got.status != SessionStatus.FAILED.value, got.failure_message
        return got.status == SessionStatus.AWAITING_USER.value

    await wait_for(awaiting, timeout=60, what="the login awaits its user on b's warm VM")
    causes = await _events(a, vm.id)
    assert "warm_claimed" in causes and causes.count("booted") == 1  # its boot as a warm VM
    assert await running_ids(a.runtime) == set()
    await a.sessions.cancel(session.id, None, actor="test")
    await wait_for(lambda: _destroyed(a, vm.id), timeout=30)
