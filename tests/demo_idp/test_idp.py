"""The demo IdP, driven through its ASGI app the way a browser and a native client would."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import jwt as pyjwt
import pytest
from fastapi import FastAPI

from airlock.demo_idp import create_idp_app
from airlock.demo_idp.tokens import Expiring as _Expiring

ISSUER = "http://idp.airlock.test:4001"
REDIRECT = "http://127.0.0.1:53123/callback"


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Pkce:
    verifier: str
    challenge: str


def pkce() -> Pkce:
    verifier = secrets.token_urlsafe(48)
    digest = hashlib.sha256(verifier.encode()).digest()
    return Pkce(verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode())


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def app(clock: Clock) -> FastAPI:
    return create_idp_app(issuer=ISSUER, user="demo", password="demo", clock=clock)


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url=ISSUER) as c:
        yield c


def authorize_params(p: Pkce, **over: str) -> dict[str, str]:
    params = {
        "response_type": "code",
        "client_id": "airlock-demo",
        "redirect_uri": REDIRECT,
        "scope": "openid profile email",
        "state": "st-123",
        "code_challenge": p.challenge,
        "code_challenge_method": "S256",
    }
    params.update(over)
    return params


def request_id(page: str) -> str:
    match = re.search(r'name="request_id" value="([^"]+)"', page)
    assert match, "no request_id in the form"
    return match.group(1)


async def sign_in(
    client: httpx.AsyncClient, p: Pkce, *, password: str = "demo", **over: str
) -> httpx.Response:
    form = await client.get("/authorize", params=authorize_params(p, **over))
    assert form.status_code == 200, form.text
    return await client.post(
        "/authorize",
        data={"request_id": request_id(form.text), "username": "demo", "password": password},
    )


def callback(response: httpx.Response) -> dict[str, str]:
    assert response.status_code == 302, response.text
    location = response.headers["location"]
    assert location.startswith(REDIRECT + "?")
    return {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}


async def get_code(client: httpx.AsyncClient, p: Pkce) -> str:
    return callback(await sign_in(client, p))["code"]


async def token(client: httpx.AsyncClient, **form: str) -> httpx.Response:
    return await client.post("/token", data={"client_id": "airlock-demo", **form})


async def exchange(client: httpx.AsyncClient, code: str, p: Pkce, **over: str) -> httpx.Response:
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": REDIRECT,
        "code_verifier": p.verifier,
    }
    form.update(over)
    return await token(client, **form)


def jwt_part(jwt: str, index: int) -> dict[str, Any]:
    part = jwt.split(".")[index]
    result: dict[str, Any] = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    return result


def claims(jwt: str) -> dict[str, Any]:
    return jwt_part(jwt, 1)


async def test_metadata_names_the_endpoints(client: httpx.AsyncClient) -> None:
    r = await client.get("/.well-known/oauth-authorization-server")
    assert r.status_code == 200
    meta = r.json()
    assert meta["issuer"] == ISSUER
    assert meta["authorization_endpoint"] == f"{ISSUER}/authorize"
    assert meta["token_endpoint"] == f"{ISSUER}/token"
    assert meta["code_challenge_methods_supported"] == ["S256"]
    assert set(meta["grant_types_supported"]) == {"authorization_code", "refresh_token"}
    assert meta["jwks_uri"] == f"{ISSUER}/.well-known/jwks.json"
    assert meta["id_token_signing_alg_values_supported"] == ["RS256"]


async def test_key_rotation_keeps_recent_keys_published(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    first = app.state.keys.kid
    kids = [first] + [app.state.keys.rotate() for _ in range(3)]
    published = [k["kid"] for k in (await client.get("/.well-known/jwks.json")).json()["keys"]]
    assert published == kids[::-1][:3]  # newest first; the oldest has been dropped
    assert first not in published


async def test_login_form_is_keyboard_first(client: httpx.AsyncClient) -> None:
    r = await client.get("/authorize", params=authorize_params(pkce()))
    assert r.status_code == 200
    page = r.text
    assert "<title>Demo identity provider — sign in</title>" in page
    user = re.search(r"<input[^>]*id=\"username\"[^>]*>", page)
    assert user and "autofocus" in user.group(0)
    assert page.count("autofocus") == 1
    # Tab order is document order (no tabindex anywhere): user name, password, submit, then
    # the single sign-on button (which the page's script shows).
    assert "tabindex" not in page
    focusable = re.findall(
        r'<(?:input|button|a|select|textarea)\b(?![^>]*type="hidden")[^>]*>', page
    )
    kinds = [re.search(r'id="(\w+)"', f).group(1) for f in focusable]  # type: ignore[union-attr]
    assert kinds == ["username", "password", "submit", "sso"]
    assert r.headers["cache-control"] == "no-store"
    assert "frame-ancestors 'none'" in r.headers["content-security-policy"]


STATIC = "http://static.idp.airlock.test:4001"
SSO = "http://sso.login.airlock.test:4001"


async def test_the_page_takes_its_style_and_script_from_the_asset_host(
    client: httpx.AsyncClient,
) -> None:
    r = await client.get("/authorize", params=authorize_params(pkce()))
    page = r.text
    assert f'<link rel="stylesheet" href="{STATIC}/static/login.css">' in page
    assert f'<script src="{STATIC}/static/login.js" defer></script>' in page
    assert "<style" not in page and "style=" not in page  # nothing styled without the asset
    csp = r.headers["content-security-policy"]
    assert f"style-src {STATIC};" in csp and f"script-src {STATIC};" in csp
    assert "unsafe-inline" not in csp
    sso = re.search(r'<a class="sso" id="sso" href="([^"]+)" hidden>', page)
    assert sso and sso.group(1).startswith(f"{SSO}/sso/authorize?request_id=")
    # The assets exist on the asset host only, as on a CDN.
    css = await client.get(f"{STATIC}/static/login.css")
    assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")
    js = await client.get(f"{STATIC}/static/login.js")
    assert js.status_code == 200 and "sso.hidden = false" in js.text
    assert (await client.get(f"{ISSUER}/static/login.css")).status_code == 404
    assert (await client.get(f"{SSO}/static/login.js")).status_code == 404
    assert (await client.get(f"{STATIC}/static/../app.py")).status_code == 404


async def test_single_sign_on_goes_through_the_sso_host(client: httpx.AsyncClient) -> None:
    p = pkce()
    form = await client.get("/authorize", params=authorize_params(p))
    rid = request_id(form.text)
    # The SSO pages answer on the SSO host only.
    assert (
        await client.get(f"{ISSUER}/sso/authorize", params={"request_id": rid})
    ).status_code == 404
    page = await client.get(f"{SSO}/sso/authorize", params={"request_id": rid})
    assert page.status_code == 200 and "Demo SSO" in page.text
    assert f'action="{SSO}/sso/authorize"' in page.text
    wrong = await client.post(
        f"{SSO}/sso/authorize", data={"request_id": rid, "username": "demo", "password": "x"}
    )
    assert "Wrong user name or password." in wrong.text
    ok = await client.post(
        f"{SSO}/sso/authorize", data={"request_id": rid, "username": "demo", "password": "demo"}
    )
    assert ok.status_code == 302
    back = ok.headers["location"]
    assert back.startswith(f"{ISSUER}/sso/callback?ticket=")
    done = await client.get(back)
    code = callback(done)["code"]
    tokens = await exchange(client, code, p)
    assert tokens.status_code == 200 and claims(tokens.json()["id_token"])["sub"] == "demo"
    # The ticket and the request were single use.
    again = await client.get(back)
    assert again.status_code == 400 and "ticket" in again.text
    assert (await client.get(f"{SSO}/sso/authorize", params={"request_id": rid})).status_code == 400


async def test_wrong_password_shows_the_form_again(client: httpx.AsyncClient) -> None:
    p = pkce()
    form = await client.get("/authorize", params=authorize_params(p))
    rid = request_id(form.text)
    wrong = await client.post(
        "/authorize", data={"request_id": rid, "username": "demo", "password": "nope"}
    )
    assert wrong.status_code == 200
    assert "location" not in wrong.headers
    assert "Wrong user name or password." in wrong.text
    assert "autofocus" in wrong.text
    # The same request can still succeed with the right password.
    right = await client.post(
        "/authorize", data={"request_id": rid, "username": "demo", "password": "demo"}
    )
    assert callback(right)["state"] == "st-123"


async def test_too_many_wrong_passwords_end_the_request(client: httpx.AsyncClient) -> None:
    form = await client.get("/authorize", params=authorize_params(pkce()))
    rid = request_id(form.text)
    for _ in range(4):
        r = await client.post(
            "/authorize", data={"request_id": rid, "username": "demo", "password": "x"}
        )
        assert r.status_code == 200
    r = await client.post(
        "/authorize", data={"request_id": rid, "username": "demo", "password": "x"}
    )
    assert r.status_code == 403
    r = await client.post(
        "/authorize", data={"request_id": rid, "username": "demo", "password": "demo"}
    )
    assert r.status_code == 400 and "location" not in r.headers


async def test_a_new_request_id_buys_no_new_guesses(
    client: httpx.AsyncClient, clock: Clock
) -> None:
    """The lockout counts wrong passwords per client and user, not per request id: every
    GET /authorize mints a new id, and five more guesses with it would be no lockout."""

    async def guess(password: str, username: str = "demo") -> httpx.Response:
        form = await client.get("/authorize", params=authorize_params(pkce()))
        return await client.post(
            "/authorize",
            data={"request_id": request_id(form.text), "username": username, "password": password},
        )

    for _ in range(4):
        assert (await guess("wrong")).status_code == 200
    assert (await guess("wrong")).status_code == 403
    # Locked: even the right password, with a fresh request id, is refused for a while.
    r = await guess("demo")
    assert r.status_code == 403 and "location" not in r.headers
    # Made-up user names are no lever: they neither count nor unlock.
    for i in range(50):
        assert (await guess("x", username=f"nobody{i}")).status_code == 200
    assert (await guess("demo")).status_code == 403
    clock.now += 901  # the window ends
    assert callback(await guess("demo"))["state"] == "st-123"
    # A success clears the count: four more wrong ones do not lock.
    for _ in range(4):
        assert (await guess("wrong")).status_code == 200
    assert callback(await guess("demo"))["state"] == "st-123"


async def test_full_code_flow(client: httpx.AsyncClient) -> None:
    p = pkce()
    params = callback(await sign_in(client, p))
    assert params["state"] == "st-123"
    assert params["iss"] == ISSUER
    r = await exchange(client, params["code"], p)
    assert r.status_code == 200, r.text
    assert r.headers["cache-control"] == "no-store"
    body = r.json()
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 3600
    assert body["scope"] == "openid profile email"
    assert body["access_token"] and body["refresh_token"]
    id_claims = claims(body["id_token"])
    assert id_claims["email"] == "demo@airlock.test"
    assert id_claims["iss"] == ISSUER
    assert id_claims["aud"] == "airlock-demo"
    assert id_claims["exp"] - id_claims["iat"] == 3600
    header = jwt_part(body["id_token"], 0)
    assert header["alg"] == "RS256" and header["typ"] == "JWT"
    # Signed with a key the JWKS publishes, and it verifies against it.
    jwks = (await client.get("/.well-known/jwks.json")).json()
    [key] = [k for k in jwks["keys"] if k["kid"] == header["kid"]]
    assert key["kty"] == "RSA" and "d" not in key  # public parts only
    verified = pyjwt.decode(
        body["id_token"],
        pyjwt.PyJWK(key).key,
        algorithms=["RS256"],
        audience="airlock-demo",
        issuer=ISSUER,
        # The test's clock is not the wall clock: its times are checked above.
        options={"verify_exp": False, "verify_iat": False},
    )
    assert verified == id_claims
    me = await client.get("/userinfo", headers={"Authorization": f"Bearer {body['access_token']}"})
    assert me.status_code == 200
    assert me.json()["email"] == "demo@airlock.test"
    assert me.json()["sub"] == id_claims["sub"]


async def test_pkce_mismatch_is_rejected_and_burns_the_code(client: httpx.AsyncClient) -> None:
    p = pkce()
    code = await get_code(client, p)
    r = await exchange(client, code, p, code_verifier=pkce().verifier)
    assert r.status_code == 400
    assert r.json()["error"] == "invalid_grant"
    again = await exchange(client, code, p)
    assert again.status_code == 400 and again.json()["error"] == "invalid_grant"


async def test_code_reuse_is_rejected_and_revokes_its_tokens(client: httpx.AsyncClient) -> None:
    p = pkce()
    code = await get_code(client, p)
    first = await exchange(client, code, p)
    assert first.status_code == 200
    reuse = await exchange(client, code, p)
    assert reuse.status_code == 400
    assert reuse.json() == {
        "error": "invalid_grant",
        "error_description": "authorization code already used",
    }
    access = first.json()["access_token"]
    me = await client.get("/userinfo", headers={"Authorization": f"Bearer {access}"})
    assert me.status_code == 401
    refreshed = await token(
        client, grant_type="refresh_token", refresh_token=first.json()["refresh_token"]
    )
    assert refreshed.status_code == 400 and refreshed.json()["error"] == "invalid_grant"


async def test_redirect_uri_must_match_at_the_token_endpoint(client: httpx.AsyncClient) -> None:
    p = pkce()
    code = await get_code(client, p)
    r = await exchange(client, code, p, redirect_uri="http://127.0.0.1:53124/callback")
    assert r.status_code == 400 and r.json()["error"] == "invalid_grant"


async def test_code_expires_after_60_seconds(client: httpx.AsyncClient, clock: Clock) -> None:
    p = pkce()
    code = await get_code(client, p)
    clock.now += 61
    r = await exchange(client, code, p)
    assert r.status_code == 400 and r.json()["error"] == "invalid_grant"


async def test_code_is_bound_to_the_client(app: FastAPI, clock: Clock) -> None:
    p = pkce()
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url=ISSUER) as c:
        code = await get_code(c, p)
        r = await c.post(
            "/token",
            data={
                "client_id": "someone-else",
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": REDIRECT,
                "code_verifier": p.verifier,
            },
        )
    assert r.status_code == 401 and r.json()["error"] == "invalid_client"


@pytest.mark.parametrize(
    "redirect_uri",
    [
        "https://evil.example/callback",
        "http://evil.example/callback",
        "http://127.0.0.1.evil.example/callback",
        "http://user@127.0.0.1:5000/callback",
        "http://127.0.0.1:5000/callback#frag",
        "javascript:alert(1)",
        "",
    ],
)
async def test_non_loopback_redirect_uri_is_never_redirected_to(
    client: httpx.AsyncClient, redirect_uri: str
) -> None:
    r = await client.get("/authorize", params=authorize_params(pkce(), redirect_uri=redirect_uri))
    assert r.status_code == 400
    assert "location" not in r.headers
    assert "redirect URI is not acceptable" in r.text
    assert 'name="password"' not in r.text


@pytest.mark.parametrize(
    "redirect_uri", ["http://localhost:8080/cb", "http://127.0.0.1/cb", "http://[::1]:9/cb"]
)
async def test_loopback_redirect_uris_with_any_port_are_accepted(
    client: httpx.AsyncClient, redirect_uri: str
) -> None:
    r = await client.get("/authorize", params=authorize_params(pkce(), redirect_uri=redirect_uri))
    assert r.status_code == 200 and 'name="password"' in r.text


async def test_unknown_client_gets_an_error_page(client: httpx.AsyncClient) -> None:
    r = await client.get("/authorize", params=authorize_params(pkce(), client_id="other"))
    assert r.status_code == 400 and "location" not in r.headers


@pytest.mark.parametrize(
    ("over", "error"),
    [
        ({"response_type": "token"}, "unsupported_response_type"),
        ({"code_challenge_method": "plain"}, "invalid_request"),
        ({"code_challenge": "short"}, "invalid_request"),
        ({"scope": "openid admin"}, "invalid_scope"),
    ],
)
async def test_bad_requests_go_back_to_a_validated_redirect_uri(
    client: httpx.AsyncClient, over: dict[str, str], error: str
) -> None:
    r = await client.get("/authorize", params=authorize_params(pkce(), **over))
    params = callback(r)
    assert params["error"] == error
    assert params["state"] == "st-123"
    assert "code" not in params


async def test_pkce_is_required(client: httpx.AsyncClient) -> None:
    params = authorize_params(pkce())
    del params["code_challenge"]
    assert callback(await client.get("/authorize", params=params))["error"] == "invalid_request"


async def test_refresh_rotates_and_a_replayed_token_revokes_the_grant(
    client: httpx.AsyncClient,
) -> None:
    p = pkce()
    first = (await exchange(client, await get_code(client, p), p)).json()
    r1 = await token(client, grant_type="refresh_token", refresh_token=first["refresh_token"])
    assert r1.status_code == 200, r1.text
    second = r1.json()
    assert second["refresh_token"] != first["refresh_token"]
    assert second["access_token"] != first["access_token"]
    assert second["scope"] == "openid profile email"
    # The rotated-out token stops working...
    old = await token(client, grant_type="refresh_token", refresh_token=first["refresh_token"])
    assert old.status_code == 400 and old.json()["error"] == "invalid_grant"
    # ...and since it came back, someone has a copy: the whole grant is revoked.
    new = await token(client, grant_type="refresh_token", refresh_token=second["refresh_token"])
    assert new.status_code == 400 and new.json()["error"] == "invalid_grant"
    me = await client.get(
        "/userinfo", headers={"Authorization": f"Bearer {second['access_token']}"}
    )
    assert me.status_code == 401


async def test_refresh_chain_keeps_working(client: httpx.AsyncClient) -> None:
    p = pkce()
    current = (await exchange(client, await get_code(client, p), p)).json()
    for _ in range(3):
        r = await token(client, grant_type="refresh_token", refresh_token=current["refresh_token"])
        assert r.status_code == 200
        current = r.json()
    narrowed = await token(
        client, grant_type="refresh_token", refresh_token=current["refresh_token"], scope="openid"
    )
    assert narrowed.status_code == 200 and narrowed.json()["scope"] == "openid"
    wider = await token(
        client,
        grant_type="refresh_token",
        refresh_token=narrowed.json()["refresh_token"],
        scope="openid email",
    )
    assert wider.status_code == 400 and wider.json()["error"] == "invalid_scope"


async def test_token_endpoint_errors_follow_rfc6749(client: httpx.AsyncClient) -> None:
    r = await token(client, grant_type="password", username="demo", password="demo")
    assert r.status_code == 400 and r.json()["error"] == "unsupported_grant_type"
    r = await token(client)
    assert r.status_code == 400 and r.json()["error"] == "invalid_request"
    r = await client.post("/token", json={"grant_type": "authorization_code"})
    assert r.status_code == 400 and r.json()["error"] == "invalid_request"
    r = await client.post(
        "/token",
        content="client_id=airlock-demo&grant_type=refresh_token&refresh_token=a&refresh_token=b",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert r.status_code == 400 and r.json()["error"] == "invalid_request"
    r = await token(client, grant_type="refresh_token", refresh_token="made-up")
    assert r.status_code == 400 and r.json()["error"] == "invalid_grant"


async def test_userinfo_needs_a_valid_bearer_token(client: httpx.AsyncClient) -> None:
    r = await client.get("/userinfo")
    assert r.status_code == 401
    assert r.headers["www-authenticate"].startswith("Bearer")
    r = await client.get("/userinfo", headers={"Authorization": "Bearer made-up"})
    assert r.status_code == 401


async def test_access_tokens_expire(client: httpx.AsyncClient, clock: Clock) -> None:
    p = pkce()
    body = (await exchange(client, await get_code(client, p), p)).json()
    clock.now += 3601
    me = await client.get("/userinfo", headers={"Authorization": f"Bearer {body['access_token']}"})
    assert me.status_code == 401


async def test_a_pending_request_is_single_use(client: httpx.AsyncClient) -> None:
    p = pkce()
    form = await client.get("/authorize", params=authorize_params(p))
    data = {"request_id": request_id(form.text), "username": "demo", "password": "demo"}
    assert (await client.post("/authorize", data=data)).status_code == 302
    again = await client.post("/authorize", data=data)
    assert again.status_code == 400 and "location" not in again.headers


def test_tables_are_bounded_and_expire() -> None:
    clock = Clock()
    table = _Expiring[int](clock, max_entries=3)
    for i in range(5):
        table.put(str(i), i, ttl=10)
    assert len(table) == 3
    assert table.get("0") is None and table.get("4") == 4
    clock.now += 11
    assert table.get("4") is None
    table.put("x", 1, ttl=10)
    assert len(table) == 1


def test_issuer_must_be_an_http_url() -> None:
    with pytest.raises(ValueError):
        create_idp_app(issuer="idp.airlock.test", user="demo", password="demo")
    with pytest.raises(ValueError):
        create_idp_app(issuer=ISSUER, user="demo", password="")
