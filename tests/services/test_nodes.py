"""Nodes of one cluster on one database (issue 13): registration and heartbeat, drain, a
node that goes down and one given up past its grace, and the cluster key check. Real
controllers (``Core``), real sandboxes, SQLite and PostgreSQL."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from airlock.domain.nodes import NodeState
from airlock.domain.sessions import SessionStatus
from airlock.domain.vms import VmState
from airlock.errors import NotFound
from airlock.services.core import Core
from airlock.services.nodes import ClusterKeyMismatch
from airlock.settings import Settings
from tests.lifecycle_helpers import running_ids, wait_for
from tests.services.conftest import CoreFactory

FAST_NODES = {"node_heartbeat_ms": 200, "node_lease_ms": 1200, "node_grace_ms": 1500}


async def _state(core: Core, name: str) -> NodeState:
    return (await core.nodes.get(name)).state


async def test_nodes_register_heartbeat_and_show_what_they_hold(make_core: CoreFactory) -> None:
    a = await make_core(node="a", **FAST_NODES)
    b = await make_core(node="b", max_concurrent_cli_vms=7, **FAST_NODES)
    listed = {n.name: n for n in await a.nodes.list()}
    assert set(listed) == {"node-a", "node-b"}
    assert listed["node-b"].state is NodeState.ACTIVE and listed["node-b"].ready
    assert listed["node-b"].cli_capacity == 7
    assert listed["node-b"].internal_url == b.settings.internal_url
    first = listed["node-b"].heartbeat_at

    await a.nodes.set_intent("node-a", NodeState.DRAINING, actor="test")  # placed on b
    vm = await b.vms.create_cli(user_id="alice", actor="user:alice")
    assert vm.node == "node-b"

    async def counted() -> bool:
        node = await a.nodes.get("node-b")
        return node.cli_in_use == 1 and node.heartbeat_at > first

    await wait_for(counted, timeout=10)
    assert (await a.nodes.get("node-a")).cli_in_use == 0
    await b.vms.delete(vm.id, user_id="alice", actor="user:alice")


async def test_drain_and_activate_are_recorded_and_unknown_nodes_refused(
    make_core: CoreFactory,
) -> None:
    a = await make_core(node="a", **FAST_NODES)
    await make_core(node="b", **FAST_NODES)
    drained = await a.nodes.set_intent("node-b", NodeState.DRAINING, actor="cli")
    assert drained.state is NodeState.DRAINING and drained.intent == "draining"
    assert await _state(a, "node-b") is NodeState.DRAINING  # the heartbeat keeps the intent
    back = await a.nodes.set_intent("node-b", NodeState.ACTIVE, actor="cli")
    assert back.state is NodeState.ACTIVE
    with pytest.raises(NotFound):
        await a.nodes.set_intent("node-zz", NodeState.DRAINING, actor="cli")
    with pytest.raises(NotFound):
        await a.nodes.get("node-zz")


async def test_a_silent_node_is_down_then_given_up_and_reconciles_when_it_returns(
    make_core: CoreFactory,
) -> None:
    """Node b stops (its VMs keep running, as after kill -9 of its controller): after the
    lease it is down; after the grace node a marks its live VMs lost and fails their
    sessions with a reason, and destroys nothing. When b returns, its reconcile kills what
    the database now says is gone before it says it is ready."""
    a = await make_core(node="a", **FAST_NODES)
    b = await make_core(node="b", **FAST_NODES)
    await a.nodes.set_intent("node-b", NodeState.DRAINING, actor="test")
    mine = await a.vms.create_cli(user_id="carol", actor="user:carol")
    await a.nodes.set_intent("node-b", NodeState.ACTIVE, actor="test")
    await a.nodes.set_intent("node-a", NodeState.DRAINING, actor="test")
    theirs = await b.vms.create_cli(user_id="alice", actor="user:alice")
    assert (mine.node, theirs.node) == ("node-a", "node-b")
    await b.close()  # leaves its VMs running; no more heartbeats

    async def down() -> bool:
        return await _state(a, "node-b") is NodeState.DOWN

    await wait_for(down, timeout=10)

    async def lost() -> bool:
        return (await a.vms.get(theirs.id, None)).state == VmState.LOST.value

    await wait_for(lost, timeout=15)
    row = await a.vms.get(theirs.id, None)
    assert row.last_error is not None and "node-b stopped answering" in row.last_error
    # Nothing of b's was destroyed by a (it cannot reach it), nothing of a's touched.
    assert theirs.id in await running_ids(b.runtime)
    assert (await a.vms.get(mine.id, None)).state == VmState.RUNNING.value
    assert mine.id in await running_ids(a.runtime)

    again = await make_core(node="b", **FAST_NODES)  # the same host, back
    assert theirs.id not in await running_ids(again.runtime)  # reconciled: killed
    node = await a.nodes.get("node-b")
    assert node.state is NodeState.ACTIVE and node.ready
    await a.vms.delete(mine.id, user_id="carol", actor="user:carol")


async def test_sessions_of_a_given_up_node_fail_with_a_reason(make_core: CoreFactory) -> None:
    a = await make_core(node="a", **FAST_NODES)
    b = await make_core(node="b", **FAST_NODES)
    await a.nodes.set_intent("node-a", NodeState.DRAINING, actor="test")
    session, placed = await b.sessions.start(user_id="alice", provider_id="oauth2", actor="test")
    assert placed.node == "node-b"
    await b.close()

    async def failed() -> bool:
        got, _ = await a.sessions.get(session.id, None)
        return got.status == SessionStatus.FAILED.value

    await wait_for(failed, timeout=20)
    got, vm = await a.sessions.get(session.id, None)
    assert got.failure_reason is not None
    assert got.failure_reason.startswith("vm_lost: the host node-b")
    assert "start a new login" in got.failure_reason
    assert vm is not None and vm.state == VmState.LOST.value
    again = await make_core(node="b", **FAST_NODES)
    assert vm.id not in await running_ids(again.runtime)


# --- the cluster key ----------------------------------------------------------------------
def _settings(db_url: str, data_dir: Path, key: Path, node: str) -> Settings:
    return Settings(
        _env_file=None,
        data_dir=data_dir,
        database_url=db_url,
        node_name=node,
        secret_key_file=key,
    )


async def test_a_controller_with_another_key_file_refuses_to_start(
    db_url: str, tmp_path: Path
) -> None:
    first = Core(_settings(db_url, tmp_path / "a", tmp_path / "a.key", "node-a"))
    await first.open()
    await first.close()
    same = Core(_settings(db_url, tmp_path / "b", tmp_path / "a.key", "node-b"))
    await same.open()  # the cluster's key file: fine
    await same.close()

    other = Core(_settings(db_url, tmp_path / "c", tmp_path / "c.key", "node-c"))
    with pytest.raises(ClusterKeyMismatch) as refused:
        await other.open()
    await other.close()
    assert str(tmp_path / "c.key") in refused.value.message
    assert "copy" in refused.value.message
    # The fingerprints, never a key, are what the database holds.
    key = json.loads((tmp_path / "a.key").read_text())
    async with first.db.read() as repo:
        seen = await repo.cluster_keys()
    assert set(seen) == set(key["keys"])
    assert not any(secret in fp for fp in seen.values() for secret in key["keys"].values())


async def test_a_key_file_with_the_same_key_id_but_another_key_is_refused(
    db_url: str, tmp_path: Path
) -> None:
    first = Core(_settings(db_url, tmp_path / "a", tmp_path / "a.key", "node-a"))
    await first.open()
    await first.close()
    body = json.loads((tmp_path / "a.key").read_text())
    (tmp_path / "b").mkdir()
    forged = tmp_path / "b.key"
    forged.write_text(json.dumps({**body, "keys": {body["current"]: "A" * 43 + "="}}))
    forged.chmod(0o600)
    other = Core(_settings(db_url, tmp_path / "b", forged, "node-b"))
    with pytest.raises(ClusterKeyMismatch) as refused:
        await other.open()
    await other.close()
    assert f"key {body['current']} that differs" in refused.value.message
