"""``POST /api/vms/{vmId}/credentials``: who may ask, and the refusals. (The injection
itself, into real CLI VMs, is tested in ``tests/services/test_handoff.py``.)"""

from __future__ import annotations

import json
from base64 import b64encode

from sqlalchemy import update

from airlock.domain.sessions import SessionStatus
from airlock.domain.vms import VmRole, VmState
from airlock.providers.oauth2 import TOKENS_PATH
from airlock.services.grant_records import record_capture
from airlock.store.tables import AuthSession, Credential
from tests.api.conftest import Api
from tests.api.test_routes import SECRET
from tests.api.test_routes import add_credential as add_metadata_only


async def add_credential(api: Api, session: AuthSession) -> None:
    """A capture as ``SessionService`` stores it: with the raw token file."""
    assert api.core.vault is not None
    raw = json.dumps({"access_token": SECRET, "token_type": "Bearer"}).encode()
    plaintext = json.dumps(
        {"provider": "oauth2", "accessToken": SECRET, "raw": {TOKENS_PATH: b64encode(raw).decode()}}
    ).encode()
    await add_metadata_only(api, session)
    sealed = api.core.vault.seal(plaintext, context=f"{session.id}:oauth2")
    async with api.core.db.transaction() as repo:
        await repo.session.execute(
            update(Credential)
            .where(Credential.session_id == session.id)
            .values(key_id=sealed.key_id, nonce=sealed.nonce, ciphertext=sealed.ciphertext)
        )


async def post(api: Api, vm_id: str, who: str, body: dict[str, object]) -> tuple[int, dict]:  # type: ignore[type-arg]
    r = await api.client.post(f"/api/vms/{vm_id}/credentials", json=body, headers=api.auth(who))
    assert SECRET not in r.text
    return r.status_code, r.json()


async def events(api: Api, session_id: str) -> list[str]:
    session, _ = await api.core.sessions.get(session_id, None)
    return [e.cause for e in await api.core.sessions.events(session)]


async def test_refusals_are_clear_and_change_nothing(api: Api) -> None:
    session, _ = await api.add_session("alice", status=SessionStatus.COMPLETED)
    await add_credential(api, session)
    alices = await api.add_vm("alice")
    bobs = await api.add_vm("bob")
    browser = await api.add_vm("alice", role=VmRole.BROWSER)
    dying = await api.add_vm("alice", state=VmState.DESTROYING)

    # Someone else's VM, a browser VM, a VM that does not exist: 404 alike.
    for vm_id in (bobs.id, browser.id, "vm-0000000000000000"):
        status, body = await post(api, vm_id, "alice", {"provider": "oauth2"})
        assert status == 404 and body["error"]["code"] == "vm_not_found", body
    # A user token cannot act for another user.
    status, body = await post(api, alices.id, "alice", {"provider": "oauth2", "userId": "bob"})
    assert status == 403
    # No capture for that provider yet; an unknown provider; a bad body.
    status, body = await post(api, bobs.id, "bob", {"provider": "oauth2"})
    assert status == 404 and body["error"]["code"] == "credentials_not_found"
    assert "log in first" in body["error"]["message"]
    status, body = await post(api, alices.id, "alice", {"provider": "nope"})
    assert status == 404 and body["error"]["code"] == "provider_not_found"
    status, _ = await post(api, alices.id, "alice", {"provider": "oauth2", "extra": "x"})
    assert status == 422
    for junk in ("yes", 1, None, [True]):
        status, body = await post(api, alices.id, "alice", {"provider": "oauth2", "force": junk})
        assert status == 422 and body["error"]["code"], (junk, body)

    # A VM being destroyed: 409, recorded, and the credentials row says nothing injected.
    status, body = await post(api, dying.id, "alice", {"provider": "oauth2"})
    assert status == 409 and body["error"]["code"] == "vm_not_running"
    assert "being destroyed" in body["error"]["message"]
    assert "injection_failed" in await events(api, session.id)
    cred = await api.core.sessions.credential(session.id)
    assert cred is not None and cred.injected_vm_id is None

    # A running VM the runtime cannot reach: 503, recorded, nothing injected.
    status, body = await post(api, alices.id, "alice", {"provider": "oauth2"})
    assert status == 503 and body["error"]["code"] == "injection_failed", body
    cred = await api.core.sessions.credential(session.id)
    assert cred is not None and cred.injected_vm_id is None


async def test_a_service_token_names_the_user(api: Api) -> None:
    session, _ = await api.add_session("alice", status=SessionStatus.COMPLETED)
    await add_credential(api, session)
    vm = await api.add_vm("alice", state=VmState.DESTROYING)
    status, body = await post(api, vm.id, "service", {"provider": "oauth2"})
    assert status == 400 and body["error"]["code"] == "user_required"
    status, body = await post(api, vm.id, "service", {"provider": "oauth2", "userId": "alice"})
    assert status == 409  # reached the VM check: the service acted for alice


async def test_a_holder_that_cannot_be_reached_refuses_the_move_unless_forced(api: Api) -> None:
    """The login is held by a VM the runtime cannot reach (``NoVmRuntime``): the move is
    refused with a clear 503 that names the way out, and nothing changes; with ``force``
    it goes ahead (and here fails at the target, which cannot be reached either)."""
    session, _ = await api.add_session("alice", status=SessionStatus.COMPLETED)
    await add_credential(api, session)
    holder = await api.add_vm("alice")
    target = await api.add_vm("alice")
    async with api.core.db.transaction() as repo:
        for capture in await repo.captures_without_grant("alice", "oauth2"):
            await record_capture(repo, capture.session_id, now=capture.captured_at)
        (grant,) = await repo.grants(user_id="alice", provider="oauth2")
        await repo.set_grant(grant.id, holder_vm_id=holder.id)

    status, body = await post(api, target.id, "alice", {"provider": "oauth2"})
    assert status == 503 and body["error"]["code"] == "holder_unreachable", body
    assert holder.id in body["error"]["message"] and "force" in body["error"]["message"]
    async with api.core.db.read() as repo:
        after = await repo.grant(grant.id)
    assert after is not None and after.holder_vm_id == holder.id  # nothing moved
    assert after.move_owner is None  # and the lease is free again
    assert "move_refused" in await events(api, session.id)

    status, body = await post(api, target.id, "alice", {"provider": "oauth2", "force": True})
    assert status == 503 and body["error"]["code"] == "injection_failed", body
    causes = await events(api, session.id)
    assert "move_forced" in causes and causes[-1] == "injection_failed"
    async with api.core.db.read() as repo:
        after = await repo.grant(grant.id)
    assert after is not None and after.holder_vm_id is None  # the vault has it now
