"""Many hosts, one Airlock (issue 13): three real controllers on one PostgreSQL, each its own
data dir, port and sandbox runtime, started at the same instant on an empty database.

Every route works on every controller: a person's whole login (the viewer page, keystrokes
through the VNC socket, complete) through a node that does not hold the VM, and with each
request sent to a different node in turn; a CLI VM on one node logged in through another.
The internal link that makes it work refuses what is not a node credential."""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from airlock.agent.client import AgentClient
from tests.e2e.cluster import NAMES, Cluster, Node, cluster_db, cluster_factory, wait_json
from tests.lifecycle_helpers import finish_login
from tests.rfb import RfbClient, WsTransport

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]
__all__ = ["cluster_db", "cluster_factory"]  # fixtures

XK_TAB, XK_RETURN = 0xFF09, 0xFF0D
CARD, PAGE = (255, 255, 255), (238, 241, 245)  # the demo IdP's form card and its page


def _client(node: Node, token: str, timeout: float = 60) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=node.url, headers={"Authorization": f"Bearer {token}"}, timeout=timeout
    )


async def _type_the_login(vnc_url: str) -> None:
    """A person at the live view: wait for the login form, type name, Tab, password,
    Enter, as key events through the VNC socket the viewer page uses."""
    async with connect(vnc_url, subprotocols=["binary"], max_size=None) as ws:  # type: ignore[list-item]
        rfb = RfbClient(WsTransport(ws))
        await rfb.handshake()
        deadline = time.monotonic() + 60
        while True:
            frame = await rfb.read_frame()
            if (rfb.pixel(frame, 850, 200), rfb.pixel(frame, 5, 5)) == (CARD, PAGE):
                break
            assert time.monotonic() < deadline, "the login form never showed on the screen"
            await asyncio.sleep(0.1)
        for keysym in [*map(ord, "demo"), XK_TAB, *map(ord, "demo"), XK_RETURN]:
            await rfb.key(keysym)
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.5)  # the last keys reach the VM before the socket closes


def _ws(url: str) -> str:
    return "ws" + url.removeprefix("http")


async def _nodes(cluster: Cluster, service: str) -> dict[str, dict[str, Any]]:
    async with _client(cluster["node-c"], service) as client:
        answer = await client.get("/api/nodes")
    assert answer.status_code == 200, answer.text
    return {n["name"]: n for n in answer.json()}


async def _login_on(
    cluster: Cluster, token: str, holder: str, route: Any
) -> tuple[str, str, dict[str, Any]]:
    """A person's whole login with its VM placed on ``holder`` (the others drained);
    ``route()`` names the node each request goes to, the start included. Returns the
    session id, the VM id and the completed session."""
    cluster.only(holder)
    async with _client(cluster[route()], token) as client:
        started = await client.post("/api/auth/start", json={"provider": "oauth2"})
    assert started.status_code == 201, started.text
    session_id, vm_id = started.json()["sessionId"], started.json()["vm"]["vmId"]
    assert started.json()["vm"]["node"] == holder
    cluster.only(*NAMES)

    async with _client(cluster[route()], token) as client:
        body = await wait_json(client, f"/api/auth/session/{session_id}", "status", "awaiting_user")
    viewer_url: str = body["novncURL"]
    node = cluster[route()]
    viewer_url = node.url + viewer_url[viewer_url.index("/api/") :]
    token_q = viewer_url.split("token=", 1)[1]
    base = f"/api/auth/session/{session_id}"

    async with httpx.AsyncClient(base_url=cluster[route()].url, timeout=60) as anon:
        page = await anon.get(f"{base}/novnc?token={token_q}")
    assert page.status_code == 200, page.text
    assert "/static/novnc/core/rfb.js" in page.text  # the live view, not an error page

    via = cluster[route()]
    await _type_the_login(f"{_ws(via.url)}{base}/vnc?token={token_q}")

    async with _client(cluster[route()], token) as client:
        done = await wait_json(client, f"/api/auth/session/{session_id}", "status", "completed")
    assert done["credentials"]["captured"] is True

    async with httpx.AsyncClient(base_url=cluster[route()].url, timeout=60) as anon:
        kept = await anon.post(f"{base}/viewer/keepalive?token={token_q}")
    assert kept.status_code == 200, kept.text

    async with httpx.AsyncClient(base_url=cluster[route()].url, timeout=60) as anon:
        completed = await anon.post(f"{base}/viewer/complete?token={token_q}")
    assert completed.status_code == 200, completed.text
    async with _client(cluster[route()], token) as client:
        vm = await wait_json(client, f"/api/vms/{vm_id}", "state", "destroyed", timeout=30)
    assert vm["destroyReason"] == "completed"
    assert vm_id not in {v.vm_id for v in await cluster[holder].runtime.list()}
    return session_id, vm_id, done


async def test_every_route_works_on_every_controller(cluster_factory: Any) -> None:
    cluster: Cluster = cluster_factory(grace_success_ms=60_000)
    cluster.start_all()  # three at once on an empty database: migrations run once
    token = cluster["node-a"].cli("tokens", "create", "--user", "alice")
    service = cluster["node-c"].cli("tokens", "create", "--service", "ops")
    nodes = await _nodes(cluster, service)
    assert set(nodes) == set(NAMES)
    assert all(n["state"] == "active" and n["ready"] for n in nodes.values())

    # The VM on node-b, every other request through node-a.
    await _login_on(cluster, token, "node-b", lambda: "node-a")
    # And every request to the next node in turn.
    turn = itertools.cycle(NAMES)
    await _login_on(cluster, token, "node-c", lambda: next(turn))
    # Each VM was booted, watched and destroyed by its holder alone.
    for name in NAMES:
        assert "orphan VM destroyed" not in cluster[name].all_logs()


async def test_a_cli_vm_on_one_node_gets_credentials_through_another(
    cluster_factory: Any,
) -> None:
    cluster: Cluster = cluster_factory(grace_success_ms=60_000)
    cluster.start_all()
    token = cluster["node-a"].cli("tokens", "create", "--user", "alice")
    cluster.only("node-c")
    async with _client(cluster["node-a"], token) as client:  # placed on node-c
        cli_vm = (await client.post("/api/vms", json={"role": "cli"})).json()
    assert cli_vm["state"] == "running" and cli_vm["node"] == "node-c", cli_vm
    # A capture to inject: a login on node-b (its credentials arrive through its agent).
    cluster.only("node-b")
    async with _client(cluster["node-a"], token) as client:
        started = (await client.post("/api/auth/start", json={"provider": "oauth2"})).json()
        session_id, vm_id = started["sessionId"], started["vm"]["vmId"]
        assert started["vm"]["node"] == "node-b"
        await wait_json(client, f"/api/auth/session/{session_id}", "status", "awaiting_user")
        await finish_login(cluster["node-b"].runtime, vm_id)
        await wait_json(client, f"/api/auth/session/{session_id}", "status", "completed")

    async with _client(cluster["node-a"], token) as client:
        injected = await client.post(
            f"/api/vms/{cli_vm['vmId']}/credentials", json={"provider": "oauth2"}
        )
    assert injected.status_code == 200, injected.text
    assert injected.json()["injected"]["verified"] is True
    reader, writer = await cluster["node-c"].runtime.open_agent(cli_vm["vmId"])
    agent = AgentClient(reader, writer)
    try:
        result = await agent.run(["sh", "-c", "stat -c %a $HOME/.airlock/oauth2/tokens.json"])
    finally:
        await agent.close()
    assert result.stdout.strip() == "600"


async def test_the_internal_link_refuses_what_is_not_a_node_credential(
    cluster_factory: Any,
) -> None:
    """From the other side: a user's token, a forged credential, a genuine one for another
    VM: node-b refuses each at the handshake, and its VM's screen is never sent."""
    cluster: Cluster = cluster_factory()
    cluster.start_all()
    token = cluster["node-a"].cli("tokens", "create", "--user", "alice")
    async with _client(cluster["node-b"], token) as client:
        cli_vm = (await client.post("/api/vms", json={"role": "cli"})).json()
    holder = cli_vm["node"]
    vm_id = cli_vm["vmId"]
    url = f"{_ws(cluster[holder].url)}/internal/vms/{vm_id}/agent"
    forged = f"node-a.{int(time.time() * 1000) + 50_000}.{'A' * 43}"
    for value in (token, forged, "node-a.1.x", ""):
        with pytest.raises(InvalidStatus) as refused:
            async with connect(url, additional_headers={"Authorization": f"Bearer {value}"}):
                pass
        assert refused.value.response.status_code == 401
        assert b"invalid_node_credential" in (refused.value.response.body or b"")


async def test_a_drained_node_gets_no_new_vms_and_its_running_ones_finish(
    cluster_factory: Any,
) -> None:
    cluster: Cluster = cluster_factory(grace_success_ms=60_000, user_starts_per_minute=100)
    cluster.start_all()
    token = cluster["node-a"].cli("tokens", "create", "--user", "alice")
    cluster.only("node-c")
    async with _client(cluster["node-a"], token) as client:
        started = (await client.post("/api/auth/start", json={"provider": "oauth2"})).json()
    session_id, c_vm = started["sessionId"], started["vm"]["vmId"]
    assert started["vm"]["node"] == "node-c"
    cluster.only("node-a", "node-b")  # node-c drained while its login is in progress

    placed: list[str] = []
    async with _client(cluster["node-c"], token) as client:  # even when asked there
        for _ in range(4):
            vm = (await client.post("/api/vms", json={"role": "cli"})).json()
            assert vm["state"] == "running", vm
            placed.append(vm["node"])
    assert "node-c" not in placed and set(placed) == {"node-a", "node-b"}  # spread out
    assert {v.vm_id for v in await cluster["node-c"].runtime.list()} == {c_vm}

    # Its running login finishes normally, on node-c.
    async with _client(cluster["node-b"], token) as client:
        await wait_json(client, f"/api/auth/session/{session_id}", "status", "awaiting_user")
        await finish_login(cluster["node-c"].runtime, c_vm)
        await wait_json(client, f"/api/auth/session/{session_id}", "status", "completed")
        done = await client.post(f"/api/auth/session/{session_id}/complete")
        assert done.status_code == 200, done.text
        vm = await wait_json(client, f"/api/vms/{c_vm}", "state", "destroyed")
    assert vm["destroyReason"] == "completed"
    assert await cluster["node-c"].runtime.list() == []
    nodes = await _nodes(cluster, cluster["node-a"].cli("tokens", "create", "--service", "o"))
    assert nodes["node-c"]["state"] == "draining" and nodes["node-c"]["browserInUse"] == 0


def _ms(env: dict[str, str], name: str) -> float:
    return int(env[f"AIRLOCK_{name.upper()}"]) / 1000


async def test_a_killed_node_is_given_up_after_its_grace_and_reconciles_on_return(
    cluster_factory: Any,
) -> None:
    """kill -9 of node-b while it holds a live login and a CLI VM: it is down after the
    lease, its VMs are lost (with a reason) only after the grace, nothing on node-a or
    node-c is touched, nothing of node-b's is destroyed by them; restarted, node-b kills
    what the database now says is gone and takes new VMs again."""
    cluster: Cluster = cluster_factory(grace_success_ms=60_000, user_starts_per_minute=100)
    cluster.start_all()
    b = cluster["node-b"]
    token = cluster["node-a"].cli("tokens", "create", "--user", "alice")
    service = cluster["node-a"].cli("tokens", "create", "--service", "ops")
    cluster.only("node-b")
    async with _client(cluster["node-a"], token) as client:
        started = (await client.post("/api/auth/start", json={"provider": "oauth2"})).json()
        session_id, b_browser = started["sessionId"], started["vm"]["vmId"]
        await wait_json(client, f"/api/auth/session/{session_id}", "status", "awaiting_user")
        b_cli = (await client.post("/api/vms", json={"role": "cli"})).json()["vmId"]
    others: dict[str, str] = {}
    for name in ("node-a", "node-c"):
        cluster.only(name)
        async with _client(cluster["node-b"], token) as client:
            others[name] = (await client.post("/api/vms", json={"role": "cli"})).json()["vmId"]
    cluster.only(*NAMES)

    b.kill9()
    killed = time.monotonic()
    lease, grace = _ms(b.env, "node_lease_ms"), _ms(b.env, "node_grace_ms")
    async with _client(cluster["node-a"], service) as ops:
        deadline = killed + lease + 10
        while (await _nodes(cluster, service))["node-b"]["state"] != "down":
            assert time.monotonic() < deadline, "node-b never went down"
            await asyncio.sleep(0.1)
        down_after = time.monotonic() - killed
        # Down, not given up: its login is still what it was.
        body = (await ops.get(f"/api/auth/session/{session_id}")).json()
        assert body["status"] == "awaiting_user"

        gone = await wait_json(
            ops, f"/api/auth/session/{session_id}", "status", "failed", timeout=lease + grace + 20
        )
        lost_after = time.monotonic() - killed
        assert gone["failureReason"].startswith("vm_lost: the host node-b")
        assert "start a new login" in gone["failureReason"]
        for vm_id in (b_browser, b_cli):
            vm = (await ops.get(f"/api/vms/{vm_id}?userId=alice")).json()
            assert vm["state"] == "lost", vm
            assert "node-b stopped answering" in vm["lastError"]
        for name, vm_id in others.items():
            vm = (await ops.get(f"/api/vms/{vm_id}?userId=alice")).json()
            assert vm["state"] == "running" and vm["node"] == name, vm
            assert vm_id in {v.vm_id for v in await cluster[name].runtime.list()}
        # Placement stops choosing it: new VMs go to node-a and node-c only.
        for _ in range(3):
            async with _client(cluster["node-c"], token) as client:
                placed = (await client.post("/api/vms", json={"role": "cli"})).json()
            assert placed["node"] in ("node-a", "node-c"), placed
            await ops.delete(f"/api/vms/{placed['vmId']}?userId=alice")
    # Its last heartbeat came up to one heartbeat before the kill: never earlier than that.
    beat = _ms(b.env, "node_heartbeat_ms")
    assert down_after >= lease - beat, down_after
    assert lost_after >= lease + grace - beat, f"given up after {lost_after:.1f} s: too early"
    # Nobody else could reach node-b's VMs, and nobody destroyed them.
    assert {b_browser, b_cli} <= {v.vm_id for v in await b.runtime.list()}

    b.start()  # the host comes back
    assert not {b_browser, b_cli} & {v.vm_id for v in await b.runtime.list()}
    nodes = await _nodes(cluster, service)
    assert nodes["node-b"]["state"] == "active" and nodes["node-b"]["ready"]
    cluster.only("node-b")
    async with _client(cluster["node-a"], token) as client:
        fresh = (await client.post("/api/vms", json={"role": "cli"})).json()
    assert fresh["state"] == "running" and fresh["node"] == "node-b", fresh
    print(f"node-b down after {down_after:.1f} s, its VMs lost after {lost_after:.1f} s")


async def test_a_node_with_another_key_file_refuses_to_start(
    cluster_factory: Any, tmp_path: Any
) -> None:
    cluster: Cluster = cluster_factory()
    a, c = cluster["node-a"], cluster["node-c"]
    a.start()
    c.env["AIRLOCK_SECRET_KEY_FILE"] = str(tmp_path / "another.key")
    c.launch()
    assert c.proc is not None
    assert c.proc.wait(60) == 1
    log = c.all_logs()
    assert "another.key" in log and "copy" in log, log[-2000:]
