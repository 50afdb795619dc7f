"""The lease keeper: renews every browser VM's lease through its agent, on every pass.

A browser VM ends itself when its lease runs out unrenewed (``domain.leases``), so that a
controller that never comes back leaks nothing. While this controller runs, it renews the
lease of every browser VM of its node that runs (``running``, ``draining``, ``retained``),
warm-pool VMs included, and records on the row what the VM confirmed, timed from before it
asked: the row never promises more life than the VM has. CLI VMs are exempt.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from datetime import datetime

from airlock.agent.client import AgentClient
from airlock.clock import Clock
from airlock.domain.leases import LeasePolicy
from airlock.domain.vms import BOOTED, VmRole
from airlock.metrics import Metrics
from airlock.runtimes.base import Runtime, VmSpec
from airlock.store.db import Database

log = logging.getLogger("airlock.leases")

RENEW_TIMEOUT_S = 5.0
CONCURRENCY = 8  # agents renewed at once: one hung agent does not hold up the others


def browser_spec(vm_id: str, user_id: str, lease: LeasePolicy | None) -> VmSpec:
    """A browser VM to boot, with its boot lease when there is a lease policy."""
    if lease is None:
        return VmSpec(vm_id=vm_id, role=VmRole.BROWSER, user_id=user_id)
    return VmSpec(
        vm_id=vm_id,
        role=VmRole.BROWSER,
        user_id=user_id,
        lease_ms=lease.boot_lease_ms,
        lease_margin_ms=lease.margin_ms,
    )


class Renewal(enum.Enum):
    """What one renewal left to do."""

    FAILED = "failed"  # the VM did not confirm: its row keeps the lease it had
    LOWERED = "lowered"  # confirmed; the row was lowered to it before the VM was asked
    RAISE = "raise"  # confirmed; the row is to be raised to it


class LeaseKeeper:
    def __init__(
        self,
        *,
        db: Database,
        runtime: Runtime,
        clock: Clock,
        policy: LeasePolicy,
        metrics: Metrics | None = None,
    ) -> None:
        self.db = db
        self.runtime = runtime
        self.clock = clock
        self.policy = policy
        self.metrics = metrics
        self.failures = 0  # renewals that failed, since start (for tests and logs)

    async def run(self) -> None:
        """Renew at once (what a restarted controller adopted may hold a short lease), then
        every third of the lease."""
        while True:
            try:
                await self.renew_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("lease renewal pass failed")
            await self.clock.sleep(self.policy.renew_every.total_seconds())

    async def renew_once(self) -> int:
        """Renew every running browser VM of this node; return how many confirmed.

        Every lease of a pass is timed from the pass's start, before any VM was asked, so
        the ones to raise are recorded in one statement at the end, never later than what
        their VMs hold (1,000 VMs: one write a pass instead of 1,000 transactions)."""
        async with self.db.read() as repo:
            rows = await repo.vms(
                role=VmRole.BROWSER,
                states=list(BOOTED),
                node=repo.node,
            )
        until = self.policy.renewed_until(self.clock.now())
        gate = asyncio.Semaphore(CONCURRENCY)

        async def one(vm_id: str, recorded: datetime | None) -> Renewal:
            async with gate:
                return await self.renew(vm_id, recorded, until)

        renewals = await asyncio.gather(*(one(row.id, row.guest_lease_until) for row in rows))
        to_raise = [row.id for row, r in zip(rows, renewals, strict=True) if r is Renewal.RAISE]
        if to_raise:
            async with self.db.transaction() as repo:
                await repo.set_vms(to_raise, BOOTED, guest_lease_until=until)
        return sum(1 for r in renewals if r is not Renewal.FAILED)

    async def renew(self, vm_id: str, recorded: datetime | None, until: datetime) -> Renewal:
        """One renewal to ``until``. A VM that does not confirm keeps the lease it had: if it
        is gone, the reconciler finds out; if it hangs, it ends itself when that lease runs
        out.

        The row must never hold a later moment than the VM's own. A renewal that moves the
        lease on is recorded after the VM confirmed it (``RAISE``: the caller records it);
        one that brings it closer (the first after the boot lease, which covers a whole
        boot) is recorded here before it is asked for, so a controller that dies in between
        leaves the row early, never late."""
        # Lowered first, raised after (a row without a lease, from before leases, is raised
        # only once its VM showed that it takes one).
        lower_first = recorded is not None and recorded > until
        if lower_first:
            async with self.db.transaction() as repo:
                await repo.set_vm(vm_id, BOOTED, guest_lease_until=until)
        try:
            async with asyncio.timeout(RENEW_TIMEOUT_S):
                reader, writer = await self.runtime.open_agent(vm_id)
                async with AgentClient(reader, writer, timeout_s=RENEW_TIMEOUT_S) as agent:
                    await agent.lease(self.policy.length_ms, self.policy.margin_ms)
        except (Exception, TimeoutError) as exc:
            self.failures += 1
            if self.metrics is not None:
                self.metrics.lease_renewal_failures.inc()
            log.warning("lease not renewed: %s", exc, extra={"vm_id": vm_id})
            return Renewal.FAILED
        return Renewal.LOWERED if lower_first else Renewal.RAISE
