"""The identity rules of http-api.md: 401 without a good token, 403 for a user token acting
for someone else, 404 (indistinguishable from missing) for another user's things, and
service tokens that name the user where they create something and read anything by id."""

from __future__ import annotations

import secrets

import pytest

from airlock.domain.sessions import SessionStatus
from airlock.domain.vms import VmState
from tests.api.conftest import Api

SID = "0" * 32  # well formed, never issued
API_ROUTES = [
    ("GET", "/api/providers"),
    ("POST", "/api/auth/start"),
    ("GET", "/api/auth/sessions"),
    ("GET", f"/api/auth/session/{SID}"),
    ("GET", f"/api/auth/session/{SID}/events"),
    ("POST", f"/api/auth/session/{SID}/keepalive"),
    ("POST", f"/api/auth/session/{SID}/complete"),
    ("DELETE", f"/api/auth/session/{SID}"),
    ("GET", f"/api/auth/session/{SID}/credentials"),
    ("GET", f"/api/auth/session/{SID}/timeline"),
    ("POST", "/api/vms"),
    ("GET", "/api/vms"),
    ("GET", "/api/vms/vm-0000"),
    ("DELETE", "/api/vms/vm-0000"),
]
BAD_TOKENS = [
    "alk_" + "x" * 43,  # well formed, unknown
    "not-an-airlock-token",
    "alk_" + "x" * 300,  # over-long
]


@pytest.mark.parametrize(("method", "path"), API_ROUTES)
async def test_every_api_route_needs_a_token(api: Api, method: str, path: str) -> None:
    body = {"provider": "oauth2"} if path == "/api/auth/start" else None
    if path == "/api/vms" and method == "POST":
        body = {"role": "cli"}
    r = await api.client.request(method, path, json=body)
    assert r.status_code == 401, r.text
    assert r.json()["error"]["code"] == "unauthorized"
    assert r.headers["www-authenticate"] == "Bearer"
    for bad in BAD_TOKENS:
        r = await api.client.request(
            method, path, json=body, headers={"Authorization": f"Bearer {bad}"}
        )
        assert r.status_code == 401, (bad, r.text)
        assert r.json()["error"]["code"] == "unauthorized"


async def test_other_schemes_and_revoked_tokens_are_refused(api: Api) -> None:
    r = await api.client.get("/api/providers", headers={"Authorization": "Basic YWxpY2U6eA=="})
    assert r.status_code == 401
    assert (await api.client.get("/api/providers", headers=api.auth("alice"))).status_code == 200
    token_id = (await api.core.tokens.authenticate(api.tokens["alice"])).token_id
    await api.core.tokens.revoke(token_id)
    r = await api.client.get("/api/providers", headers=api.auth("alice"))
    assert r.status_code == 401
    assert r.json() == {"error": {"code": "unauthorized", "message": "unknown or revoked token"}}


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics", "/openapi.json", "/docs"])
async def test_operations_need_no_token(api: Api, path: str) -> None:
    assert (await api.client.get(path)).status_code == 200


# --- 403: a user token naming another user ------------------------------------------------
async def test_user_token_cannot_start_for_another_user(api: Api) -> None:
    r = await api.client.post(
        "/api/auth/start", json={"provider": "oauth2", "userId": "bob"}, headers=api.auth("alice")
    )
    assert r.status_code == 403
    assert r.json()["error"]["code"] == "forbidden"
    assert await api.counts() == (0, 0)


async def test_user_token_cannot_create_a_vm_for_another_user(api: Api) -> None:
    r = await api.client.post(
        "/api/vms", json={"role": "cli", "userId": "bob"}, headers=api.auth("alice")
    )
    assert r.status_code == 403
    assert await api.counts() == (0, 0)


@pytest.mark.parametrize("path", ["/api/auth/sessions", "/api/vms"])
async def test_user_token_cannot_list_for_another_user(api: Api, path: str) -> None:
    r = await api.client.get(path, params={"userId": "bob"}, headers=api.auth("alice"))
    assert r.status_code == 403
    r = await api.client.get(path, params={"userId": "alice"}, headers=api.auth("alice"))
    assert r.status_code == 200


async def test_user_token_naming_itself_is_fine(api: Api) -> None:
    r = await api.client.post(
        "/api/auth/start",
        json={"provider": "oauth2", "userId": "alice"},
        headers=api.auth("alice"),
    )
    assert r.status_code == 201, r.text
    assert r.json()["userId"] == "alice"


# --- 404: another user's things look missing ----------------------------------------------
def _shape(body: dict[str, object], ident: str) -> dict[str, object]:
    """The error body with the id asked for taken out: what is left must not differ."""
    error = body["error"]
    assert isinstance(error, dict)
    return {"code": error["code"], "message": str(error["message"]).replace(ident, "<id>")}


SESSION_READS = [
    ("GET", ""),
    ("GET", "/events"),
    ("POST", "/keepalive"),
    ("POST", "/complete"),
    ("DELETE", ""),
    ("GET", "/credentials"),
    ("GET", "/timeline"),
]


@pytest.mark.parametrize(("method", "suffix"), SESSION_READS)
async def test_another_users_session_is_answered_as_missing(
    api: Api, method: str, suffix: str
) -> None:
    bobs, _ = await api.add_session("bob", status=SessionStatus.COMPLETED)
    missing = secrets.token_hex(16)
    theirs = await api.client.request(
        method, f"/api/auth/session/{bobs.id}{suffix}", headers=api.auth("alice")
    )
    absent = await api.client.request(
        method, f"/api/auth/session/{missing}{suffix}", headers=api.auth("alice")
    )
    assert theirs.status_code == absent.status_code == 404
    assert _shape(theirs.json(), bobs.id) == _shape(absent.json(), missing)
    assert theirs.json()["error"]["code"] == "session_not_found"
    # ... and nothing of bob's moved.
    session, vm = await api.core.sessions.get(bobs.id, "bob")
    assert (session.status, vm and vm.state) == ("completed", "running")
    assert api.runtime.destroyed == []


@pytest.mark.parametrize("method", ["GET", "DELETE"])
async def test_another_users_vm_is_answered_as_missing(api: Api, method: str) -> None:
    bobs = await api.add_vm("bob")
    theirs = await api.client.request(method, f"/api/vms/{bobs.id}", headers=api.auth("alice"))
    absent = await api.client.request(method, "/api/vms/vm-0123abcd", headers=api.auth("alice"))
    assert theirs.status_code == absent.status_code == 404
    assert _shape(theirs.json(), bobs.id) == _shape(absent.json(), "vm-0123abcd")
    assert theirs.json()["error"]["code"] == "vm_not_found"
    assert (await api.core.vms.get(bobs.id, "bob")).state == "running"


async def test_listings_show_only_the_callers_own(api: Api) -> None:
    alices, _ = await api.add_session("alice")
    await api.add_session("bob")
    alices_vm = await api.add_vm("alice")
    await api.add_vm("bob")
    r = await api.client.get("/api/auth/sessions", headers=api.auth("alice"))
    assert [s["sessionId"] for s in r.json()] == [alices.id]
    r = await api.client.get("/api/vms", headers=api.auth("alice"))
    assert {v["userId"] for v in r.json()} == {"alice"}
    assert alices_vm.id in {v["vmId"] for v in r.json()}


async def test_start_with_someone_elses_cli_vm_is_not_found(api: Api) -> None:
    bobs = await api.add_vm("bob")
    r = await api.client.post(
        "/api/auth/start",
        json={"provider": "oauth2", "cliVmId": bobs.id},
        headers=api.auth("alice"),
    )
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "vm_not_found"
    assert await api.counts() == (0, 1)


# --- service tokens -----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("path", "body"), [("/api/auth/start", {"provider": "oauth2"}), ("/api/vms", {"role": "cli"})]
)
async def test_service_token_must_name_the_user_when_creating(
    api: Api, path: str, body: dict[str, str]
) -> None:
    r = await api.client.post(path, json=body, headers=api.auth("service"))
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "user_required"
    assert await api.counts() == (0, 0)


async def test_service_token_acts_for_the_user_it_names(api: Api) -> None:
    r = await api.client.post(
        "/api/auth/start",
        json={"provider": "oauth2", "userId": "carol"},
        headers=api.auth("service"),
    )
    assert r.status_code == 201, r.text
    assert r.json()["userId"] == "carol"
    # carol's own token sees it; the event trail names the service as the actor
    r2 = await api.client.get(
        f"/api/auth/session/{r.json()['sessionId']}/timeline", headers=api.auth("service")
    )
    assert r2.json()[0]["actor"] == "service:web-backend"


async def test_service_token_reads_anyones_by_id_and_filters_by_user(api: Api) -> None:
    alices, alices_vm = await api.add_session("alice")
    bobs, _ = await api.add_session("bob")
    r = await api.client.get(f"/api/auth/session/{alices.id}", headers=api.auth("service"))
    assert r.status_code == 200
    assert r.json()["userId"] == "alice"
    r = await api.client.get(f"/api/vms/{alices_vm.id}", headers=api.auth("service"))
    assert r.status_code == 200
    r = await api.client.get("/api/auth/sessions", headers=api.auth("service"))
    assert {s["sessionId"] for s in r.json()} == {alices.id, bobs.id}
    r = await api.client.get(
        "/api/auth/sessions", params={"userId": "bob"}, headers=api.auth("service")
    )
    assert [s["sessionId"] for s in r.json()] == [bobs.id]
    # naming a user scopes by-id reads too: alice's session is not bob's
    r = await api.client.get(
        f"/api/auth/session/{alices.id}", params={"userId": "bob"}, headers=api.auth("service")
    )
    assert r.status_code == 404


async def test_service_token_may_delete_any_vm(api: Api) -> None:
    bobs = await api.add_vm("bob")
    r = await api.client.delete(f"/api/vms/{bobs.id}", headers=api.auth("service"))
    assert r.status_code == 200, r.text
    assert r.json()["state"] == VmState.DESTROYED.value
    assert r.json()["destroyReason"] == "owner_delete"
    assert api.runtime.destroyed == [bobs.id]
