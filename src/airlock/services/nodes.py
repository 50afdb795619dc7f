"""This controller as one node of a cluster: its registration and heartbeat, the cluster
key check, drain, and what happens to a node that stopped answering.

- ``check_cluster_key``: at start-up, before anything is served, the vault's key
  fingerprints are compared with the ones the database has seen (``cluster_keys``). A
  controller with another key file would mint viewer tokens its peers reject and seal
  credentials they cannot open, so it refuses to start and names the file to share.
- ``NodeService.run``: one owned loop that writes the heartbeat (with what this node holds)
  every ``node_heartbeat`` and, on every node, gives up the VMs of nodes silent past
  lease + grace: their live VMs become ``lost`` (with a reason) and their sessions
  ``failed`` with one a person can act on. Nothing is destroyed: nobody but the node itself
  can reach its VMs, and it kills them itself when it returns (its reconciler sees rows that
  say gone). Conditional moves, so every node may sweep at once.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import airlock
from airlock.clock import Clock
from airlock.domain.nodes import INTENTS, NodeState, NodeTimes, effective_state, is_given_up
from airlock.domain.sessions import FailureReason, SessionStatus
from airlock.domain.vms import DestroyReason, VmRole, VmState
from airlock.errors import AirlockError, InvalidInput, NotFound
from airlock.metrics import Metrics
from airlock.services import records
from airlock.services.bus import SessionBus
from airlock.store.db import Database
from airlock.store.tables import ClusterKey, Node
from airlock.vault import Vault

log = logging.getLogger("airlock.nodes")


class ClusterKeyMismatch(AirlockError):
    """The vault key file differs from the one the cluster's database has seen."""

    code = "cluster_key_mismatch"


@dataclass(frozen=True, slots=True)
class NodeView:
    """A node as ``airlock nodes ls`` and ``GET /api/nodes`` show it."""

    name: str
    state: NodeState
    intent: str
    ready: bool
    internal_url: str
    public_url: str
    browser_capacity: int
    cli_capacity: int
    browser_in_use: int
    cli_in_use: int
    version: str
    started_at: datetime
    heartbeat_at: datetime


async def check_cluster_key(
    db: Database, vault: Vault, *, key_file: Path, node: str, now: datetime
) -> None:
    """Refuse a key file that is not the cluster's; record the fingerprints of new keys.

    The same key id with another fingerprint, or a database whose keys this file shares
    none of, or credentials sealed under a key this file lacks: each is a different key
    file, and the message says which file to copy. A key this file has that the database
    has not seen yet (the first start, or after ``airlock vault rotate``) is recorded."""
    mine = vault.fingerprints()
    async with db.transaction() as repo:
        await repo.lock_cluster_keys()
        seen = await repo.cluster_keys()
        sealed_under = await repo.credential_key_ids()
        share = (
            f"copy {key_file} from a node of this cluster to this host (mode 0600), or "
            "point AIRLOCK_SECRET_KEY_FILE at that copy"
        )
        for key_id, fingerprint in mine.items():
            if key_id in seen and seen[key_id] != fingerprint:
                raise ClusterKeyMismatch(
                    f"the key file {key_file} holds a key {key_id} that differs from the "
                    f"cluster's key {key_id}: every node needs the same key file; {share}"
                )
        if seen and not set(seen) & set(mine):
            raise ClusterKeyMismatch(
                f"the key file {key_file} is not this cluster's: the database has seen keys "
                f"{', '.join(sorted(seen))}, this file holds {', '.join(sorted(mine))}; {share}"
            )
        missing = sorted(sealed_under - set(mine))
        if missing:
            raise ClusterKeyMismatch(
                f"credentials in the database are sealed under key(s) {', '.join(missing)} "
                f"that the key file {key_file} lacks; {share}"
            )
        for key_id, fingerprint in mine.items():
            if key_id not in seen:
                repo.add_cluster_key(
                    ClusterKey(key_id=key_id, fingerprint=fingerprint, first_node=node, seen_at=now)
                )


class NodeService:
    def __init__(
        self,
        *,
        db: Database,
        clock: Clock,
        metrics: Metrics,
        bus: SessionBus,
        name: str,
        internal_url: str,
        public_url: str,
        browser_capacity: int,
        cli_capacity: int,
        times: NodeTimes,
    ) -> None:
        self.db = db
        self.clock = clock
        self.metrics = metrics
        self.bus = bus
        self.name = name
        self.internal_url = internal_url.rstrip("/")
        self.public_url = public_url.rstrip("/")
        self.browser_capacity = browser_capacity
        self.cli_capacity = cli_capacity
        self.times = times

    # --- this node -----------------------------------------------------------------------
    async def register(self, *, ready: bool) -> None:
        """Write this node's row (made on its first start). The operator's intent
        (``draining``) survives a restart: an upgraded node comes back draining until
        ``airlock nodes activate``."""
        now = self.clock.now()
        async with self.db.transaction() as repo:
            counts = await repo.live_counts()
            values = {
                "internal_url": self.internal_url,
                "public_url": self.public_url,
                "browser_capacity": self.browser_capacity,
                "cli_capacity": self.cli_capacity,
                "browser_in_use": counts.get((self.name, VmRole.BROWSER.value), 0),
                "cli_in_use": counts.get((self.name, VmRole.CLI.value), 0),
                "version": airlock.__version__,
                "heartbeat_at": now,
                "ready": ready,
            }
            if await repo.node_row(self.name) is None:
                repo.add_node(
                    Node(name=self.name, state=NodeState.ACTIVE.value, started_at=now, **values)
                )
            else:
                await repo.set_node(self.name, started_at=now, **values)
        log.info("node %s registered (ready: %s)", self.name, ready)

    async def heartbeat(self) -> None:
        now = self.clock.now()
        async with self.db.transaction() as repo:
            counts = await repo.live_counts()
            await repo.set_node(
                self.name,
                heartbeat_at=now,
                browser_in_use=counts.get((self.name, VmRole.BROWSER.value), 0),
                cli_in_use=counts.get((self.name, VmRole.CLI.value), 0),
            )

    async def run(self) -> None:
        """Heartbeat, then sweep the nodes gone silent, every ``heartbeat`` interval."""
        while True:
            await asyncio.sleep(self.times.heartbeat.total_seconds())
            try:
                await self.heartbeat()
                await self.sweep()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("node heartbeat round failed")

    # --- every node ----------------------------------------------------------------------
    async def list(self) -> list[NodeView]:
        now = self.clock.now()
        async with self.db.read() as repo:
            rows = await repo.nodes()
        return [self._view(row, now) for row in rows]

    async def get(self, name: str) -> NodeView:
        async with self.db.read() as repo:
            row = await repo.node_row(name)
        if row is None:
            raise NotFound(f"no node {name!r} in this cluster", code="node_not_found")
        return self._view(row, self.clock.now())

    def _view(self, row: Node, now: datetime) -> NodeView:
        return NodeView(
            name=row.name,
            state=effective_state(row.state, row.heartbeat_at, now=now, lease=self.times.lease),
            intent=row.state,
            ready=row.ready,
            internal_url=row.internal_url,
            public_url=row.public_url,
            browser_capacity=row.browser_capacity,
            cli_capacity=row.cli_capacity,
            browser_in_use=row.browser_in_use,
            cli_in_use=row.cli_in_use,
            version=row.version,
            started_at=row.started_at,
            heartbeat_at=row.heartbeat_at,
        )

    async def set_intent(self, name: str, intent: NodeState, *, actor: str) -> NodeView:
        """``draining``: no new VMs go there; what runs there finishes normally.
        ``active``: it takes new VMs again."""
        if intent not in INTENTS:
            raise InvalidInput(f"a node can be set active or draining, not {intent}")
        now = self.clock.now()
        async with self.db.transaction() as repo:
            row = await repo.node_row(name)
            if row is None:
                raise NotFound(f"no node {name!r} in this cluster", code="node_not_found")
            if row.state != intent.value:
                await repo.set_node(name, state=intent.value)
                repo.add_event(
                    at=now,
                    kind="node",
                    subject_id=name,
                    from_state=row.state,
                    to_state=intent.value,
                    cause="drain" if intent is NodeState.DRAINING else "activate",
                    actor=actor,
                )
        log.info("node %s set %s", name, intent.value, extra={"actor": actor})
        return await self.get(name)

    async def sweep(self) -> int:
        """Give up the VMs of every other node silent past lease + grace; how many."""
        now = self.clock.now()
        async with self.db.read() as repo:
            silent = [
                row.name
                for row in await repo.nodes()
                if row.name != self.name
                and is_given_up(row.heartbeat_at, now=now, times=self.times)
            ]
        given_up = 0
        for node in silent:
            given_up += await self._give_up(node, now)
        return given_up

    async def _give_up(self, node: str, now: datetime) -> int:
        published: list[str] = []
        count = 0
        async with self.db.transaction() as repo:
            row = await repo.node_row(node)
            if row is None or not is_given_up(row.heartbeat_at, now=now, times=self.times):
                return 0  # it came back meanwhile
            silent_s = int((now - row.heartbeat_at).total_seconds())
            for vm in await repo.live_vms_of_node(node):
                if not await records.move_vm(
                    repo,
                    vm,
                    VmState.LOST,
                    now=now,
                    cause="node_lost",
                    actor=f"node:{self.name}",
                    destroyed_at=now,
                    destroy_reason=DestroyReason.VANISHED.value,
                    last_error=f"node {node} stopped answering {silent_s} s ago",
                ):
                    continue
                count += 1
                self.metrics.premature_destructions.inc()
                session = await repo.session_of_vm(vm.id)
                if session is not None and not SessionStatus(session.status).terminal:
                    await records.move_session(
                        repo,
                        session,
                        SessionStatus.FAILED,
                        now=now,
                        cause=FailureReason.VM_LOST.value,
                        actor=f"node:{self.name}",
                        failure_reason=(
                            f"{FailureReason.VM_LOST.value}: the host {node} that ran this "
                            f"login's browser VM stopped answering {silent_s} s ago; start a "
                            "new login (it will run on another host)"
                        ),
                    )
                    self.metrics.sessions.labels(SessionStatus.FAILED.value).inc()
                    published.append(session.id)
        if count:
            log.error(
                "node %s silent past its grace: %d VM(s) marked lost",
                node,
                count,
                extra={"node": node},
            )
        for session_id in published:
            await self.bus.publish(session_id)
        return count
