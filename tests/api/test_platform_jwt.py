"""The platform's identity: user JWTs of the platform's IdP as bearer tokens.

The IdP is the real demo IdP, served on a loopback port, whose JWKS Airlock fetches over
HTTP. Good tokens come from its real sign-in flow (its ``id_token``) or are signed with its
real keys (``app.state.keys``) for the claims a case needs; forged ones are made the way an
attacker would: unsigned, HMAC'd with the public key, signed with a key of their own.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import re
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import jwt
import pytest
import uvicorn
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from fastapi import FastAPI

from airlock.demo_idp import create_idp_app
from airlock.demo_idp.keys import SigningKeys
from tests.api.conftest import Api, ApiFactory
from tests.lifecycle_helpers import wait_for_blocking

AUDIENCE = "airlock-demo"  # the demo IdP's client id: its id_token's audience
REDIRECT = "http://127.0.0.1:53123/callback"


@dataclass
class Idp:
    app: FastAPI
    issuer: str

    @property
    def keys(self) -> SigningKeys:
        keys: SigningKeys = self.app.state.keys
        return keys

    @property
    def jwks_url(self) -> str:
        return f"{self.issuer}/.well-known/jwks.json"

    def claims(self, sub: str = "alice", **over: Any) -> dict[str, Any]:
        now = int(time.time())
        claims = {"iss": self.issuer, "aud": AUDIENCE, "sub": sub, "iat": now, "exp": now + 600}
        return claims | over

    def token(self, sub: str = "alice", **over: Any) -> str:
        return self.keys.sign(self.claims(sub, **over))


@pytest.fixture
def idp() -> Iterator[Idp]:
    """The demo IdP, served by uvicorn on a loopback port in a thread of its own."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    issuer = f"http://127.0.0.1:{sock.getsockname()[1]}"
    app = create_idp_app(issuer=issuer, user="demo", password="demo")
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    wait_for_blocking(lambda: server.started, timeout=5, interval=0.01, what="the demo IdP starts")
    yield Idp(app, issuer)
    server.should_exit = True
    thread.join(10)
    sock.close()


async def jwt_api(make_api: ApiFactory, idp: Idp, **over: Any) -> Api:
    return await make_api(
        **{
            "jwt_jwks_url": idp.jwks_url,
            "jwt_issuer": idp.issuer,
            "jwt_audience": AUDIENCE,
            **over,
        }
    )


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def sign_in(idp: Idp) -> dict[str, Any]:
    """The demo user signs in through the IdP's form; the app redeems the code."""
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest())
    transport = httpx.ASGITransport(app=idp.app)
    async with httpx.AsyncClient(transport=transport, base_url=idp.issuer) as c:
        form = await c.get(
            "/authorize",
            params={
                "response_type": "code",
                "client_id": AUDIENCE,
                "redirect_uri": REDIRECT,
                "scope": "openid profile email",
                "code_challenge": challenge.rstrip(b"=").decode(),
                "code_challenge_method": "S256",
            },
        )
        match = re.search(r'name="request_id" value="([^"]+)"', form.text)
        assert match, form.text
        signed_in = await c.post(
            "/authorize",
            data={"request_id": match.group(1), "username": "demo", "password": "demo"},
        )
        code = parse_qs(urlsplit(signed_in.headers["location"]).query)["code"][0]
        tokens = await c.post(
            "/token",
            data={
                "grant_type": "authorization_code",
                "client_id": AUDIENCE,
                "code": code,
                "redirect_uri": REDIRECT,
                "code_verifier": verifier,
            },
        )
    body: dict[str, Any] = tokens.json()
    return body


async def test_the_idps_own_id_token_is_a_bearer_token_for_its_user(
    make_api: ApiFactory, idp: Idp
) -> None:
    api = await jwt_api(make_api, idp)
    demos, _ = await api.add_session("demo")
    await api.add_session("alice")
    id_token = (await sign_in(idp))["id_token"]
    r = await api.client.get("/api/auth/sessions", headers=bearer(id_token))
    assert r.status_code == 200, r.text
    assert [s["sessionId"] for s in r.json()] == [demos.id]
    # Airlock's own tokens still work beside it.
    r = await api.client.get("/api/auth/sessions", headers=api.auth("alice"))
    assert r.status_code == 200 and demos.id not in {s["sessionId"] for s in r.json()}


async def test_the_user_id_comes_from_the_configured_claim(make_api: ApiFactory, idp: Idp) -> None:
    api = await jwt_api(make_api, idp, jwt_user_claim="email")
    mine, _ = await api.add_session("demo@airlock.test")
    await api.add_session("demo")
    id_token = (await sign_in(idp))["id_token"]
    r = await api.client.get("/api/auth/sessions", headers=bearer(id_token))
    assert r.status_code == 200, r.text
    assert [(s["sessionId"], s["userId"]) for s in r.json()] == [(mine.id, "demo@airlock.test")]
    # A token without that claim names nobody.
    r = await api.client.get("/api/auth/sessions", headers=bearer(idp.token("alice")))
    assert r.status_code == 401
    assert "'email' claim" in r.json()["error"]["message"]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _compact(header: dict[str, Any], claims: dict[str, Any], sign: Any) -> str:
    head = _b64(json.dumps(header).encode()) + "." + _b64(json.dumps(claims).encode())
    return head + "." + _b64(sign(head.encode()))


def _tampered(token: str, claims: dict[str, Any]) -> str:
    """A genuine token whose claims were swapped, its signature kept."""
    head, _, signature = token.split(".")
    return f"{head}.{_b64(json.dumps(claims).encode())}.{signature}"


def _forgeries(idp: Idp) -> dict[str, str]:
    now = int(time.time())
    kid = idp.keys.kid
    public_pem = next(
        jwt.PyJWK(k).key for k in idp.keys.jwks()["keys"] if k["kid"] == kid
    ).public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    own_rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    own_ec = ec.generate_private_key(ec.SECP256R1())
    good = idp.claims("alice")
    return {
        "expired": idp.token(exp=now - 120, iat=now - 720),
        "wrong audience": idp.token(aud="another-app"),
        "wrong issuer": idp.token(iss="https://evil.example"),
        "no expiry": idp.keys.sign({k: v for k, v in good.items() if k != "exp"}),
        "not yet valid": idp.token(nbf=now + 600),
        "alg none": _compact({"alg": "none", "typ": "JWT", "kid": kid}, good, lambda _: b""),
        "alg none, no signature part": _compact({"alg": "none"}, good, lambda _: b"")[:-1],
        "HS256 with the public key": _compact(
            {"alg": "HS256", "typ": "JWT", "kid": kid},
            good,
            lambda m: hmac.new(public_pem, m, hashlib.sha256).digest(),
        ),
        "a key not in the JWKS": jwt.encode(
            good, own_rsa, algorithm="RS256", headers={"kid": "attacker-key"}
        ),
        "a key not in the JWKS, with the IdP's kid": jwt.encode(
            good, own_rsa, algorithm="RS256", headers={"kid": kid}
        ),
        "ES256 with the IdP's kid": jwt.encode(
            good, own_ec, algorithm="ES256", headers={"kid": kid}
        ),
        "tampered claims": _tampered(idp.token("alice"), good | {"sub": "bob"}),
        "a user id Airlock refuses": idp.token("bob smith"),
        "junk": "a.b.c",
    }


FORGERIES = [
    "expired",
    "wrong audience",
    "wrong issuer",
    "no expiry",
    "not yet valid",
    "alg none",
    "alg none, no signature part",
    "HS256 with the public key",
    "a key not in the JWKS",
    "a key not in the JWKS, with the IdP's kid",
    "ES256 with the IdP's kid",
    "tampered claims",
    "a user id Airlock refuses",
    "junk",
]


@pytest.mark.parametrize("case", FORGERIES)
async def test_forged_and_wrong_tokens_are_401_and_change_nothing(
    make_api: ApiFactory, idp: Idp, case: str
) -> None:
    api = await jwt_api(make_api, idp)
    token = _forgeries(idp)[case]
    before = await api.counts()
    for method, path, body in (
        ("GET", "/api/auth/sessions", None),
        ("POST", "/api/auth/start", {"provider": "oauth2"}),
        ("POST", "/api/vms", {"role": "cli"}),
    ):
        r = await api.client.request(method, path, json=body, headers=bearer(token))
        assert r.status_code == 401, (case, r.text)
        assert r.headers["www-authenticate"] == "Bearer"
        error = r.json()["error"]
        assert error["code"] == "unauthorized" and error["message"]
        assert set(r.json()) == {"error"}
    assert await api.counts() == before
    # The same claims, signed by the IdP, are fine: the refusal was for the forgery.
    assert (await api.client.get("/api/vms", headers=bearer(idp.token()))).status_code == 200


async def test_expiry_is_enforced_with_a_small_leeway(make_api: ApiFactory, idp: Idp) -> None:
    api = await jwt_api(make_api, idp, jwt_leeway_ms=10_000)
    now = int(time.time())
    just_expired = idp.token(exp=now - 3, iat=now - 600)
    assert (await api.client.get("/api/vms", headers=bearer(just_expired))).status_code == 200
    long_expired = idp.token(exp=now - 30, iat=now - 600)
    r = await api.client.get("/api/vms", headers=bearer(long_expired))
    assert r.status_code == 401 and r.json()["error"]["message"] == "the JWT has expired"


async def test_ownership_holds_across_both_kinds_of_identity(
    make_api: ApiFactory, idp: Idp
) -> None:
    api = await jwt_api(make_api, idp)
    alices, _ = await api.add_session("alice")
    bobs, bobs_browser = await api.add_session("bob")
    alices_vm = await api.add_vm("alice")
    bobs_vm = await api.add_vm("bob")
    as_jwt = bearer(idp.token("alice"))
    as_token = api.auth("alice")
    for who in (as_jwt, as_token):  # the same user, by either kind of identity
        sessions = (await api.client.get("/api/auth/sessions", headers=who)).json()
        assert [s["sessionId"] for s in sessions] == [alices.id]
        vms = (await api.client.get("/api/vms", headers=who)).json()
        assert {v["userId"] for v in vms} == {"alice"} and alices_vm.id in {v["vmId"] for v in vms}
        assert (
            await api.client.get(f"/api/auth/session/{alices.id}", headers=who)
        ).status_code == 200
        assert (await api.client.get(f"/api/vms/{alices_vm.id}", headers=who)).status_code == 200
        for path in (f"/api/auth/session/{bobs.id}", f"/api/vms/{bobs_vm.id}"):
            r = await api.client.get(path, headers=who)
            assert r.status_code == 404, r.text
        r = await api.client.delete(f"/api/vms/{bobs_vm.id}", headers=who)
        assert r.status_code == 404
        r = await api.client.post(
            "/api/auth/start", json={"provider": "oauth2", "userId": "bob"}, headers=who
        )
        assert r.status_code == 403
    assert (await api.core.vms.get(bobs_vm.id, "bob")).state == "running"
    assert bobs_browser.state == "running" and api.runtime.destroyed == []
    # And bob's JWT sees bob's, not alice's.
    sessions = (await api.client.get("/api/auth/sessions", headers=bearer(idp.token("bob")))).json()
    assert [s["sessionId"] for s in sessions] == [bobs.id]


async def test_keys_are_cached_and_a_rotation_is_picked_up(make_api: ApiFactory, idp: Idp) -> None:
    api = await jwt_api(make_api, idp, jwt_jwks_refetch_ms=0)
    for _ in range(5):
        assert (await api.client.get("/api/vms", headers=bearer(idp.token()))).status_code == 200
    assert idp.keys.jwks_served == 1  # cached
    idp.keys.rotate()
    r = await api.client.get("/api/vms", headers=bearer(idp.token()))
    assert r.status_code == 200, r.text  # a new kid: fetched once more
    assert idp.keys.jwks_served == 2


async def test_unknown_key_ids_do_not_hammer_the_idp(make_api: ApiFactory, idp: Idp) -> None:
    api = await jwt_api(make_api, idp)  # refetch at most every 10 s (the default)
    assert (await api.client.get("/api/vms", headers=bearer(idp.token()))).status_code == 200
    own = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    junk = [
        jwt.encode(idp.claims(), own, algorithm="RS256", headers={"kid": f"k{i}"})
        for i in range(30)
    ]
    answers = await asyncio.gather(
        *(api.client.get("/api/vms", headers=bearer(token)) for token in junk)
    )
    assert {r.status_code for r in answers} == {401}
    assert idp.keys.jwks_served <= 2


@pytest.mark.parametrize(
    "path", ["/.well-known/oauth-authorization-server", "/no-such-page", "/authorize"]
)
async def test_a_bad_jwks_is_a_401_and_logged_not_a_crash(
    make_api: ApiFactory, idp: Idp, path: str, caplog: pytest.LogCaptureFixture
) -> None:
    api = await jwt_api(make_api, idp, jwt_jwks_url=idp.issuer + path)
    with caplog.at_level(logging.WARNING, logger="airlock.jwt"):
        r = await api.client.get("/api/vms", headers=bearer(idp.token()))
    assert r.status_code == 401, r.text
    assert r.json()["error"]["code"] == "unauthorized"
    assert "platform JWKS unusable" in caplog.text
    assert (await api.client.get("/api/vms", headers=api.auth("alice"))).status_code == 200


async def test_a_jwks_that_never_answers_does_not_hold_up_the_event_loop(
    make_api: ApiFactory, idp: Idp
) -> None:
    silent = socket.socket()  # accepts connections (the kernel does), never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    try:
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/jwks.json"
        api = await jwt_api(make_api, idp, jwt_jwks_url=url)
        started = time.monotonic()
        waiting = asyncio.ensure_future(api.client.get("/api/vms", headers=bearer(idp.token())))
        await asyncio.sleep(0.2)
        assert not waiting.done()
        # Meanwhile the API answers others at once.
        t0 = time.monotonic()
        assert (await api.client.get("/api/vms", headers=api.auth("alice"))).status_code == 200
        assert time.monotonic() - t0 < 2
        r = await waiting
        assert r.status_code == 401
        assert time.monotonic() - started < 15  # bounded by the fetch timeout
    finally:
        silent.close()
