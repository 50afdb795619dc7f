"""The agent's ``restored`` op (after a Firecracker snapshot restore): host entropy into the
kernel pool, and a new secret: the snapshot's is refused from then on."""

from __future__ import annotations

import secrets

import pytest

from airlock.agent.client import AgentError
from tests.agent.conftest import StartAgent


async def test_restored_replaces_the_secret_and_takes_entropy(start_agent: StartAgent) -> None:
    agent = await start_agent("cli")
    client = await agent.client()
    new_secret = secrets.token_urlsafe(32)
    try:
        with pytest.raises(AgentError) as bad:
            await client.restored("short", secrets.token_bytes(32))
        assert bad.value.code == "bad_request"
        with pytest.raises(AgentError):
            await client.restored(new_secret, b"too little")
        result = await client.restored(new_secret, secrets.token_bytes(64))
    finally:
        await client.close()
    # Without CAP_SYS_ADMIN the entropy is mixed in by a write, not credited by the ioctl.
    assert result["reseeded"] in ("ioctl", "write")
    assert result["machine_id"] is False  # the harness's /etc is read-only

    with pytest.raises(AgentError) as refused:
        await agent.client()  # the snapshot's secret, which every clone knows
    assert refused.value.code == "unauthorized"
    agent.secret = new_secret
    fresh = await agent.client()
    try:
        assert (await fresh.ping())["role"] == "cli"
    finally:
        await fresh.close()
