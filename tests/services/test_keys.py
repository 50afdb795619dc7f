"""Key rotation on a real database (SQLite and PostgreSQL) with a real key file: every row
re-encrypted, a running controller's vault follows the file, old keys kept until no row
needs them, and a rotation that cannot finish leaves everything readable."""

from __future__ import annotations

import json
import secrets
import stat
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import select, update

from airlock.services.core import Core
from airlock.services.keys import rotate
from airlock.store.tables import AuthSession, Credential
from airlock.vault import Sealed, Vault, VaultError
from tests.services.conftest import CoreFactory

NOW = datetime(2026, 11, 28, tzinfo=UTC)


async def add_credentials(core: Core, n: int) -> dict[str, bytes]:
    """``n`` captured credentials sealed under the current key; plaintext by session id."""
    assert core.vault is not None
    plain: dict[str, bytes] = {}
    async with core.db.transaction() as repo:
        for i in range(n):
            sid = secrets.token_hex(16)
            repo.add_session(
                AuthSession(
                    id=sid,
                    user_id="alice",
                    provider="oauth2",
                    status="completed",
                    created_at=NOW,
                    updated_at=NOW,
                )
            )
            await repo.session.flush()
            plain[sid] = json.dumps({"accessToken": f"test-token-{i}"}).encode()
            sealed = core.vault.seal(plain[sid], context=f"{sid}:oauth2")
            repo.add_credential(
                Credential(
                    id=secrets.token_hex(8),
                    session_id=sid,
                    user_id="alice",
                    provider="oauth2",
                    key_id=sealed.key_id,
                    nonce=sealed.nonce,
                    ciphertext=sealed.ciphertext,
                    account={},
                    scopes=[],
                    captured_at=NOW,
                )
            )
    return plain


async def rows(core: Core) -> list[Credential]:
    async with core.db.transaction() as repo:
        return list(await repo.session.scalars(select(Credential)))


def key_file(core: Core) -> dict[str, object]:
    body: dict[str, object] = json.loads(core.settings.key_file.read_text())
    return body


async def test_rotation_reencrypts_every_row_and_a_running_vault_follows(
    make_core: CoreFactory,
) -> None:
    core = await make_core(start=False)
    assert core.vault is not None
    old = core.vault.current
    plain = await add_credentials(core, 5)
    running = Vault.open(core.settings.key_file)  # another controller, already running

    report = await rotate(core.db, core.vault, core.clock, batch=2)

    assert report.reencrypted == 5 and report.dropped == [old] and report.new_key != old
    body = key_file(core)
    assert body["current"] == report.new_key and list(body["keys"]) == [report.new_key]  # type: ignore[call-overload]
    assert stat.S_IMODE(core.settings.key_file.stat().st_mode) == 0o600
    for row in await rows(core):
        assert row.key_id == report.new_key
        sealed = Sealed(row.key_id, row.nonce, row.ciphertext)
        # The running controller reads the re-encrypted rows without a restart...
        assert (
            running.open_sealed(sealed, context=f"{row.session_id}:oauth2") == plain[row.session_id]
        )
    # ...and seals new captures under the new key.
    assert running.seal(b"x", context="c").key_id == report.new_key


async def test_a_rotation_that_cannot_finish_keeps_every_old_key(make_core: CoreFactory) -> None:
    core = await make_core(start=False)
    assert core.vault is not None
    old = core.vault.current
    plain = await add_credentials(core, 3)
    victim = (await rows(core))[0]
    async with core.db.transaction() as repo:  # a tampered row: it cannot be re-encrypted
        await repo.session.execute(
            update(Credential)
            .where(Credential.id == victim.id)
            # Every bit of the first byte flipped: a constant byte left it as it was when
            # the ciphertext began with it (1 run in 256).
            .values(ciphertext=bytes([victim.ciphertext[0] ^ 0xFF]) + victim.ciphertext[1:])
        )

    with pytest.raises(VaultError, match="does not decrypt"):
        await rotate(core.db, core.vault, core.clock, batch=1)

    keys = key_file(core)["keys"]
    assert old in keys and len(keys) == 2  # type: ignore[arg-type]
    fresh = Vault.open(core.settings.key_file)
    for row in await rows(core):
        if row.id != victim.id:  # every good row still decrypts, whichever key it is under
            sealed = Sealed(row.key_id, row.nonce, row.ciphertext)
            assert (
                fresh.open_sealed(sealed, context=f"{row.session_id}:oauth2")
                == plain[row.session_id]
            )


def test_a_key_file_others_can_read_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "secret.key"
    Vault.open(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    before = path.read_bytes()
    path.chmod(0o644)
    with pytest.raises(VaultError, match=r"mode 0644.*chmod 600") as info:
        Vault.open(path)
    assert before.decode() not in info.value.message
    assert path.read_bytes() == before  # nothing rewritten


def test_a_running_vault_refuses_a_key_file_that_became_readable(tmp_path: Path) -> None:
    path = tmp_path / "secret.key"
    vault = Vault.open(path)
    other = Vault.open(path)
    other.add_key()  # the file changes: the next seal reloads it...
    path.chmod(0o640)  # ...and finds it readable by its group
    with pytest.raises(VaultError, match="readable by its owner only"):
        vault.seal(b"x", context="c")


async def test_rotation_covers_login_versions_and_skips_wiped_secrets(
    make_core: CoreFactory,
) -> None:
    """Each capture is a login's version 1 (the same sealed blob) and later versions are
    sealed under their own context: all are re-encrypted. A wiped secret has nothing to
    rotate: it neither fails the rotation nor keeps an old key alive."""
    from airlock.services.grant_records import context_of, record_capture

    core = await make_core(start=False)
    assert core.vault is not None
    plain = await add_credentials(core, 3)
    sids = sorted(plain)
    async with core.db.transaction() as repo:
        for sid in sids:
            await record_capture(repo, sid, now=NOW)
        # Two logins of one account: the older one is superseded and wiped at once.
        wiped_grant = (await repo.grants(user_id="alice", superseded=True))[0]
    report = await rotate(core.db, core.vault, core.clock)
    assert report.dropped  # no row kept the old key alive
    async with core.db.read() as repo:
        grants = await repo.grants(user_id="alice", superseded=None)
        versions = await repo.grant_versions([g.id for g in grants])
    by_id = {g.id: g for g in grants}
    opened = 0
    for v in versions:
        if v.grant_id == wiped_grant.id or v.wiped_at is not None:
            assert v.ciphertext is None
            continue
        assert v.key_id == report.new_key and v.nonce and v.ciphertext
        got = core.vault.open_sealed(
            Sealed(v.key_id, v.nonce, v.ciphertext), context=context_of(by_id[v.grant_id], v)
        )
        assert got == plain[v.session_id or ""]
        opened += 1
    assert opened == 1  # three captures of one account ("" here): the newest is the login
