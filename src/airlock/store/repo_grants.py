"""``Repo``'s queries of the captured credentials and the logins with one holder
(``domain.grants``: ``grants``, ``grant_versions``)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import and_, func, or_, select, update

from airlock.store.rows import Rows
from airlock.store.tables import (
    Credential,
    Grant,
    GrantVersion,
)


class GrantRows(Rows):
    async def count_grants(self) -> list[tuple[str, str, int]]:
        """Logins not superseded, by provider and health state (the metrics' gauge)."""
        rows = await self.session.execute(
            select(Grant.provider, Grant.state, func.count())
            .where(Grant.superseded_at.is_(None))
            .group_by(Grant.provider, Grant.state)
        )
        return [(p, s, int(n)) for p, s, n in rows.all()]

    async def set_grant_health(
        self,
        grant_id: str,
        *,
        expect_state: str,
        expect_version: int,
        expect_holder: str | None,
        now: datetime,
        **values: Any,
    ) -> bool:
        """Record a health decision, only if nobody changed the login's state, version or
        holder since it was read and no move has its lease now (a move or a renewal in
        between wins: what was checked may have been its files on their way; the next round
        decides again)."""
        holder = (
            Grant.holder_vm_id.is_(None)
            if expect_holder is None
            else Grant.holder_vm_id == expect_holder
        )
        result = await self.session.execute(
            update(Grant)
            .where(
                Grant.id == grant_id,
                Grant.state == expect_state,
                Grant.current_version == expect_version,
                holder,
                or_(Grant.move_lease_until.is_(None), Grant.move_lease_until <= now),
            )
            .values(**values)
            .execution_options(synchronize_session=False)
        )
        return bool(getattr(result, "rowcount", 0))

    # --- credentials -------------------------------------------------------------------
    def add_credential(self, credential: Credential) -> None:
        self.session.add(credential)

    async def credential_of_session(self, session_id: str) -> Credential | None:
        return await self.session.scalar(
            select(Credential).where(Credential.session_id == session_id)
        )

    async def credentials_of(self, session_ids: Sequence[str]) -> dict[str, Credential]:
        if not session_ids:
            return {}
        rows = await self.session.scalars(
            select(Credential).where(Credential.session_id.in_(list(session_ids)))
        )
        return {c.session_id: c for c in rows}

    async def captures_without_grant(self, user_id: str, provider: str) -> list[Credential]:
        """Captures written by a controller that knew no logins (oldest first)."""
        rows = await self.session.scalars(
            select(Credential)
            .where(
                Credential.user_id == user_id,
                Credential.provider == provider,
                Credential.grant_id.is_(None),
            )
            .order_by(Credential.captured_at, Credential.id)
        )
        return list(rows)

    # --- grants (logins with one holder; domain.grants) --------------------------------
    def add_grant(self, grant: Grant) -> None:
        self.session.add(grant)

    def add_grant_version(self, version: GrantVersion) -> None:
        self.session.add(version)

    async def grant(self, grant_id: str, *, lock: bool = False) -> Grant | None:
        """One login; with ``lock`` on PostgreSQL its row is locked (``FOR UPDATE``) until
        the transaction ends. On SQLite the transaction's ``BEGIN IMMEDIATE`` already holds
        the database's one write lock, across processes too."""
        query = select(Grant).where(Grant.id == grant_id)
        if lock and self.postgres:
            query = query.with_for_update()
        return await self.session.scalar(query.execution_options(populate_existing=True))

    async def grants(
        self,
        *,
        user_id: str | None = None,
        provider: str | None = None,
        account: str | None = None,
        holder_vm_id: str | None = None,
        held: bool | None = None,
        superseded: bool | None = False,
    ) -> list[Grant]:
        """Logins, newest first; by default only those not superseded by a newer one."""
        query = select(Grant).order_by(Grant.created_at.desc(), Grant.id.desc())
        if user_id is not None:
            query = query.where(Grant.user_id == user_id)
        if provider is not None:
            query = query.where(Grant.provider == provider)
        if account is not None:
            query = query.where(Grant.account == account)
        if holder_vm_id is not None:
            query = query.where(Grant.holder_vm_id == holder_vm_id)
        if held is True:
            query = query.where(Grant.holder_vm_id.is_not(None))
        elif held is False:
            query = query.where(Grant.holder_vm_id.is_(None))
        if superseded is True:
            query = query.where(Grant.superseded_at.is_not(None))
        elif superseded is False:
            query = query.where(Grant.superseded_at.is_(None))
        return list(await self.session.scalars(query.execution_options(populate_existing=True)))

    async def grant_version(self, grant_id: str, version: int) -> GrantVersion | None:
        return await self.session.scalar(
            select(GrantVersion)
            .where(GrantVersion.grant_id == grant_id, GrantVersion.version == version)
            .execution_options(populate_existing=True)
        )

    async def grant_versions(self, grant_ids: Sequence[str]) -> list[GrantVersion]:
        """Every version of these logins (secrets included: callers show metadata only)."""
        if not grant_ids:
            return []
        rows = await self.session.scalars(
            select(GrantVersion)
            .where(GrantVersion.grant_id.in_(list(grant_ids)))
            .order_by(GrantVersion.grant_id, GrantVersion.version)
        )
        return list(rows)

    async def set_grant(self, grant_id: str, **values: Any) -> bool:
        """Update fields of a login (its health, its holder); report whether it exists."""
        result = await self.session.execute(
            update(Grant)
            .where(Grant.id == grant_id)
            .values(**values)
            .execution_options(synchronize_session=False)
        )
        return bool(result.rowcount)  # type: ignore[attr-defined]

    async def claim_move(
        self, grant_id: str, *, owner: str, now: datetime, until: datetime, target: str | None
    ) -> bool:
        """Take the move lease of a login when nobody holds it (or theirs ran out). The row
        is locked first (``grant(lock=True)``), so two controllers cannot both take it."""
        result = await self.session.execute(
            update(Grant)
            .where(
                Grant.id == grant_id,
                or_(Grant.move_lease_until.is_(None), Grant.move_lease_until <= now),
            )
            .values(
                move_owner=owner, move_lease_until=until, move_target_vm_id=target, updated_at=now
            )
            .execution_options(synchronize_session=False)
        )
        return bool(result.rowcount)  # type: ignore[attr-defined]

    async def set_grant_if_owner(self, grant_id: str, owner: str, **values: Any) -> bool:
        """Update a login only while ``owner`` still holds its move lease."""
        result = await self.session.execute(
            update(Grant)
            .where(Grant.id == grant_id, Grant.move_owner == owner)
            .values(**values)
            .execution_options(synchronize_session=False)
        )
        return bool(result.rowcount)  # type: ignore[attr-defined]

    async def add_version(
        self,
        grant: Grant,
        *,
        source: str,
        key_id: str,
        nonce: bytes,
        ciphertext: bytes,
        now: datetime,
        session_id: str | None = None,
        vm_id: str | None = None,
    ) -> int:
        """Seal a new newest version of a login: the previous one is superseded (its secret
        wiped later, after the retention) and the grant points at the new one."""
        number = grant.current_version + 1
        await self.session.execute(
            update(GrantVersion)
            .where(GrantVersion.grant_id == grant.id, GrantVersion.superseded_at.is_(None))
            .values(superseded_at=now)
            .execution_options(synchronize_session=False)
        )
        self.session.add(
            GrantVersion(
                grant_id=grant.id,
                version=number,
                source=source,
                session_id=session_id,
                vm_id=vm_id,
                key_id=key_id,
                nonce=nonce,
                ciphertext=ciphertext,
                created_at=now,
            )
        )
        await self.set_grant(grant.id, current_version=number, updated_at=now)
        grant.current_version = number
        return number

    async def supersede_versions(self, grant_id: str, *, now: datetime) -> None:
        """Every version of a login that a newer login replaced is superseded now."""
        await self.session.execute(
            update(GrantVersion)
            .where(GrantVersion.grant_id == grant_id, GrantVersion.superseded_at.is_(None))
            .values(superseded_at=now)
            .execution_options(synchronize_session=False)
        )

    async def wipe_versions(
        self, *, superseded_before: datetime, now: datetime, grant_ids: Sequence[str] | None = None
    ) -> int:
        """Wipe the secrets of versions superseded before ``superseded_before`` (their
        metadata stays for audit), and of the capture rows they came from. Returns how many."""
        cond = and_(
            GrantVersion.wiped_at.is_(None),
            GrantVersion.superseded_at.is_not(None),
            GrantVersion.superseded_at <= superseded_before,
        )
        if grant_ids is not None:
            cond = and_(cond, GrantVersion.grant_id.in_(list(grant_ids)))
        sessions = [
            s
            for s in await self.session.scalars(
                select(GrantVersion.session_id).where(
                    cond, GrantVersion.source == "capture", GrantVersion.session_id.is_not(None)
                )
            )
            if s
        ]
        result = await self.session.execute(
            update(GrantVersion)
            .where(cond)
            .values(key_id=None, nonce=None, ciphertext=None, wiped_at=now)
            .execution_options(synchronize_session=False)
        )
        if sessions:
            # The capture row's copy of the same secret goes too (empty, not NULL: the
            # column predates grants); key rotation skips it.
            await self.session.execute(
                update(Credential)
                .where(Credential.session_id.in_(sessions))
                .values(nonce=b"", ciphertext=b"")
                .execution_options(synchronize_session=False)
            )
        return int(result.rowcount)  # type: ignore[attr-defined]
