"""``Repo``'s queries of the nodes (``nodes``) and of the cluster key's fingerprints
(``cluster_keys``)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import func, select, text, update

from airlock.domain.vms import LIVE, VmState
from airlock.store.rows import Rows, lock_key
from airlock.store.tables import (
    ClusterKey,
    Credential,
    Node,
    Vm,
)


class NodeRows(Rows):
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

    # --- the cluster key ---------------------------------------------------------------
    async def lock_cluster_keys(self) -> None:
        """Until the transaction ends: controllers starting at one instant check and record
        their key fingerprints one at a time (SQLite: its one write lock already does)."""
        if self.postgres:
            await self.session.execute(
                text("SELECT pg_advisory_xact_lock(:key)"), {"key": lock_key("cluster-keys")}
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
