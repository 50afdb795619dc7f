"""Viewer tokens: signed, short-lived, bound to one session and one VM, view-only on
request; refused when missing, forged, for another session, expired, or once the VM is
gone; never traded for a new one. The VNC socket's refusals are checked over a real
uvicorn server with ``websockets`` (these need no VM: the token is checked first); the
proxying itself is in ``test_vnc_proxy.py``."""

from __future__ import annotations

import base64
import io
import json
import logging
import secrets
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from airlock.api.deps import ViewerSigner
from airlock.clock import ManualClock
from airlock.domain.vms import VmState
from airlock.errors import Unauthorized
from airlock.logs import RedactQueryTokens
from airlock.store.tables import AuthSession, Vm
from airlock.vault import Vault
from tests.api.conftest import Api, ApiFactory
from tests.api.live import serve
from tests.api.test_errors import assert_error

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
TTL = timedelta(minutes=10)
S1, S2 = secrets.token_hex(16), secrets.token_hex(16)


def refused(signer: ViewerSigner, token: str, session: str, vm: str, now: datetime) -> str:
    with pytest.raises(Unauthorized) as exc:
        signer.verify(token, session, vm, now=now)
    return exc.value.code


def test_a_token_opens_one_session_on_one_vm_until_it_expires(tmp_path: Path) -> None:
    signer = ViewerSigner.from_vault(Vault.open(tmp_path / "secret.key"), TTL)
    token = signer.mint(S1, "vm-a", now=NOW)
    claims = signer.verify(token, S1, "vm-a", now=NOW + TTL - timedelta(milliseconds=1))
    assert (claims.session_id, claims.vm_id, claims.view_only) == (S1, "vm-a", False)
    assert claims.expires_at == NOW + TTL
    assert refused(signer, token, S2, "vm-a", NOW) == "invalid_viewer_token"
    assert refused(signer, token, S1, "vm-b", NOW) == "invalid_viewer_token"
    assert refused(signer, token, S1, "vm-a", NOW + TTL) == "viewer_token_expired"
    # Tampering: a later expiry, or full control claimed by a view-only token.
    expiry, mode, mac = token.split(".")
    later = f"{int(expiry) + 3_600_000}.{mode}.{mac}"
    assert refused(signer, later, S1, "vm-a", NOW) == "invalid_viewer_token"
    view_only = signer.mint(S1, "vm-a", now=NOW, view_only=True)
    assert signer.verify(view_only, S1, "vm-a", now=NOW).view_only
    promoted = view_only.replace(".v.", ".f.")
    assert refused(signer, promoted, S1, "vm-a", NOW) == "invalid_viewer_token"
    for junk in ("", "x", "1.f.", "12.q." + mac, token + "x", "-1.f." + mac):
        assert refused(signer, junk, S1, "vm-a", NOW) == "invalid_viewer_token"


def test_controllers_sharing_the_key_file_verify_each_others_tokens(tmp_path: Path) -> None:
    key_file = tmp_path / "secret.key"
    one = ViewerSigner.from_vault(Vault.open(key_file), TTL)
    two = ViewerSigner.from_vault(Vault.open(key_file), TTL)
    other = ViewerSigner.from_vault(Vault.open(tmp_path / "other.key"), TTL)
    token = one.mint(S1, "vm-a", now=NOW)
    assert two.verify(token, S1, "vm-a", now=NOW).session_id == S1
    assert refused(other, token, S1, "vm-a", NOW) == "invalid_viewer_token"
    # After a vault key rotation new tokens use the new key; old ones stay valid until
    # they expire.
    body = json.loads(key_file.read_text())
    keys = {k: base64.b64decode(v) for k, v in body["keys"].items()}
    rotated = Vault({**keys, "new": secrets.token_bytes(32)}, "new")
    three = ViewerSigner.from_vault(rotated, TTL)
    assert three.verify(token, S1, "vm-a", now=NOW).vm_id == "vm-a"
    assert refused(one, three.mint(S1, "vm-a", now=NOW), S1, "vm-a", NOW) == (
        "invalid_viewer_token"
    )
    # The signing key is not the credential key itself.
    assert all(k not in keys.values() for k in rotated.derive("airlock viewer-token v1"))


async def test_viewer_token_route(api: Api) -> None:
    session, vm = await api.add_session("alice")
    path = f"/api/auth/session/{session.id}/viewer-token"
    before = datetime.now(UTC)
    r = await api.client.post(path, json={"viewOnly": True}, headers=api.auth("service"))
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["viewOnly"] is True
    assert body["novncURL"].endswith(f"/api/auth/session/{session.id}/novnc?token={body['token']}")
    assert body["vncURL"].startswith("ws://") and body["vncURL"].endswith(body["token"])
    expires = datetime.fromisoformat(body["expiresAt"].replace("Z", "+00:00"))
    assert before + timedelta(minutes=9) < expires <= datetime.now(UTC) + timedelta(minutes=10)
    signer = api.app.state.viewer_signer
    claims = signer.verify(body["token"], session.id, vm.id, now=datetime.now(UTC))
    assert claims.view_only
    # The session's own user may mint one too (full control by default); nobody else.
    r = await api.client.post(path, headers=api.auth("alice"))
    assert r.status_code == 201 and r.json()["viewOnly"] is False
    assert_error(await api.client.post(path, headers=api.auth("bob")), 404, "session_not_found")
    assert_error(await api.client.post(path), 401, "unauthorized")
    # A viewer token is no API token: it never buys a new viewer token.
    viewer = {"Authorization": f"Bearer {body['token']}"}
    assert_error(await api.client.post(path, headers=viewer), 401, "unauthorized")
    r = await api.client.post(path, json={"viewOnly": "maybe"}, headers=api.auth("alice"))
    assert_error(r, 422, "invalid_request")
    # A VM that can no longer be viewed gets no token.
    gone, _ = await api.add_session("alice", vm_state=VmState.DESTROYED)
    r = await api.client.post(
        f"/api/auth/session/{gone.id}/viewer-token", headers=api.auth("alice")
    )
    assert_error(r, 409, "vm_not_viewable")


async def _ws_refusal(url: str) -> tuple[int, str]:
    """A refused viewer socket: accepted, then closed at once with 4000 + the HTTP status
    and the error code, before a byte of RFB."""
    async with connect(url, subprotocols=["binary"]) as ws:  # type: ignore[list-item]
        with pytest.raises(ConnectionClosed):
            await ws.recv()
    assert ws.close_code is not None
    return ws.close_code, ws.close_reason or ""


async def test_vnc_socket_refusals(make_api: ApiFactory) -> None:
    api = await make_api(clock=ManualClock(), viewer_token_ttl_ms=2000)
    signer: ViewerSigner = api.app.state.viewer_signer
    mine, my_vm = await api.add_session("alice")
    theirs, _ = await api.add_session("bob")
    gone, gone_vm = await api.add_session("alice", vm_state=VmState.DESTROYED)
    now = api.core.clock.now()
    # uvicorn logs each WebSocket's path with its query: the token must not reach the log.
    logged = io.StringIO()
    handler = logging.StreamHandler(logged)
    handler.addFilter(RedactQueryTokens())
    uvicorn_log = logging.getLogger("uvicorn.error")
    uvicorn_log.addHandler(handler)
    level = uvicorn_log.level
    uvicorn_log.setLevel(logging.INFO)
    try:
        await _refusals(api, mine, my_vm, theirs, gone, gone_vm, signer)
    finally:
        uvicorn_log.removeHandler(handler)
        uvicorn_log.setLevel(level)
    assert "WebSocket /api/auth/session/" in logged.getvalue()
    assert "token=[redacted]" in logged.getvalue()
    assert signer.mint(mine.id, my_vm.id, now=now).split(".")[2] not in logged.getvalue()


async def _refusals(
    api: Api,
    mine: AuthSession,
    my_vm: Vm,
    theirs: AuthSession,
    gone: AuthSession,
    gone_vm: Vm,
    signer: ViewerSigner,
) -> None:
    clock = api.core.clock
    assert isinstance(clock, ManualClock)
    now = clock.now()
    token = signer.mint(mine.id, my_vm.id, now=now)
    async with serve(api.app, lifespan=False) as url:
        base = "ws" + url.removeprefix("http") + "/api/auth/session/{}/vnc"
        # No token; a token for another session; a forged one.
        invalid = (4401, "invalid_viewer_token")
        assert await _ws_refusal(base.format(mine.id)) == invalid
        assert await _ws_refusal(base.format(theirs.id) + f"?token={token}") == invalid
        assert await _ws_refusal(base.format(mine.id) + f"?token={token[:-2]}xx") == invalid
        # A valid token whose VM cannot be reached (API tests boot no VM): 4503, not a hang.
        refusal = await _ws_refusal(base.format(mine.id) + f"?token={token}")
        assert refusal == (4503, "runtime_failure")
        # A genuine token after its VM is gone.
        late = signer.mint(gone.id, gone_vm.id, now=now)
        refusal = await _ws_refusal(base.format(gone.id) + f"?token={late}")
        assert refusal == (4404, "vm_not_viewable")
        # The same token a millisecond before its TTL (2 s here) ends, and once it has.
        clock.advance(seconds=(now + timedelta(seconds=2) - clock.now()).total_seconds() - 0.001)
        refusal = await _ws_refusal(base.format(mine.id) + f"?token={token}")
        assert refusal == (4503, "runtime_failure")
        clock.advance(seconds=0.001)
        refusal = await _ws_refusal(base.format(mine.id) + f"?token={token}")
        assert refusal == (4401, "viewer_token_expired")
    assert api.app.state.viewers.count() == 0
