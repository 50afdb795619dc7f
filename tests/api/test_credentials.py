"""``/api/credentials``: the caller's logins, their health, never a secret; and the gauge.

Logins are written as rows, the way the capture writes them (a grant and its sealed first
version); the API reads them as the dashboard and ``airlock credentials ls`` do.
"""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta

import pytest

from airlock.api.routes import credentials as credential_routes
from airlock.domain.grants import GrantState, VersionSource, version_context
from airlock.services.credential_health import bus_key
from airlock.store.tables import Grant, GrantVersion
from tests.api.conftest import Api
from tests.api.live import read_sse

ACCESS = "at-secret-5d1f3a"
REFRESH = "rt-secret-8e2c71"


async def add_login(
    api: Api,
    user: str,
    *,
    grant_id: str,
    state: GrantState = GrantState.ACTIVE,
    holder: str | None = None,
) -> Grant:
    core = api.core
    now = core.clock.now()
    body = {
        "provider": "oauth2",
        "accessToken": ACCESS,
        "refreshToken": REFRESH,
        "raw": {},
        "account": {"email": f"{user}@airlock.test"},
    }
    assert core.vault is not None
    sealed = core.vault.seal(
        json.dumps(body).encode(),
        context=version_context(
            grant_id=grant_id, version=1, provider="oauth2", source="sync", session_id=None
        ),
    )
    grant = Grant(
        id=grant_id,
        user_id=user,
        provider="oauth2",
        account=f"{user}@airlock.test",
        holder_vm_id=holder,
        state=state.value,
        state_reason=None if state is GrantState.ACTIVE else "the server says so",
        access_expires_at=now + timedelta(hours=1),
        refresh_expires_at=now + timedelta(days=30),
        current_version=1,
        created_at=now,
        updated_at=now,
    )
    async with core.db.transaction() as repo:
        repo.add_grant(grant)
        await repo.session.flush()
        repo.add_grant_version(
            GrantVersion(
                grant_id=grant_id,
                version=1,
                source=VersionSource.SYNC.value,
                key_id=sealed.key_id,
                nonce=sealed.nonce,
                ciphertext=sealed.ciphertext,
                created_at=now,
            )
        )
    return grant


async def test_the_callers_logins_with_their_health_and_no_secret(api: Api) -> None:
    vm = await api.add_vm("alice")
    await add_login(api, "alice", grant_id="g-alice-1", holder=vm.id)
    await add_login(api, "alice", grant_id="g-alice-2", state=GrantState.REVOKED)
    await add_login(api, "bob", grant_id="g-bob-1")
    r = await api.client.get("/api/credentials", headers=api.auth("alice"))
    assert r.status_code == 200, r.text
    assert r.headers["cache-control"] == "no-store"
    logins = {c["grantId"]: c for c in r.json()}
    assert set(logins) == {"g-alice-1", "g-alice-2"}  # bob's is not alice's to see
    held = logins["g-alice-1"]
    assert held["holderVmId"] == vm.id and held["state"] == "active"
    assert held["provider"] == "oauth2" and held["providerName"] == "OAuth 2.0"
    assert held["account"] == "alice@airlock.test"
    assert held["accessExpiresAt"].endswith("Z") and held["refreshExpiresAt"].endswith("Z")
    assert [v["version"] for v in held["versions"]] == [1]
    assert held["versions"][0]["source"] == "sync"
    assert logins["g-alice-2"]["state"] == "revoked"
    assert logins["g-alice-2"]["holderVmId"] is None  # the vault
    for secret in (ACCESS, REFRESH):
        assert secret not in r.text
    only = await api.client.get("/api/credentials?state=revoked", headers=api.auth("alice"))
    assert [c["grantId"] for c in only.json()] == ["g-alice-2"]


async def test_identity_rules_and_bad_input(api: Api) -> None:
    await add_login(api, "bob", grant_id="g-bob-1")
    assert (await api.client.get("/api/credentials")).status_code == 401
    bad = await api.client.get("/api/credentials", headers={"Authorization": "Bearer alk_x"})
    assert bad.status_code == 401 and bad.json()["error"]["code"]
    other = await api.client.get("/api/credentials?userId=bob", headers=api.auth("alice"))
    assert other.status_code == 403 and other.json()["error"]["code"] == "forbidden"
    for query in ("state=fine", "userId=%0Abob", f"userId={'x' * 200}"):
        r = await api.client.get(f"/api/credentials?{query}", headers=api.auth("alice"))
        assert r.status_code == 422, (query, r.text)
        assert r.json()["error"]["code"] == "invalid_request"
    service = await api.client.get("/api/credentials?userId=bob", headers=api.auth("service"))
    assert [c["grantId"] for c in service.json()] == ["g-bob-1"]
    everyone = await api.client.get("/api/credentials", headers=api.auth("service"))
    assert [c["userId"] for c in everyone.json()] == ["bob"]
    # A service token's stream must name the user.
    r = await api.client.get("/api/credentials/events", headers=api.auth("service"))
    assert r.status_code == 400 and r.json()["error"]["code"] == "user_required"


async def test_the_gauge_counts_logins_by_state(api: Api) -> None:
    await add_login(api, "alice", grant_id="g-1")
    await add_login(api, "alice", grant_id="g-2", state=GrantState.REVOKED)
    await add_login(api, "bob", grant_id="g-3", state=GrantState.REVOKED)
    text = (await api.client.get("/metrics")).text
    assert 'airlock_credentials{provider="oauth2",state="active"} 1.0' in text
    assert 'airlock_credentials{provider="oauth2",state="revoked"} 2.0' in text
    assert 'airlock_credentials{provider="oauth2",state="needs_login"} 0.0' in text


async def test_the_events_stream_sends_the_list_again_when_a_login_changes(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(credential_routes, "SSE_MAX_S", 3.0)  # the test reads a whole stream
    await add_login(api, "alice", grant_id="g-1")

    async def revoke_after_the_first(line: str, lines: list[str]) -> None:
        if line.startswith("data: ") and sum(x.startswith("data: ") for x in lines) == 1:
            async with api.core.db.transaction() as repo:
                await repo.set_grant("g-1", state=GrantState.REVOKED.value)
            await api.core.bus.publish(bus_key("alice"))

    text = await read_sse(
        api.app, "/api/credentials/events", revoke_after_the_first, headers=api.auth("alice")
    )
    assert text.startswith("retry: ")
    events = [json.loads(x[6:]) for x in text.splitlines() if x.startswith("data: ")]
    assert [[c["state"] for c in e] for e in events] == [["active"], ["revoked"]]
    assert text.count("event: credentials") == 2  # nothing repeated without a change


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
async def test_the_cli_lists_the_same_logins(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from airlock import cli_common
    from airlock.cli import app

    # A wide terminal, so the table is not folded. The console took its width from COLUMNS
    # when it was imported (an xdist worker has COLUMNS=80), so the env below is too late.
    monkeypatch.setattr(cli_common.out, "width", 200)
    await add_login(api, "alice", grant_id="g-alice-1", state=GrantState.EXPIRING)
    env = {
        "AIRLOCK_DATA_DIR": str(api.core.settings.data_dir),
        "AIRLOCK_DATABASE_URL": api.core.settings.database_url or "",
    }
    result = await asyncio.to_thread(
        CliRunner().invoke, app, ["credentials", "ls", "--json"], env=env
    )
    assert result.exit_code == 0, result.output
    [login] = json.loads(result.stdout)
    assert (login["grantId"], login["state"], login["userId"]) == ("g-alice-1", "expiring", "alice")
    assert REFRESH not in result.stdout
    table = await asyncio.to_thread(CliRunner().invoke, app, ["credentials", "ls"], env=env)
    assert table.exit_code == 0 and "expiring" in table.stdout
