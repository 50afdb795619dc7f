"""``airlock vault rotate``: every credential (each capture, each login version) re-encrypted
under a new key, while the controller keeps running.

1. A new key is added to the key file and made current (the file is replaced atomically;
   running controllers reload it at their next seal or read, so new captures use it).
2. Rows still under an older key are re-encrypted a few at a time, each batch its own short
   transaction, with a conditional update (only if the row still has the key id we read),
   so a concurrent writer is never overwritten and no lock is held for long.
3. Only when a full pass finds no row under an old key are the old keys dropped from the
   file. Until then every old key stays readable: a crash at any step leaves a key file and
   rows that decrypt, and running ``rotate`` again finishes the job.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from sqlalchemy import select, update

from airlock.clock import Clock
from airlock.services.grant_records import context_of
from airlock.store.db import Database
from airlock.store.tables import Credential, Grant, GrantVersion
from airlock.vault import Sealed, Vault, VaultError

log = logging.getLogger("airlock.keys")

BATCH = 50
MAX_PASSES = 20


@dataclass(slots=True)
class RotationReport:
    new_key: str
    reencrypted: int = 0
    dropped: list[str] = field(default_factory=list)
    passes: int = 0


async def rotate(db: Database, vault: Vault, clock: Clock, *, batch: int = BATCH) -> RotationReport:
    new_key = vault.add_key()
    report = RotationReport(new_key=new_key)
    log.info("vault rotation: new current key %s", new_key)
    while report.passes < MAX_PASSES:
        report.passes += 1
        moved = await _pass(db, vault, new_key, batch)
        moved += await _pass_versions(db, vault, new_key, batch)
        report.reencrypted += moved
        if moved == 0 and not await _old_rows(db, new_key, 1):
            break
    else:
        raise VaultError("rows kept appearing under old keys; old keys were kept")
    report.dropped = vault.drop_keys({new_key})
    async with db.transaction() as repo:
        repo.add_event(
            at=clock.now(),
            kind="vault",
            subject_id=new_key,
            cause="key_rotated",
            actor="cli",
            detail={"reencrypted": report.reencrypted, "dropped": report.dropped},
        )
    log.info(
        "vault rotation done: %d re-encrypted, %d old key(s) dropped",
        report.reencrypted,
        len(report.dropped),
    )
    return report


# A wiped secret (a superseded capture, ``store.repo.wipe_versions``) has nothing to rotate.
_SEALED_CREDENTIAL = Credential.nonce != b""
_SEALED_VERSION = GrantVersion.ciphertext.is_not(None)


async def _old_rows(db: Database, new_key: str, limit: int) -> list[object]:
    async with db.transaction() as repo:
        rows: list[object] = list(
            await repo.session.scalars(
                select(Credential)
                .where(Credential.key_id != new_key, _SEALED_CREDENTIAL)
                .limit(limit)
            )
        )
        rows += list(
            await repo.session.scalars(
                select(GrantVersion)
                .where(GrantVersion.key_id != new_key, _SEALED_VERSION)
                .limit(limit)
            )
        )
        return rows


async def _pass_versions(db: Database, vault: Vault, new_key: str, batch: int) -> int:
    """The sealed versions of logins (``grant_versions``), as ``_pass`` does credentials."""
    moved = 0
    while True:
        async with db.transaction() as repo:
            rows = list(
                (
                    await repo.session.execute(
                        select(GrantVersion, Grant)
                        .join(Grant, Grant.id == GrantVersion.grant_id)
                        .where(GrantVersion.key_id != new_key, _SEALED_VERSION)
                        .order_by(GrantVersion.id)
                        .limit(batch)
                    )
                ).all()
            )
            if not rows:
                return moved
            for row, grant in rows:
                assert row.key_id is not None and row.nonce is not None
                assert row.ciphertext is not None
                context = context_of(grant, row)
                plaintext = vault.open_sealed(
                    Sealed(row.key_id, row.nonce, row.ciphertext), context=context
                )
                sealed = vault.seal(plaintext, context=context)
                if sealed.key_id != new_key:
                    raise VaultError("another rotation made a newer key current; run again")
                result = await repo.session.execute(
                    update(GrantVersion)
                    .where(GrantVersion.id == row.id, GrantVersion.key_id == row.key_id)
                    .values(key_id=sealed.key_id, nonce=sealed.nonce, ciphertext=sealed.ciphertext)
                    .execution_options(synchronize_session=False)
                )
                moved += int(result.rowcount)  # type: ignore[attr-defined]


async def _pass(db: Database, vault: Vault, new_key: str, batch: int) -> int:
    moved = 0
    while True:
        async with db.transaction() as repo:
            rows = list(
                await repo.session.scalars(
                    select(Credential)
                    .where(Credential.key_id != new_key, _SEALED_CREDENTIAL)
                    .order_by(Credential.id)
                    .limit(batch)
                )
            )
            if not rows:
                return moved
            for row in rows:
                context = f"{row.session_id}:{row.provider}"
                plaintext = vault.open_sealed(
                    Sealed(row.key_id, row.nonce, row.ciphertext), context=context
                )
                sealed = vault.seal(plaintext, context=context)
                if sealed.key_id != new_key:
                    raise VaultError("another rotation made a newer key current; run again")
                result = await repo.session.execute(
                    update(Credential)
                    .where(Credential.id == row.id, Credential.key_id == row.key_id)
                    .values(key_id=sealed.key_id, nonce=sealed.nonce, ciphertext=sealed.ciphertext)
                    .execution_options(synchronize_session=False)
                )
                moved += int(result.rowcount)  # type: ignore[attr-defined]
