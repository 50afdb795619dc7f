"""Helpers shared by the lifecycle tests (service level and server level).

``finish_login`` plays the login program's last step: it writes a token response where
the ``oauth2`` provider's login program would, through the VM's real guest agent, so a
lifecycle test completes a real capture without driving a browser (the e2e tests do that).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

from airlock.agent.client import AgentClient
from airlock.providers.oauth2 import TOKENS_PATH
from airlock.runtimes.base import Runtime

ACCESS_TOKEN = "test-access-token-6f1c0d"
REFRESH_TOKEN = "test-refresh-token-91ab77"


def token_response(**overrides: Any) -> bytes:
    now = int(time.time())
    body = {
        "access_token": ACCESS_TOKEN,
        "refresh_token": REFRESH_TOKEN,
        "token_type": "Bearer",
        "expires_in": 3600,
        "scope": "openid profile",
        "obtained_at": now,
        "expires_at": now + 3600,
    }
    body.update(overrides)
    return json.dumps(body).encode()


async def finish_login(runtime: Runtime, vm_id: str, content: bytes | None = None) -> None:
    reader, writer = await runtime.open_agent(vm_id)
    agent = AgentClient(reader, writer)
    try:
        await agent.write_files({TOKENS_PATH: content or token_response()})
    finally:
        await agent.close()


async def wait_for(
    check: Callable[[], Awaitable[bool]], *, timeout: float = 15.0, interval: float = 0.05
) -> float:
    """Poll ``check`` until it is true; return how long that took. Fails on timeout."""
    start = time.monotonic()
    while not await check():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(interval)
    return time.monotonic() - start


async def running_ids(runtime: Runtime) -> set[str]:
    return {vm.vm_id for vm in await runtime.list()}
