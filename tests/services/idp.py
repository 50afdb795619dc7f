"""The bundled demo IdP (``airlock.demo_idp``, the real app, in this process) driven as a
native OAuth client drives it: sign in for an authorization code, exchange it (PKCE), and
refresh. Its refresh tokens rotate with reuse detection: presenting a rotated one is
refused ("already used") and revokes the whole login, so every refusal counted here is a
reuse the controller let happen."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
import time
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx

from airlock.demo_idp import create_idp_app
from airlock.providers.oauth2 import demo_idp_issuer

REDIRECT = "http://127.0.0.1:53123/callback"
CLIENT = "airlock-demo"


class DemoIdp:
    def __init__(self, port: int = 4999) -> None:
        self.issuer = demo_idp_issuer(port)
        self.app = create_idp_app(issuer=self.issuer, user="demo", password="demo")
        self.client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.app), base_url=self.issuer
        )
        self.accepted = 0
        self.refused: list[str] = []  # the IdP's error descriptions
        self.issued: list[str] = []  # every refresh token it gave out

    async def close(self) -> None:
        await self.client.aclose()

    async def login(self) -> bytes:
        """A login's token file, as ``airlock.agent.oauth2_login`` writes it."""
        verifier = secrets.token_urlsafe(48)
        challenge = (
            base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest())
            .rstrip(b"=")
            .decode()
        )
        params = {
            "response_type": "code",
            "client_id": CLIENT,
            "redirect_uri": REDIRECT,
            "scope": "openid profile email",
            "state": "st",
            "code_challenge": challenge,
            "code_challenge_method": "S256",
        }
        form = await self.client.get("/authorize", params=params)
        assert form.status_code == 200, form.text
        match = re.search(r'name="request_id" value="([^"]+)"', form.text)
        assert match is not None
        signed = await self.client.post(
            "/authorize",
            data={"request_id": match.group(1), "username": "demo", "password": "demo"},
        )
        assert signed.status_code == 302, signed.text
        code = parse_qs(urlsplit(signed.headers["location"]).query)["code"][0]
        r = await self.client.post(
            "/token",
            data={
                "grant_type": "authorization_code",
                "client_id": CLIENT,
                "code": code,
                "redirect_uri": REDIRECT,
                "code_verifier": verifier,
            },
        )
        assert r.status_code == 200, r.text
        return self._file(r.json())

    async def refresh(self, token_file: bytes) -> bytes:
        """Refresh the way a CLI does: the refresh token of ``token_file`` for a new file.
        Raises when the IdP refuses (the refusal is counted)."""
        refresh_token = json.loads(token_file)["refresh_token"]
        r = await self.client.post(
            "/token",
            data={
                "grant_type": "refresh_token",
                "client_id": CLIENT,
                "refresh_token": refresh_token,
            },
        )
        if r.status_code != 200:
            self.refused.append(r.json().get("error_description", r.text))
            raise AssertionError(f"the IdP refused the refresh: {r.text}")
        self.accepted += 1
        return self._file(r.json())

    def _file(self, body: dict[str, Any]) -> bytes:
        now = int(time.time())
        self.issued.append(body["refresh_token"])
        body = {**body, "obtained_at": now, "expires_at": now + int(body["expires_in"])}
        return json.dumps(body, indent=2).encode() + b"\n"
