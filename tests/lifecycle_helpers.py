"""Helpers shared by the lifecycle tests (service level and server level).

``finish_login`` plays the login program's last step: it writes a token response where
the ``oauth2`` provider's login program would, through the VM's real guest agent, so a
lifecycle test completes a real capture without driving a browser (the e2e tests do that).

``wait_for`` is the one way a test waits for a condition (no hand-rolled poll loops, no
sleeps standing in for one); ``advance`` moves a ``ManualClock`` for deadline tests, so they
wait on the clock instead of the wall.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

from airlock.agent.client import AgentClient
from airlock.clock import Clock, ManualClock
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
    check: Callable[[], Awaitable[bool] | bool],
    *,
    timeout: float = 15.0,
    interval: float = 0.05,
    what: str = "condition",
) -> float:
    """THE waiting helper of the tests: poll ``check`` (a function or a coroutine function)
    until it is true; return how long that took (wall seconds). Fails on timeout.

    For conditions on real things (a process, a socket, a row a real VM changes). Time the
    code under test measures on its ``Clock`` is moved with ``advance`` instead."""
    start = time.monotonic()
    while True:
        outcome = check()
        if inspect.isawaitable(outcome):
            outcome = await outcome
        if outcome:
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{what}: not met within {timeout} s")
        await asyncio.sleep(interval)


def wait_for_blocking(
    check: Callable[[], bool],
    *,
    timeout: float = 15.0,
    interval: float = 0.05,
    what: str = "condition",
) -> float:
    """``wait_for`` for synchronous tests and fixtures (a server in a thread or a process)."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{what}: not met within {timeout} s")
        time.sleep(interval)
    return time.monotonic() - start


async def loops_asleep(clock: Clock, *names: str) -> None:
    """After a core started on a ``ManualClock``: wait until its loops have reached their
    first sleep on it, so the first ``advance`` wakes them rather than racing their start."""
    if isinstance(clock, ManualClock):
        names = names or ("scheduler", "reconciler", "leases")
        await wait_for(lambda: all(clock.asleep(n) for n in names), interval=0.005)


async def advance(clock: ManualClock, **kwargs: float) -> None:
    """Move ``clock`` (``timedelta`` keywords) and wait until every loop that woke has
    finished its round and sleeps on the clock again: what it did not do, it will not do."""
    clock.advance(**kwargs)
    await wait_for(clock.settled, interval=0.005)


async def running_ids(runtime: Runtime) -> set[str]:
    return {vm.vm_id for vm in await runtime.list()}
