"""The lease keeper: renews every browser VM's lease through its agent, on every pass.

A browser VM ends itself when its lease runs out unrenewed (``domain.leases``), so that a
controller that never comes back leaks nothing. While this controller runs, it renews the
lease of every browser VM of its node that runs (``running``, ``draining``, ``retained``),
warm-pool VMs included, and records on the row what the VM confirmed, timed from before it
asked: the row never promises more life than the VM has. CLI VMs are exempt.
"""

from __future__ import annotations

import asyncio
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
        """Renew every running browser VM of this node; return how many confirmed."""
        async with self.db.read() as repo:
            rows = await repo.vms(
                role=VmRole.BROWSER,
                states=list(BOOTED),
                node=repo.node,
            )
        gate = asyncio.Semaphore(CONCURRENCY)

        async def one(vm_id: str, recorded: datetime | None) -> bool:
            async with gate:
                return await self.renew(vm_id, recorded)

        results = await asyncio.gather(*(one(row.id, row.guest_lease_until) for row in rows))
        return sum(results)

    async def renew(self, vm_id: str, recorded: datetime | None) -> bool:
        """One renewal. A VM that does not confirm keeps the lease it had: if it is gone,
        the reconciler finds out; if it hangs, it ends itself when that lease runs out.

        The row must never hold a later moment than the VM's own. A renewal that moves the
        lease on is recorded after the VM confirmed it; one that brings it closer (the first
        after the boot lease, which covers a whole boot) is recorded before it is asked for,
        so a controller that dies in between leaves the row early, never late."""
        asked_at = self.clock.now()
        until = self.policy.renewed_until(asked_at)
        # Lowered first, raised after (a row without a lease, from before leases, is raised
        # only once its VM showed that it takes one).
        lower_first = recorded is not None and recorded > until
        if lower_first:
            await self._record(vm_id, until)
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
            return False
        if not lower_first:
            await self._record(vm_id, until)
        return True

    async def _record(self, vm_id: str, until: datetime) -> None:
        async with self.db.transaction() as repo:
            await repo.set_vm(vm_id, BOOTED, guest_lease_until=until)
