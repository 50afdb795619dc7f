"""Placement: which node gets a new VM, and how that node takes it up.

Any controller accepts a start. ``Placement.choose`` (inside the start's transaction) reads
the nodes and what each holds, keeps those that are ``active``, ready and fresh, and asks
``domain.nodes.choose``: a node with a warm VM first, else the best of ``BEST_OF`` drawn at
random among those with a free slot. The chosen node's quota lock is held until the row is
in, so concurrent starts on every controller never overfill a node (per-node limits across
nodes). The row is written for that node; this node boots its own at once, another node's
waits there unclaimed (its ``boot_claimed_at`` empty).

``BootQueue`` runs on every node: woken by a peer over the internal link (and on a short
timer, should that poke be lost), it claims the rows placed on it (a conditional update,
``SKIP LOCKED`` on PostgreSQL: exactly once) and boots them. A node that is full when it
claims, or whose boot of a browser VM fails, hands the row back for another node, at most
``MAX_PLACEMENTS`` nodes in all; then the VM is given up with a reason (a login fails with
one a person can act on; a CLI VM's creator answers 503 with ``Retry-After``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from airlock.aio import TaskOwner
from airlock.clock import Clock
from airlock.domain.nodes import Candidate, NodeState, NodeTimes, choose, effective_state
from airlock.domain.quotas import RETRY_NODE_S
from airlock.domain.vms import VmRole
from airlock.errors import Unavailable
from airlock.store.db import Database
from airlock.store.repo import Repo
from airlock.store.tables import Vm

log = logging.getLogger("airlock.placement")

BEST_OF = 2  # E2B's "best of k" placement draws two
MAX_PLACEMENTS = 3  # nodes one VM may be offered to before it is given up
POLL_S = 1.0  # the boot queue's timer, behind the peers' pokes
BATCH = 8
NO_HOST = "no_host"  # last_error of a VM no node could take: its creator answers 503


def no_host(what: str) -> Unavailable:
    """503 ``at_capacity`` with ``Retry-After``: no active node has room."""
    return Unavailable(
        f"no host has room for {what} now; retry in a moment",
        code="at_capacity",
        retry_after=RETRY_NODE_S,
    )


@dataclass(frozen=True, slots=True)
class Placed:
    node: str
    warm: int  # warm VMs ready there when it was chosen


class Placement:
    def __init__(
        self,
        *,
        name: str,
        clock: Clock,
        times: NodeTimes,
        rng: random.Random | None = None,
        best_of: int = BEST_OF,
    ) -> None:
        self.name = name
        self.clock = clock
        self.times = times
        self.rng = rng or random.Random()
        self.best_of = best_of

    async def choose(
        self, repo: Repo, role: VmRole, *, exclude: frozenset[str] = frozenset()
    ) -> Placed | None:
        """A node for a new ``role`` VM with its quota lock held, or None when no node can
        take one. A controller that is not registered (a database-only tool, a test core
        that never started) places on itself, as a single host always did."""
        now = self.clock.now()
        rows = await repo.nodes()
        if not any(row.name == self.name for row in rows):
            await repo.lock_node(self.name)
            return Placed(self.name, 0)
        counts = await repo.live_counts()
        warm = await repo.warm_counts(now) if role is VmRole.BROWSER else {}
        capacity: dict[str, int] = {}
        candidates = []
        for row in rows:
            # This node is alive (it runs this code), whatever its last heartbeat says.
            beat = now if row.name == self.name else row.heartbeat_at
            state = effective_state(row.state, beat, now=now, lease=self.times.lease)
            if state is not NodeState.ACTIVE or not row.ready:
                continue
            capacity[row.name] = (
                row.browser_capacity if role is VmRole.BROWSER else row.cli_capacity
            )
            free = capacity[row.name] - counts.get((row.name, role.value), 0)
            candidates.append(Candidate(row.name, free, warm.get(row.name, 0)))
        pick = choose(candidates, k=self.best_of, rng=self.rng, exclude=exclude)
        if pick is None:
            return None
        # Counted again under the node's lock: a start on another controller may have
        # taken the last slot since (one lock a transaction: no lock-order deadlock).
        await repo.lock_node(pick.name)
        held = (await repo.live_counts()).get((pick.name, role.value), 0)
        if held >= capacity[pick.name] and pick.warm == 0:
            return None
        return Placed(pick.name, pick.warm)


TakeUp = Callable[[Vm], Awaitable[str | None]]
"""Boot (or start the login on) a claimed row: None when done, else why this node could
not, and the row is handed back for another node."""
GiveUp = Callable[[Vm, str], Awaitable[None]]


class BootQueue:
    def __init__(
        self,
        *,
        db: Database,
        clock: Clock,
        placement: Placement,
        tasks: TaskOwner,
        take_up: TakeUp,
        give_up: GiveUp,
        poke_peer: Callable[[str], Awaitable[None]],
        capacity: Callable[[VmRole], int],
    ) -> None:
        self.db = db
        self.clock = clock
        self.placement = placement
        self.tasks = tasks
        self.take_up = take_up
        self.give_up = give_up
        self.poke_peer = poke_peer
        self.capacity = capacity
        self._poked = asyncio.Event()

    def poke(self) -> None:
        self._poked.set()

    async def run(self) -> None:
        while not self.tasks.closed:
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("boot queue round failed")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(POLL_S):
                    await self._poked.wait()
            self._poked.clear()

    async def tick(self) -> int:
        """Claim what was placed here and start taking it up; how many."""
        if self.tasks.closed:
            return 0
        now = self.clock.now()
        claimed: list[Vm] = []
        async with self.db.transaction() as repo:
            for vm in await repo.unclaimed_boots(BATCH):
                if await repo.claim_boot(vm.id, now=now):
                    claimed.append(vm)
        for vm in claimed:
            self.tasks.spawn(self._take_up(vm), name=f"take-up:{vm.id}")
        return len(claimed)

    async def _take_up(self, vm: Vm) -> None:
        role = VmRole(vm.role)
        async with self.db.read() as repo:
            held = (await repo.live_counts()).get((self.placement.name, role.value), 0)
        # This row counts among what the node holds: full when the others fill it.
        why = "full" if held > self.capacity(role) and not vm.warm else None
        if why is None:
            why = await self.take_up(vm)
        if why is not None:
            await self.hand_back(vm, why)

    async def hand_back(self, vm: Vm, why: str) -> None:
        """Offer ``vm`` to another node, or give it up after ``MAX_PLACEMENTS`` nodes."""
        now = self.clock.now()
        tried = [*vm.detail.get("placed_on", []), self.placement.name]
        to: str | None = None
        async with self.db.transaction() as repo:
            placed = None
            if len(set(tried)) < MAX_PLACEMENTS:
                placed = await self.placement.choose(
                    repo, VmRole(vm.role), exclude=frozenset(tried)
                )
            if placed is not None and await repo.hand_back(
                vm.id, to=placed.node, now=now, detail={**vm.detail, "placed_on": tried}
            ):
                to = placed.node
                repo.add_event(
                    at=now,
                    kind="vm",
                    subject_id=vm.id,
                    vm_id=vm.id,
                    cause="handed_back",
                    actor=f"node:{self.placement.name}",
                    detail={"why": why, "to": to, "tried": tried},
                )
        if to is not None:
            log.info("VM handed back (%s) to %s", why, to, extra={"vm_id": vm.id})
            await self.poke_peer(to)
            return
        nodes = ", ".join(dict.fromkeys(tried))
        log.warning("VM given up after %s: %s", nodes, why, extra={"vm_id": vm.id})
        await self.give_up(vm, f"no host could start it (tried {nodes}; last: {why})")
