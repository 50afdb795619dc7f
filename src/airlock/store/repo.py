"""The queries. A ``Repo`` is bound to one transaction (``Database.transaction()``).

State changes are *conditional* updates (``WHERE state IN (expected)``) that report whether
they won: two controllers, or a request racing the scheduler, can try the same move and
exactly one succeeds. That is what makes destroy exactly-once (invariant 3).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import and_, func, or_, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession

from airlock.domain.quotas import Usage
from airlock.domain.sessions import LIVE as LIVE_SESSIONS
from airlock.domain.sessions import SessionStatus
from airlock.domain.vms import DESTROYABLE, LIVE, VmRole, VmState
from airlock.store.tables import (
    AuthSession,
    ClusterKey,
    Credential,
    EgressHost,
    Event,
    Grant,
    GrantVersion,
    Node,
    Token,
    Vm,
)


class Repo:
    def __init__(self, session: AsyncSession, *, postgres: bool, node: str = "") -> None:
        self.session = session
        self.postgres = postgres
        self.node = node  # this controller's host: the rows its runtime can act on

    async def ping(self) -> None:
        await self.session.execute(text("SELECT 1"))

    # --- events ------------------------------------------------------------------------
    def add_event(
        self,
        *,
        at: datetime,
        kind: str,
        subject_id: str,
        cause: str,
        actor: str,
        session_id: str | None = None,
        vm_id: str | None = None,
        from_state: str | None = None,
        to_state: str | None = None,
        detail: dict[str, Any] | None = None,
    ) -> None:
        self.session.add(
            Event(
                at=at,
                kind=kind,
                subject_id=subject_id,
                session_id=session_id,
                vm_id=vm_id,
                from_state=from_state,
                to_state=to_state,
                cause=cause,
                actor=actor,
                detail=detail or {},
            )
        )

    async def events_for_session(self, session_id: str, vm_ids: Sequence[str]) -> list[Event]:
        cond = Event.session_id == session_id
        if vm_ids:
            cond = or_(cond, Event.vm_id.in_(vm_ids))
        rows = await self.session.scalars(select(Event).where(cond).order_by(Event.id))
        return list(rows)

    # --- egress ------------------------------------------------------------------------
    async def add_egress_count(
        self,
        *,
        session_id: str,
        provider: str,
        host: str,
        port: int,
        decision: str,
        count: int,
        first_at: datetime,
        last_at: datetime,
    ) -> bool:
        """Add ``count`` connections to a host's row (made on first sight); True when new."""
        row = await self.session.scalar(
            select(EgressHost).where(
                EgressHost.session_id == session_id,
                EgressHost.host == host,
                EgressHost.port == port,
                EgressHost.decision == decision,
            )
        )
        if row is not None:
            row.count += count
            row.last_at = max(row.last_at, last_at)
            return False
        self.session.add(
            EgressHost(
                session_id=session_id,
                provider=provider,
                host=host,
                port=port,
                decision=decision,
                count=count,
                first_at=first_at,
                last_at=last_at,
            )
        )
        await self.session.flush()
        return True

    async def egress_hosts(self, session_id: str) -> list[EgressHost]:
        rows = await self.session.scalars(
            select(EgressHost)
            .where(EgressHost.session_id == session_id)
            .order_by(EgressHost.first_at, EgressHost.id)
        )
        return list(rows)

    async def egress_observed(
        self, provider: str, decisions: Sequence[str]
    ) -> list[tuple[str, int, int, datetime, datetime]]:
        """(host, port, sessions, first seen, last seen) of a provider's hosts."""
        rows = await self.session.execute(
            select(
                EgressHost.host,
                EgressHost.port,
                func.count(func.distinct(EgressHost.session_id)),
                func.min(EgressHost.first_at),
                func.max(EgressHost.last_at),
            )
            .where(EgressHost.provider == provider, EgressHost.decision.in_(decisions))
            .group_by(EgressHost.host, EgressHost.port)
            .order_by(EgressHost.host, EgressHost.port)
        )
        return [(h, p, n, a, b) for h, p, n, a, b in rows.all()]

    # --- tokens ------------------------------------------------------------------------
    def add_token(self, token: Token) -> None:
        self.session.add(token)

    async def token_by_hash(self, token_hash: str) -> Token | None:
        return await self.session.scalar(select(Token).where(Token.token_hash == token_hash))

    async def tokens(self) -> list[Token]:
        return list(await self.session.scalars(select(Token).order_by(Token.created_at)))

    async def token(self, token_id: str) -> Token | None:
        return await self.session.get(Token, token_id)

    async def live_tokens_created_by(self, actor: str) -> list[Token]:
        """Unrevoked tokens whose creation event names ``actor``."""
        created = select(Event.subject_id).where(
            Event.kind == "token", Event.cause == "created", Event.actor == actor
        )
        rows = await self.session.scalars(
            select(Token).where(Token.id.in_(created), Token.revoked_at.is_(None))
        )
        return list(rows)

    # --- vms ---------------------------------------------------------------------------
    def add_vm(self, vm: Vm) -> None:
        """A new row. One for this node is booted by its caller: claimed at once. One
        placed on another node waits there for that node to claim it."""
        if not vm.node:
            vm.node = self.node
        if vm.node == self.node and vm.boot_claimed_at is None:
            vm.boot_claimed_at = vm.created_at
        self.session.add(vm)

    async def unclaimed_boots(self, limit: int) -> list[Vm]:
        """Rows placed on this node and not yet taken up, oldest first; on PostgreSQL
        locked, skipping rows another transaction holds (two processes of one node)."""
        query = (
            select(Vm)
            .where(
                Vm.node == self.node,
                Vm.boot_claimed_at.is_(None),
                Vm.state.in_([VmState.CREATING.value, VmState.RUNNING.value]),
            )
            .order_by(Vm.created_at)
            .limit(limit)
        )
        if self.postgres:
            query = query.with_for_update(skip_locked=True)
        return list(await self.session.scalars(query.execution_options(populate_existing=True)))

    async def claim_boot(self, vm_id: str, *, now: datetime) -> bool:
        """Take up a placed row: exactly one claimer wins it."""
        result = await self.session.execute(
            update(Vm)
            .where(Vm.id == vm_id, Vm.node == self.node, Vm.boot_claimed_at.is_(None))
            .values(boot_claimed_at=now, updated_at=now)
            .execution_options(synchronize_session=False)
        )
        return bool(result.rowcount)  # type: ignore[attr-defined]

    async def hand_back(
        self, vm_id: str, *, to: str, now: datetime, detail: dict[str, Any]
    ) -> bool:
        """Give a row this node claimed but will not boot to node ``to``, unclaimed."""
        result = await self.session.execute(
            update(Vm)
            .where(
                Vm.id == vm_id,
                Vm.node == self.node,
                Vm.state.in_([VmState.CREATING.value, VmState.RUNNING.value]),
            )
            .values(node=to, boot_claimed_at=None, updated_at=now, detail=detail)
            .execution_options(synchronize_session=False)
        )
        return bool(result.rowcount)  # type: ignore[attr-defined]

    async def lock_node(self, node: str) -> None:
        """Until the transaction ends, the node's quota lock (as ``lock_quota`` takes it for
        this node): placements onto one node count and insert one at a time."""
        if self.postgres:
            await self.session.execute(
                text("SELECT pg_advisory_xact_lock(:key)"), {"key": _lock_key(f"node:{node}")}
            )

    async def vm(self, vm_id: str, *, lock: bool = False) -> Vm | None:
        query = select(Vm).where(Vm.id == vm_id)
        if lock and self.postgres:
            query = query.with_for_update()
        return await self.session.scalar(query.execution_options(populate_existing=True))

    async def vms(
        self,
        *,
        user_id: str | None = None,
        role: str | None = None,
        states: Iterable[str] | None = None,
        ids: Iterable[str] | None = None,
        limit: int | None = None,
        node: str | None = None,
    ) -> list[Vm]:
        query = select(Vm).order_by(Vm.created_at.desc())
        if node is not None:
            query = query.where(Vm.node == node)
        if user_id is not None:
            query = query.where(Vm.user_id == user_id)
        if role is not None:
            query = query.where(Vm.role == role)
        if states is not None:
            query = query.where(Vm.state.in_(list(states)))
        if ids is not None:
            query = query.where(Vm.id.in_(list(ids)))
        if limit is not None:
            query = query.limit(limit)
        return list(await self.session.scalars(query.execution_options(populate_existing=True)))

    async def live_vms(self) -> list[Vm]:
        """The live rows of this node (another host's VMs are not ours to judge)."""
        return await self.vms(states=list(LIVE), node=self.node)

    async def move_vm(
        self, vm_id: str, expect: Iterable[VmState], to: VmState, **values: Any
    ) -> bool:
        """Move a VM to ``to`` if it is still in one of ``expect``; report whether it did."""
        result = await self.session.execute(
            update(Vm)
            .where(Vm.id == vm_id, Vm.state.in_(list(expect)))
            .values(state=to, **values)
            .execution_options(synchronize_session=False)
        )
        return bool(result.rowcount)  # type: ignore[attr-defined]

    async def set_vm(self, vm_id: str, expect: Iterable[VmState], **values: Any) -> bool:
        """Update fields of a VM still in one of ``expect`` (its state stays)."""
        result = await self.session.execute(
            update(Vm)
            .where(Vm.id == vm_id, Vm.state.in_(list(expect)))
            .values(**values)
            .execution_options(synchronize_session=False)
        )
        return bool(result.rowcount)  # type: ignore[attr-defined]

    async def warm_vms(
        self,
        states: Iterable[VmState],
        *,
        limit: int | None = None,
        lock: bool = False,
        node: str | None = None,
    ) -> list[Vm]:
        """Warm-pool browser VMs (booted ahead, no session yet) of this node (or ``node``),
        oldest first. With ``lock`` (to claim one) on PostgreSQL, rows another transaction
        holds are skipped, so concurrent claims spread out."""
        query = (
            select(Vm)
            .where(Vm.node == (node or self.node), Vm.warm.is_(True), Vm.state.in_(list(states)))
            .order_by(Vm.created_at)
        )
        if limit is not None:
            query = query.limit(limit)
        if lock and self.postgres:
            query = query.with_for_update(skip_locked=True)
        return list(await self.session.scalars(query.execution_options(populate_existing=True)))

    async def claim_warm(self, vm_id: str, *, now: datetime, **values: Any) -> bool:
        """Take a running warm VM for a session: exactly one caller wins it (the row stops
        being warm in the same conditional update), and only before its deadline."""
        result = await self.session.execute(
            update(Vm)
            .where(
                Vm.id == vm_id,
                Vm.warm.is_(True),
                Vm.state == VmState.RUNNING,
                Vm.destroy_after > now,
            )
            .values(warm=False, updated_at=now, **values)
            .execution_options(synchronize_session=False)
        )
        return bool(result.rowcount)  # type: ignore[attr-defined]

    async def due_vms(self, now: datetime, limit: int) -> list[Vm]:
        """Rows whose deadline is due, or whose destroy lease ran out (a destroy that
        crashed or failed). On PostgreSQL the rows are locked and rows another
        controller holds are skipped, so each due row is claimed by one controller."""
        query = (
            select(Vm)
            .where(
                Vm.node == self.node,
                or_(
                    and_(Vm.state.in_(list(DESTROYABLE)), Vm.destroy_after <= now),
                    and_(
                        Vm.state == VmState.DESTROYING,
                        or_(Vm.lease_until.is_(None), Vm.lease_until <= now),
                    ),
                ),
            )
            .order_by(Vm.destroy_after)
            .limit(limit)
        )
        if self.postgres:
            query = query.with_for_update(skip_locked=True)
        return list(await self.session.scalars(query.execution_options(populate_existing=True)))

    async def claim_destroy(
        self, vm: Vm, *, now: datetime, lease: timedelta, reason: str | None
    ) -> bool:
        """Take the destroy of ``vm``: live -> destroying, or an expired lease renewed."""
        stale_lease = or_(Vm.lease_until.is_(None), Vm.lease_until <= now)
        values: dict[str, Any] = {
            "state": VmState.DESTROYING,
            "lease_until": now + lease,
            "updated_at": now,
        }
        if reason is not None and vm.state != VmState.DESTROYING:
            values["destroy_reason"] = reason
        result = await self.session.execute(
            update(Vm)
            .where(
                Vm.id == vm.id,
                or_(
                    Vm.state.in_(list(DESTROYABLE)),
                    and_(Vm.state == VmState.DESTROYING, stale_lease),
                ),
            )
            .values(**values)
            .execution_options(synchronize_session=False)
        )
        return bool(result.rowcount)  # type: ignore[attr-defined]

    async def next_wakeup(self) -> datetime | None:
        """The earliest moment the scheduler has something to do."""
        deadline = await self.session.scalar(
            select(func.min(Vm.destroy_after)).where(
                Vm.node == self.node, Vm.state.in_(list(DESTROYABLE))
            )
        )
        lease = await self.session.scalar(
            select(func.min(Vm.lease_until)).where(
                Vm.node == self.node, Vm.state == VmState.DESTROYING
            )
        )
        candidates = [_aware(t) for t in (deadline, lease) if t is not None]
        return min(candidates) if candidates else None

    async def count_vms(self) -> list[tuple[str, str, int]]:
        rows = await self.session.execute(
            select(Vm.role, Vm.state, func.count()).group_by(Vm.role, Vm.state)
        )
        return [(r, s, int(n)) for r, s, n in rows.all()]

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

    # --- quotas ------------------------------------------------------------------------
    async def lock_quota(self, user_id: str | None) -> None:
        """Hold the user's quota lock (``None``: this node's) until the transaction ends, so
        that counting and inserting are one step for concurrent starts (``domain.quotas``).

        PostgreSQL: transaction-scoped advisory locks, the user's first, then one node's
        (``lock_node``, by placement), always in that order (no deadlock); ``None``: the
        node's only (the warm pool's refill). SQLite: nothing to do, because every write
        transaction already holds the database's one write lock from its ``BEGIN
        IMMEDIATE``, across processes too."""
        if not self.postgres:
            return
        # A user's start takes its node's lock when placement has chosen the node
        # (``lock_node``); the warm pool's refill fills this node.
        names = [f"user:{user_id}"] if user_id is not None else [f"node:{self.node}"]
        for name in names:
            await self.session.execute(
                text("SELECT pg_advisory_xact_lock(:key)"), {"key": _lock_key(name)}
            )

    async def quota_usage(self, user_id: str, *, now: datetime, login_timeout: timedelta) -> Usage:
        """What counts against ``user_id`` (every node) and against this node."""
        live = list(LIVE)
        since = now - timedelta(minutes=1)
        session_starts = list(
            await self.session.scalars(
                select(AuthSession.created_at).where(
                    AuthSession.user_id == user_id,
                    AuthSession.status.in_(list(LIVE_SESSIONS)),
                )
            )
        )
        recent = list(
            await self.session.scalars(
                select(AuthSession.created_at).where(
                    AuthSession.user_id == user_id, AuthSession.created_at > since
                )
            )
        )
        recent += list(
            await self.session.scalars(
                select(Vm.created_at).where(
                    Vm.user_id == user_id, Vm.role == VmRole.CLI, Vm.created_at > since
                )
            )
        )
        user_cli = await self.session.scalar(
            select(func.count()).where(
                Vm.user_id == user_id, Vm.role == VmRole.CLI, Vm.state.in_(live)
            )
        )
        node_rows = (
            await self.session.execute(
                select(Vm.role, Vm.destroy_after).where(Vm.node == self.node, Vm.state.in_(live))
            )
        ).all()
        browser = [after for role, after in node_rows if role == VmRole.BROWSER]
        return Usage(
            live_session_deadlines=tuple(_aware(t) + login_timeout for t in session_starts),
            user_cli_vms=int(user_cli or 0),
            recent_starts=tuple(_aware(t) for t in recent),
            node_browser_vms=len(browser),
            node_browser_deadlines=tuple(_aware(t) for t in browser if t is not None),
            node_cli_vms=sum(1 for role, _ in node_rows if role == VmRole.CLI),
        )

    # --- auth sessions -----------------------------------------------------------------
    def add_session(self, session: AuthSession) -> None:
        self.session.add(session)

    async def auth_session(self, session_id: str) -> AuthSession | None:
        return await self.session.scalar(
            select(AuthSession)
            .where(AuthSession.id == session_id)
            .execution_options(populate_existing=True)
        )

    async def auth_sessions(
        self,
        *,
        user_id: str | None = None,
        statuses: Iterable[str] | None = None,
        limit: int | None = None,
    ) -> list[AuthSession]:
        query = select(AuthSession).order_by(AuthSession.created_at.desc())
        if user_id is not None:
            query = query.where(AuthSession.user_id == user_id)
        if statuses is not None:
            query = query.where(AuthSession.status.in_(list(statuses)))
        if limit is not None:
            query = query.limit(limit)
        rows = await self.session.scalars(query.execution_options(populate_existing=True))
        return list(rows)

    async def session_of_vm(self, vm_id: str) -> AuthSession | None:
        return await self.session.scalar(
            select(AuthSession)
            .where(AuthSession.vm_id == vm_id)
            .execution_options(populate_existing=True)
        )

    async def move_session(
        self, session_id: str, expect: Iterable[SessionStatus], to: SessionStatus, **values: Any
    ) -> bool:
        result = await self.session.execute(
            update(AuthSession)
            .where(
                AuthSession.id == session_id,
                AuthSession.status.in_(list(expect)),
            )
            .values(status=to, **values)
            .execution_options(synchronize_session=False)
        )
        return bool(result.rowcount)  # type: ignore[attr-defined]

    # --- nodes -------------------------------------------------------------------------
    async def node_row(self, name: str) -> Node | None:
        return await self.session.scalar(
            select(Node).where(Node.name == name).execution_options(populate_existing=True)
        )

    async def nodes(self) -> list[Node]:
        rows = await self.session.scalars(
            select(Node).order_by(Node.name).execution_options(populate_existing=True)
        )
        return list(rows)

    def add_node(self, node: Node) -> None:
        self.session.add(node)

    async def set_node(self, name: str, **values: Any) -> bool:
        result = await self.session.execute(
            update(Node)
            .where(Node.name == name)
            .values(**values)
            .execution_options(synchronize_session=False)
        )
        return bool(result.rowcount)  # type: ignore[attr-defined]

    async def live_counts(self) -> dict[tuple[str, str], int]:
        """Live VMs per (node, role), every node: what each node holds right now."""
        rows = await self.session.execute(
            select(Vm.node, Vm.role, func.count())
            .where(Vm.state.in_([s.value for s in LIVE]))
            .group_by(Vm.node, Vm.role)
        )
        return {(n, r): int(c) for n, r, c in rows.all()}

    async def warm_counts(self, now: datetime) -> dict[str, int]:
        """Warm browser VMs ready to hand out, per node."""
        rows = await self.session.execute(
            select(Vm.node, func.count())
            .where(
                Vm.warm.is_(True),
                Vm.state == VmState.RUNNING.value,
                Vm.destroy_after > now,
            )
            .group_by(Vm.node)
        )
        return {n: int(c) for n, c in rows.all()}

    async def live_vms_of_node(self, node: str) -> list[Vm]:
        """Another node's live rows (a node given up: its VMs are marked lost)."""
        return await self.vms(states=[s.value for s in LIVE], node=node)

    # --- the cluster key ---------------------------------------------------------------
    async def lock_cluster_keys(self) -> None:
        """Until the transaction ends: controllers starting at one instant check and record
        their key fingerprints one at a time (SQLite: its one write lock already does)."""
        if self.postgres:
            await self.session.execute(
                text("SELECT pg_advisory_xact_lock(:key)"), {"key": _lock_key("cluster-keys")}
            )

    async def cluster_keys(self) -> dict[str, str]:
        rows = await self.session.scalars(select(ClusterKey))
        return {row.key_id: row.fingerprint for row in rows}

    def add_cluster_key(self, key: ClusterKey) -> None:
        self.session.add(key)

    async def credential_key_ids(self) -> set[str]:
        """The vault keys some stored credential is sealed under."""
        rows = await self.session.scalars(select(Credential.key_id).distinct())
        return set(rows)

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


def _lock_key(name: str) -> int:
    """A stable signed 64-bit advisory-lock key for ``name`` (PostgreSQL's bigint)."""
    digest = hashlib.sha256(f"airlock-quota:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def _aware(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value
