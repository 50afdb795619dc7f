"""Migration 0005_grants on a database that already holds captures (SQLite and PostgreSQL):
every credentials row becomes a login whose version 1 still opens, held by the VM it was
injected into while that VM lives, else by the vault; older captures of the same account are
superseded by the newest."""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from alembic import command
from sqlalchemy import insert, select
from sqlalchemy.engine import Connection

from airlock.domain.grants import version_context
from airlock.store.db import Database, _alembic_config
from airlock.store.tables import AuthSession, Credential, Grant, Vm
from airlock.vault import Sealed, Vault

T0 = datetime(2026, 11, 30, 9, 0, tzinfo=UTC)


def _to(revision: str) -> Callable[[Connection], None]:
    def run(connection: Connection) -> None:
        command.upgrade(_alembic_config(connection), revision)

    return run


async def test_existing_captures_become_grants(db_url: str) -> None:
    vault = Vault({"k1": os.urandom(32)}, "k1")
    db = Database(db_url)
    try:
        async with db.engine.begin() as conn:
            await conn.run_sync(_to("0004"))
        rows = [
            # (session, user, provider, account, injected into, captured minutes after T0)
            ("s-old", "alice", "codex", {"email": "A@x.org"}, "vm-gone", 0),
            ("s-new", "alice", "codex", {"email": "a@x.org"}, "vm-live", 5),
            ("s-claude", "alice", "claude_code", {"id": "acc-1"}, "vm-gone", 1),
            ("s-bob", "bob", "codex", {}, None, 2),
        ]
        async with db.engine.begin() as conn:
            for vm_id, state in (("vm-gone", "destroyed"), ("vm-live", "running")):
                await conn.execute(
                    insert(Vm).values(
                        id=vm_id,
                        role="cli",
                        runtime="sandbox",
                        node="",
                        user_id="alice",
                        state=state,
                        created_at=T0,
                        updated_at=T0,
                        destroy_attempts=0,
                        warm=False,
                        detail={},
                    )
                )
            for sid, user, provider, account, into, minutes in rows:
                at = T0 + timedelta(minutes=minutes)
                await conn.execute(
                    insert(AuthSession).values(
                        id=sid,
                        user_id=user,
                        provider=provider,
                        status="completed",
                        created_at=at,
                        updated_at=at,
                    )
                )
                sealed = vault.seal(f"secret of {sid}".encode(), context=f"{sid}:{provider}")
                await conn.execute(
                    insert(Credential).values(
                        id=f"c-{sid}",
                        session_id=sid,
                        user_id=user,
                        provider=provider,
                        key_id=sealed.key_id,
                        nonce=sealed.nonce,
                        ciphertext=sealed.ciphertext,
                        account=account,
                        scopes=[],
                        captured_at=at,
                        injected_vm_id=into,
                        injected_at=at if into else None,
                    )
                )
        await db.migrate()
        async with db.read() as repo:
            grants = {g.session_id or "": g for g in await repo.grants(superseded=None)}
            versions = {v.grant_id: v for v in await repo.grant_versions(list(grants_ids(grants)))}
            creds = {c.session_id: c for c in await repo.session.scalars(select(Credential))}
        assert set(grants) == {"s-old", "s-new", "s-claude", "s-bob"}
        new, old = grants["s-new"], grants["s-old"]
        assert (new.account, new.holder_vm_id, new.superseded_at) == ("a@x.org", "vm-live", None)
        assert (old.account, old.holder_vm_id, old.superseded_by) == ("a@x.org", None, new.id)
        assert old.superseded_at == T0 + timedelta(minutes=5)
        assert grants["s-claude"].holder_vm_id is None  # its VM is destroyed: the vault has it
        assert (grants["s-claude"].account, grants["s-bob"].account) == ("acc-1", "")
        for sid, grant in grants.items():
            assert grant.state == "active" and grant.current_version == 1
            assert creds[sid].grant_id == grant.id
            version = versions[grant.id]
            assert (version.version, version.source, version.session_id) == (1, "capture", sid)
            assert version.key_id is not None and version.nonce and version.ciphertext
            opened = vault.open_sealed(
                Sealed(version.key_id, version.nonce, version.ciphertext),
                context=version_context(
                    grant_id=grant.id,
                    version=1,
                    provider=grant.provider,
                    source=version.source,
                    session_id=version.session_id,
                ),
            )
            assert opened == f"secret of {sid}".encode()
        assert versions[old.id].superseded_at == old.superseded_at
        assert versions[new.id].superseded_at is None
        # The wipe of superseded versions takes the capture row's copy too.
        async with db.transaction() as repo:
            wiped = await repo.wipe_versions(superseded_before=T0 + timedelta(hours=1), now=T0)
        assert wiped == 1
        async with db.read() as repo:
            after = {v.grant_id: v for v in await repo.grant_versions(list(grants_ids(grants)))}
            old_cred = await repo.credential_of_session("s-old")
            new_cred = await repo.credential_of_session("s-new")
        assert after[old.id].ciphertext is None and after[old.id].wiped_at == T0
        assert after[new.id].ciphertext == versions[new.id].ciphertext
        assert old_cred is not None and old_cred.ciphertext == b""
        assert new_cred is not None and new_cred.ciphertext
        # And back down: the credentials rows are as they were.
        async with db.engine.begin() as conn:
            await conn.run_sync(_down("0004"))
            count = len((await conn.execute(select(Credential.__table__.c.id))).all())
        assert count == 4
    finally:
        await db.close()


def grants_ids(grants: dict[str, Grant]) -> list[str]:
    return [g.id for g in grants.values()]


def _down(revision: str) -> Callable[[Connection], None]:
    def run(connection: Connection) -> None:
        command.downgrade(_alembic_config(connection), revision)

    return run
