"""How a login's versions are sealed and how a capture becomes a login (``record_capture``):
the part of ``services.grants`` that needs no VM. A version's plaintext is the provider's
normalised ``Credentials`` as JSON; its AEAD context binds it to its login and version."""

from __future__ import annotations

import base64
import json
from dataclasses import asdict
from datetime import datetime
from typing import Any

from airlock.domain import grants as policy
from airlock.domain.grants import VersionSource
from airlock.errors import CredentialError
from airlock.providers.base import Account, Credentials
from airlock.store.repo import Repo
from airlock.store.tables import Grant, GrantVersion


def credentials_body(creds: Credentials) -> bytes:
    """What the vault seals for a login's version (the capture's format, ``sessions``)."""
    body: dict[str, Any] = {
        "provider": creds.provider,
        "accessToken": creds.access_token,
        "refreshToken": creds.refresh_token,
        "expiresAt": creds.expires_at.isoformat() if creds.expires_at else None,
        "scopes": creds.scopes,
        "account": asdict(creds.account),
        "plan": creds.plan,
        "raw": {path: base64.b64encode(data).decode() for path, data in creds.raw.items()},
    }
    return json.dumps(body).encode()


def credentials_from_body(provider: str, plaintext: bytes) -> Credentials:
    body = json.loads(plaintext)
    try:
        raw = {p: base64.b64decode(d) for p, d in body["raw"].items()}
    except (KeyError, TypeError, ValueError):
        raise CredentialError("the stored credentials carry no raw files") from None
    account = body.get("account") or {}
    expires = body.get("expiresAt")
    return Credentials(
        provider=provider,
        access_token=body.get("accessToken") or "",
        refresh_token=body.get("refreshToken"),
        expires_at=datetime.fromisoformat(expires) if isinstance(expires, str) else None,
        scopes=list(body.get("scopes") or []),
        account=Account(
            id=account.get("id"),
            email=account.get("email"),
            organization=account.get("organization"),
        ),
        plan=body.get("plan"),
        raw=raw,
    )


def context_of(grant: Grant, version: GrantVersion) -> str:
    return policy.version_context(
        grant_id=grant.id,
        version=version.version,
        provider=grant.provider,
        source=version.source,
        session_id=version.session_id,
    )


async def record_capture(repo: Repo, session_id: str, *, now: datetime) -> list[Grant]:
    """In the capture's transaction: the capture becomes a login, its sealed blob version 1.
    Logins of the same user, provider and account are superseded (renewal in place) and
    their secrets wiped now; they are returned, so the handoff can place the new one where
    the old one was."""
    credential = await repo.credential_of_session(session_id)
    if credential is None:
        return []
    account = policy.account_key(credential.account)
    previous = await repo.grants(
        user_id=credential.user_id, provider=credential.provider, account=account
    )
    repo.add_grant(
        Grant(
            id=credential.id,
            user_id=credential.user_id,
            provider=credential.provider,
            account=account,
            session_id=credential.session_id,
            holder_vm_id=None,
            state=policy.GrantState.ACTIVE.value,
            access_expires_at=credential.expires_at,
            current_version=1,
            created_at=now,
            updated_at=now,
        )
    )
    repo.add_grant_version(
        GrantVersion(
            grant_id=credential.id,
            version=1,
            source=VersionSource.CAPTURE.value,
            session_id=credential.session_id,
            key_id=credential.key_id,
            nonce=credential.nonce,
            ciphertext=credential.ciphertext,
            created_at=now,
        )
    )
    credential.grant_id = credential.id
    await repo.session.flush()
    for old in previous:
        await repo.set_grant(old.id, superseded_at=now, superseded_by=credential.id, updated_at=now)
        await repo.supersede_versions(old.id, now=now)
    if previous:
        await repo.wipe_versions(superseded_before=now, now=now, grant_ids=[g.id for g in previous])
        for old in previous:
            repo.add_event(
                at=now,
                kind="credential",
                subject_id=old.session_id or old.id,
                session_id=old.session_id,
                vm_id=old.holder_vm_id,
                cause="superseded",
                actor="controller",
                detail={
                    "provider": old.provider,
                    "grantId": old.id,
                    "by": credential.id,
                    "bySession": credential.session_id,
                    "holder": old.holder_vm_id,
                },
            )
    return previous
