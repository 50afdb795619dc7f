"""The agent's lease, for real: a browser VM's agent ends itself when its lease (plus the
margin) runs out with no renewal, a renewal keeps it alive, junk is refused, and a CLI VM
has no lease at all."""

from __future__ import annotations

import asyncio
import time

import pytest

from airlock.agent.client import AgentError
from airlock.agent.protocol import LEASE_EXPIRED_EXIT

from .conftest import StartAgent

pytestmark = pytest.mark.sandbox


async def test_a_browser_agent_whose_lease_is_not_renewed_ends_itself(
    start_agent: StartAgent,
) -> None:
    started = time.monotonic()
    # "browser" without Xvnc/Chromium on the path would fail its screen, not its lease: the
    # lease is the agent's own, so the stack's state does not matter here.
    agent = await start_agent("browser", lease={"for_ms": 1500, "margin_ms": 500})
    async with await agent.client() as client:
        ends_in = (await client.ping())["lease_ends_in_ms"]
        assert 0 < ends_in <= 2000
    code = await asyncio.wait_for(agent.proc.wait(), 30)
    took = time.monotonic() - started
    assert code == LEASE_EXPIRED_EXIT
    assert took >= 2.0  # never before lease + margin
    assert "the lease ran out" in agent.log.read_text()


async def test_renewals_keep_it_alive_and_the_last_one_counts(start_agent: StartAgent) -> None:
    agent = await start_agent("browser", lease={"for_ms": 1000, "margin_ms": 0})
    async with await agent.client() as client:
        renewed_until = time.monotonic()
        for _ in range(6):  # 3 s of renewals, each well inside the last lease
            assert await client.request("lease", {"for_ms": 1000, "margin_ms": 0}) == {
                "ends_in_ms": 1000
            }
            renewed_until = time.monotonic()
            await asyncio.sleep(0.5)
        assert agent.proc.returncode is None
        # A shorter lease shortens it: the controller that renews is the one that counts.
        await client.request("lease", {"for_ms": 200})
        renewed_until = time.monotonic()
    code = await asyncio.wait_for(agent.proc.wait(), 30)
    assert code == LEASE_EXPIRED_EXIT
    assert time.monotonic() - renewed_until >= 0.2


@pytest.mark.parametrize(
    "args",
    [
        {},
        {"for_ms": "60000"},
        {"for_ms": 0},
        {"for_ms": -5},
        {"for_ms": 1.5},
        {"for_ms": True},
        {"for_ms": None},
        {"for_ms": 10**12},
        {"for_ms": 1000, "margin_ms": -1},
        {"for_ms": 1000, "margin_ms": "x"},
        {"for_ms": [1000]},
    ],
)
async def test_junk_leases_are_bad_requests_and_change_nothing(
    start_agent: StartAgent, args: dict[str, object]
) -> None:
    agent = await start_agent("browser", lease={"for_ms": 600_000})
    async with await agent.client() as client:
        before = (await client.ping())["lease_ends_in_ms"]
        with pytest.raises(AgentError) as refused:
            await client.request("lease", args)
        assert refused.value.code == "bad_request"
        after = (await client.ping())["lease_ends_in_ms"]
        assert before - 5000 < after <= before  # the old lease stands
    assert agent.proc.returncode is None


async def test_a_cli_vm_has_no_lease(start_agent: StartAgent) -> None:
    agent = await start_agent("cli")  # the runtime writes no boot lease for a CLI VM
    async with await agent.client() as client:
        with pytest.raises(AgentError) as refused:
            await client.request("lease", {"for_ms": 300})
        assert refused.value.code == "no_lease"
        await asyncio.sleep(1.0)  # three times the lease it was offered
        pong = await client.ping()
        assert "lease_ends_in_ms" not in pong
    assert agent.proc.returncode is None


async def test_a_headless_browser_vm_is_leased_though_its_agent_runs_as_cli(
    start_agent: StartAgent,
) -> None:
    # An image without a screen runs a browser VM's agent as "cli" (agent.guest): the boot
    # lease the runtime gave it still holds, and renewals are taken.
    agent = await start_agent("cli", lease={"for_ms": 800, "margin_ms": 200})
    async with await agent.client() as client:
        assert await client.lease(800, 200) == 1000
    assert await asyncio.wait_for(agent.proc.wait(), 30) == LEASE_EXPIRED_EXIT


async def test_a_junk_boot_lease_stops_the_agent_from_starting(start_agent: StartAgent) -> None:
    with pytest.raises(AssertionError, match="is not a lease"):
        await start_agent("browser", lease='{"for_ms": "soon"}')
