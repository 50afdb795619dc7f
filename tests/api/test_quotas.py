"""Quotas (``domain.quotas``, ``services.quotas``) through the API, on SQLite and PostgreSQL:
concurrent starts by one user cannot overrun the limit, another user is unaffected, a
service token acting for a user counts against that user, every VM on the node counts,
and every refusal is 429 (the user's limit) or 503 (the node's) with ``Retry-After``."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import httpx

from airlock.domain.sessions import SessionStatus
from airlock.domain.vms import VmRole, VmState
from tests.api.conftest import Api, ApiFactory
from tests.lifecycle_helpers import wait_for


async def _start(api: Api, who: str, **body: Any) -> httpx.Response:
    return await api.client.post(
        "/api/auth/start", json={"provider": "oauth2", **body}, headers=api.auth(who)
    )


async def _live_sessions(api: Api, user: str) -> int:
    async with api.core.db.read() as repo:
        rows = await repo.auth_sessions(user_id=user)
    return sum(1 for s in rows if not SessionStatus(s.status).terminal)


def _assert_refused(r: httpx.Response, status: int, code: str) -> None:
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code
    assert r.headers["Retry-After"].isdigit() and int(r.headers["Retry-After"]) >= 1
    assert r.json()["error"]["message"]  # says what to do


async def test_twenty_concurrent_starts_by_one_user_give_exactly_the_limit(
    make_api: ApiFactory,
) -> None:
    api = await make_api(user_max_sessions=3, user_starts_per_minute=100)
    api.runtime.slow_boots = True  # sessions stay live while the race runs
    answers = await asyncio.gather(*(_start(api, "alice") for _ in range(20)))
    assert Counter(r.status_code for r in answers) == {201: 3, 429: 17}
    for r in answers:
        if r.status_code == 429:
            _assert_refused(r, 429, "too_many_sessions")
            assert "DELETE /api/auth/session/" in r.json()["error"]["message"]
            # At the latest when the oldest login's deadline (10 min) passes.
            assert int(r.headers["Retry-After"]) <= 600
    assert await _live_sessions(api, "alice") == 3
    sessions, vms = await api.counts()
    assert (sessions, vms) == (3, 3)  # the refused ones left nothing behind
    # Another user is not affected, and a service token acting for alice counts as alice.
    assert (await _start(api, "bob")).status_code == 201
    _assert_refused(
        await api.client.post(
            "/api/auth/start",
            json={"provider": "oauth2", "userId": "alice"},
            headers=api.auth("service"),
        ),
        429,
        "too_many_sessions",
    )
    assert (
        await api.client.post(
            "/api/auth/start",
            json={"provider": "oauth2", "userId": "carol"},
            headers=api.auth("service"),
        )
    ).status_code == 201


async def test_a_cancelled_login_frees_its_slot(make_api: ApiFactory) -> None:
    api = await make_api(user_max_sessions=1)
    api.runtime.slow_boots = True
    first = await _start(api, "alice")
    assert first.status_code == 201
    _assert_refused(await _start(api, "alice"), 429, "too_many_sessions")
    sid = first.json()["sessionId"]
    assert (
        await api.client.delete(f"/api/auth/session/{sid}", headers=api.auth("alice"))
    ).status_code == 200
    assert (await _start(api, "alice")).status_code == 201


async def test_starts_per_minute_counts_logins_and_cli_vms(make_api: ApiFactory) -> None:
    api = await make_api(user_starts_per_minute=3, user_max_sessions=10)
    api.runtime.slow_boots = True
    for _ in range(2):
        assert (await _start(api, "alice")).status_code == 201
    # The CLI VM is the third start; its boot waits, so create it in the background.
    cli = asyncio.create_task(
        api.client.post("/api/vms", json={"role": "cli"}, headers=api.auth("alice")),
        name="cli-create",
    )
    try:

        async def recorded() -> bool:
            async with api.core.db.read() as repo:
                return bool(await repo.vms(user_id="alice", role=VmRole.CLI.value))

        await wait_for(recorded, timeout=4, interval=0.02)
        r = await _start(api, "alice")
        _assert_refused(r, 429, "rate_limited")
        assert int(r.headers["Retry-After"]) <= 60
        _assert_refused(
            await api.client.post("/api/vms", json={"role": "cli"}, headers=api.auth("alice")),
            429,
            "rate_limited",
        )
        assert (await _start(api, "bob")).status_code == 201
    finally:
        cli.cancel()
        await asyncio.gather(cli, return_exceptions=True)


async def test_every_vm_on_the_node_counts_toward_its_cap(make_api: ApiFactory) -> None:
    """Draining and retained browser VMs hold a display and memory: they count."""
    api = await make_api(max_concurrent_vms=2)
    await api.add_session("bob", status=SessionStatus.COMPLETED, vm_state=VmState.DRAINING)
    await api.add_session("carol", status=SessionStatus.FAILED, vm_state=VmState.RETAINED)
    before = await api.counts()
    r = await _start(api, "alice")
    _assert_refused(r, 503, "at_capacity")
    # The soonest deadline of a VM on the node (10 min here) bounds the wait.
    assert int(r.headers["Retry-After"]) <= 600
    assert await api.counts() == before
    # A destroyed VM does not count: still the same two.
    await api.add_vm("dave", role=VmRole.BROWSER, state=VmState.DESTROYED)
    _assert_refused(await _start(api, "alice"), 503, "at_capacity")


async def test_cli_vms_have_a_per_user_and_a_per_node_cap(make_api: ApiFactory) -> None:
    api = await make_api(user_max_cli_vms=1, max_concurrent_cli_vms=2)
    await api.add_vm("alice")
    r = await api.client.post("/api/vms", json={"role": "cli"}, headers=api.auth("alice"))
    _assert_refused(r, 429, "too_many_cli_vms")
    assert "DELETE /api/vms/" in r.json()["error"]["message"]
    # A service token acting for alice counts as alice.
    _assert_refused(
        await api.client.post(
            "/api/vms", json={"role": "cli", "userId": "alice"}, headers=api.auth("service")
        ),
        429,
        "too_many_cli_vms",
    )
    await api.add_vm("bob")
    _assert_refused(  # carol has none, but the node runs its two
        await api.client.post(
            "/api/vms", json={"role": "cli", "userId": "carol"}, headers=api.auth("service")
        ),
        503,
        "at_capacity",
    )
    # Browser logins are not held back by the CLI cap.
    api.runtime.slow_boots = True
    assert (await _start(api, "alice")).status_code == 201
