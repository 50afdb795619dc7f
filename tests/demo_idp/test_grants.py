"""The demo IdP's grants as a test harness sees them: counters, revocation, introspection."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import FastAPI

from airlock.demo_idp import create_idp_app
from tests.demo_idp.test_idp import ISSUER, Clock, claims, exchange, get_code, pkce, token

ADMIN = "admin-secret-for-tests"


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def app(clock: Clock) -> FastAPI:
    return create_idp_app(
        issuer=ISSUER, user="demo", password="demo", clock=clock, admin_token=ADMIN, refresh_ttl=600
    )


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url=ISSUER) as c:
        yield c


async def login(client: httpx.AsyncClient) -> dict[str, str]:
    p = pkce()
    r = await exchange(client, await get_code(client, p), p)
    assert r.status_code == 200, r.text
    body: dict[str, str] = r.json()
    return body


async def grants(client: httpx.AsyncClient) -> dict[str, dict[str, object]]:
    r = await client.get("/admin/grants", headers={"Authorization": f"Bearer {ADMIN}"})
    assert r.status_code == 200, r.text
    return {g["grant"]: g for g in r.json()["grants"]}


async def introspect(client: httpx.AsyncClient, value: str) -> dict[str, object]:
    r = await client.post("/introspect", data={"client_id": "airlock-demo", "token": value})
    assert r.status_code == 200, r.text
    body: dict[str, object] = r.json()
    return body


async def test_counters_per_grant_and_reuse_is_counted(client: httpx.AsyncClient) -> None:
    first = await login(client)
    sid = claims(first["id_token"])["sid"]
    other = await login(client)
    assert claims(other["id_token"])["sid"] != sid
    assert first["refresh_token_expires_in"] == 600  # type: ignore[comparison-overlap]
    current = first
    for _ in range(2):
        r = await token(client, grant_type="refresh_token", refresh_token=current["refresh_token"])
        assert r.status_code == 200
        current = r.json()
    seen = await grants(client)
    assert seen[sid]["refreshesAccepted"] == 2 and seen[sid]["reusedRefreshTokens"] == 0
    assert seen[sid]["revoked"] is False
    # A rotated token comes back: counted as reuse, and the grant is revoked.
    r = await token(client, grant_type="refresh_token", refresh_token=first["refresh_token"])
    assert r.status_code == 400 and r.json()["error"] == "invalid_grant"
    seen = await grants(client)
    assert seen[sid]["reusedRefreshTokens"] == 1
    assert seen[sid]["revoked"] is True and seen[sid]["revokedReason"] == "refresh_token_reuse"
    # The other login is untouched.
    other_sid = claims(other["id_token"])["sid"]
    assert seen[other_sid]["refreshesAccepted"] == 0 and seen[other_sid]["revoked"] is False
    r = await client.get("/admin/grants", headers={"Authorization": f"Bearer {ADMIN}"})
    assert r.json()["totals"] == {
        "refreshesAccepted": 2,
        "refreshesRefused": 1,
        "reusedRefreshTokens": 1,
    }
    # No token value is in what the admin sees.
    assert current["refresh_token"] not in r.text and current["access_token"] not in r.text


async def test_admin_revokes_a_grant_and_introspection_tells(client: httpx.AsyncClient) -> None:
    body = await login(client)
    sid = claims(body["id_token"])["sid"]
    active = await introspect(client, body["refresh_token"])
    assert active["active"] is True and active["token_type"] == "refresh_token"
    assert active["sid"] == sid and active["sub"] == "demo"
    # Asking did not use it up: it still refreshes.
    r = await token(client, grant_type="refresh_token", refresh_token=body["refresh_token"])
    assert r.status_code == 200
    body = r.json()
    r = await client.post(
        f"/admin/grants/{sid}/revoke", headers={"Authorization": f"Bearer {ADMIN}"}
    )
    assert r.status_code == 200 and r.json()["revokedReason"] == "admin"
    assert await introspect(client, body["refresh_token"]) == {"active": False}
    r = await token(client, grant_type="refresh_token", refresh_token=body["refresh_token"])
    assert r.status_code == 400 and r.json()["error"] == "invalid_grant"
    me = await client.get("/userinfo", headers={"Authorization": f"Bearer {body['access_token']}"})
    assert me.status_code == 401
    assert (await grants(client))[sid]["refreshesRefused"] == 1


async def test_introspection_of_junk_expired_and_foreign_tokens(
    client: httpx.AsyncClient, clock: Clock
) -> None:
    assert await introspect(client, "made-up") == {"active": False}
    body = await login(client)
    r = await client.post("/introspect", data={"client_id": "someone", "token": "x"})
    assert r.status_code == 401 and r.json()["error"] == "invalid_client"
    r = await client.post("/introspect", data={"client_id": "airlock-demo"})
    assert r.status_code == 400 and r.json()["error"] == "invalid_request"
    clock.now += 601
    assert await introspect(client, body["refresh_token"]) == {"active": False}


async def test_admin_routes_need_the_token_and_the_issuer_host(client: httpx.AsyncClient) -> None:
    body = await login(client)
    sid = claims(body["id_token"])["sid"]
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {ADMIN}"}):
        assert (await client.get("/admin/grants", headers=headers)).status_code == 401
        r = await client.post(f"/admin/grants/{sid}/revoke", headers=headers)
        assert r.status_code == 401
    # The asset host (which a browser VM's page reaches too) has no admin routes.
    r = await client.get(
        "http://static.idp.airlock.test:4001/admin/grants",
        headers={"Authorization": f"Bearer {ADMIN}"},
    )
    assert r.status_code == 404
    r = await client.post("/admin/grants/nope/revoke", headers={"Authorization": f"Bearer {ADMIN}"})
    assert r.status_code == 404
    assert (await grants(client))[sid]["revoked"] is False


async def test_without_an_admin_token_there_are_no_admin_routes() -> None:
    app = create_idp_app(issuer=ISSUER, user="demo", password="demo")
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url=ISSUER) as client:
        r = await client.get("/admin/grants", headers={"Authorization": "Bearer "})
        assert r.status_code == 404
        meta = (await client.get("/.well-known/oauth-authorization-server")).json()
        assert meta["introspection_endpoint"] == f"{ISSUER}/introspect"
