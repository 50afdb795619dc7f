"""The real demo IdP on a loopback port (uvicorn in a thread), and what a harness does with
it: sign the demo user in (the authorization code flow with PKCE, as the login program
does), read each grant's counters and revoke a grant over its ``/admin`` routes.

Admin requests name the issuer's host (``idp.airlock.test``) in ``Host``, as the routes
require; the connection goes to ``127.0.0.1``.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
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
import uvicorn

from airlock.demo_idp import create_idp_app
from airlock.providers.oauth2 import DEMO_IDP_HOST, demo_idp_issuer

ADMIN_TOKEN = "idp-admin-token-for-tests-3c9e"
REDIRECT = "http://127.0.0.1:53999/callback"


@dataclass
class LiveIdp:
    port: int
    issuer: str
    admin_token: str = ADMIN_TOKEN

    def _client(self) -> httpx.Client:
        return httpx.Client(
            base_url=f"http://127.0.0.1:{self.port}",
            headers={"Host": f"{DEMO_IDP_HOST}:{self.port}"},
            timeout=10,
        )

    def sign_in(self, client_id: str = "airlock-demo") -> dict[str, Any]:
        """A fresh login of the demo user: the token response, plus ``obtained_at`` and
        ``expires_at`` as the login program writes them."""
        verifier = secrets.token_urlsafe(48)
        challenge = (
            base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest())
            .rstrip(b"=")
            .decode()
        )
        with self._client() as c:
            form = c.get(
                "/authorize",
                params={
                    "response_type": "code",
                    "client_id": client_id,
                    "redirect_uri": REDIRECT,
                    "scope": "openid profile email",
                    "state": "s",
                    "code_challenge": challenge,
                    "code_challenge_method": "S256",
                },
            )
            match = re.search(r'name="request_id" value="([^"]+)"', form.text)
            assert match, form.text
            signed = c.post(
                "/authorize",
                data={"request_id": match.group(1), "username": "demo", "password": "demo"},
            )
            assert signed.status_code == 302, signed.text
            code = parse_qs(urlsplit(signed.headers["location"]).query)["code"][0]
            r = c.post(
                "/token",
                data={
                    "grant_type": "authorization_code",
                    "client_id": client_id,
                    "code": code,
                    "redirect_uri": REDIRECT,
                    "code_verifier": verifier,
                },
            )
            assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        now = int(time.time())
        body["obtained_at"] = now
        body["expires_at"] = now + int(body["expires_in"])
        return body

    def grants(self) -> dict[str, dict[str, Any]]:
        """Every grant's counters by grant id (the ``sid`` of its ``id_token``)."""
        with self._client() as c:
            r = c.get("/admin/grants", headers={"Authorization": f"Bearer {self.admin_token}"})
        assert r.status_code == 200, r.text
        return {g["grant"]: g for g in r.json()["grants"]}

    def totals(self) -> dict[str, int]:
        with self._client() as c:
            r = c.get("/admin/grants", headers={"Authorization": f"Bearer {self.admin_token}"})
        assert r.status_code == 200, r.text
        totals: dict[str, int] = r.json()["totals"]
        return totals

    def revoke(self, grant: str) -> dict[str, Any]:
        with self._client() as c:
            r = c.post(
                f"/admin/grants/{grant}/revoke",
                headers={"Authorization": f"Bearer {self.admin_token}"},
            )
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        return body


def grant_of(tokens: dict[str, Any] | bytes) -> str:
    """The IdP's grant id of a token response (its ``id_token``'s ``sid``)."""
    data = json.loads(tokens) if isinstance(tokens, bytes) else tokens
    payload = data["id_token"].split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    sid: str = claims["sid"]
    return sid


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def live_idp(port: int | None = None, **options: Any) -> Iterator[LiveIdp]:
    """Serve the demo IdP on ``127.0.0.1:port`` (a free one by default) until the block
    ends. ``options`` go to ``create_idp_app`` (``access_ttl``, ``refresh_ttl``, ...)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port or 0))
    port = int(sock.getsockname()[1])
    options.setdefault("admin_token", ADMIN_TOKEN)
    app = create_idp_app(issuer=demo_idp_issuer(port), user="demo", password="demo", **options)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    started = threading.Event()
    for _ in range(1000):
        if server.started:
            started.set()
            break
        threading.Event().wait(0.01)
    assert started.is_set(), "the demo IdP did not start"
    try:
        yield LiveIdp(port, demo_idp_issuer(port), options["admin_token"])
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
        assert not thread.is_alive()
