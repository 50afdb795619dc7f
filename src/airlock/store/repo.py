"""The queries. A ``Repo`` is bound to one transaction (``Database.transaction()``).

State changes are *conditional* updates (``WHERE state IN (expected)``) that report whether
they won: two controllers, or a request racing the scheduler, can try the same move and
exactly one succeeds. That is what makes destroy exactly-once (invariant 3).

The nodes' and the logins' queries are in ``store.repo_nodes`` and ``store.repo_grants``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, func, or_, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession

from airlock.domain.quotas import Usage
from airlock.domain.sessions import LIVE as LIVE_SESSIONS
from airlock.domain.sessions import SessionStatus
from airlock.domain.vms import DESTROYABLE, LIVE, VmRole, VmState
from airlock.store.repo_grants import GrantRows
from airlock.store.repo_nodes import NodeRows
from airlock.store.rows import aware, lock_key
from airlock.store.tables import (
    AuthSession,
    EgressHost,
    Event,
    Token,
    Vm,
)


class Repo(NodeRows, GrantRows):
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
                text("SELECT pg_advisory_xact_lock(:key)"), {"key": lock_key(f"node:{node}")}
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

    async def set_vms(self, vm_ids: Sequence[str], expect: Iterable[VmState], **values: Any) -> int:
        """``set_vm`` for many VMs in one statement (in chunks, for SQLite's bound-parameter
        limit); how many rows it changed."""
        changed = 0
        for at in range(0, len(vm_ids), 500):
            result = await self.session.execute(
                update(Vm)
                .where(Vm.id.in_(list(vm_ids[at : at + 500])), Vm.state.in_(list(expect)))
                .values(**values)
                .execution_options(synchronize_session=False)
            )
            changed += int(result.rowcount)  # type: ignore[attr-defined]
        return changed

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
        candidates = [aware(t) for t in (deadline, lease) if t is not None]
        return min(candidates) if candidates else None

    async def count_vms(self) -> list[tuple[str, str, int]]:
        rows = await self.session.execute(
            select(Vm.role, Vm.state, func.count()).group_by(Vm.role, Vm.state)
        )
        return [(r, s, int(n)) for r, s, n in rows.all()]

    async def live_vms_of_node(self, node: str) -> list[Vm]:
        """Another node's live rows (a node given up: its VMs are marked lost)."""
        return await self.vms(states=[s.value for s in LIVE], node=node)

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
                text("SELECT pg_advisory_xact_lock(:key)"), {"key": lock_key(name)}
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
            live_session_deadlines=tuple(aware(t) + login_timeout for t in session_starts),
            user_cli_vms=int(user_cli or 0),
            recent_starts=tuple(aware(t) for t in recent),
            node_browser_vms=len(browser),
            node_browser_deadlines=tuple(aware(t) for t in browser if t is not None),
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
