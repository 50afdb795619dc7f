"""The warm pool: ``AIRLOCK_WARM_POOL=N`` browser VMs booted ahead of demand, so that
``POST /api/auth/start`` only has to start the login (the time of an API call, not a boot).

Every warm VM is a row (``warm=True``, no session, ``destroy_after = created + max age``,
reason ``warm_retired``): the reconciler sees a live row and leaves it alone, the scheduler
retires it at its maximum age like any other deadline, and a restarted controller finds it
(``recover``). A session takes one with a conditional update (``Repo.claim_warm``) in the
transaction that creates the session, so two starts never get the same VM, and a warm VM
is never given out twice: once claimed it is an ordinary browser VM that dies with its
session. The owned ``warm-pool`` task boots replacements in the background.

One controller per runtime, as the reconciler assumes: a warm row is this host's VM.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from datetime import datetime, timedelta

from airlock.aio import TaskOwner
from airlock.clock import Clock
from airlock.domain.leases import LeasePolicy
from airlock.domain.vms import IN_SERVICE, LIVE, DestroyReason, VmRole, VmState
from airlock.metrics import Metrics
from airlock.runtimes.base import Runtime
from airlock.services.leases import browser_spec
from airlock.services.scheduler import Scheduler
from airlock.services.vm_boot import BootFailed, VmBooter, add_vm, new_vm
from airlock.store.db import Database
from airlock.store.repo import Repo
from airlock.store.tables import Vm

log = logging.getLogger("airlock.warm_pool")

WARM_USER = ""  # a warm VM belongs to nobody until a session claims it
CHECK_INTERVAL_S = 1.0  # also catches VMs the scheduler retired or the reconciler lost
MIN_REMAINING = timedelta(seconds=5)  # never hand out a VM about to be retired


def _backoff(failures: int) -> float:
    return min(0.5 * 2.0 ** max(failures - 1, 0), 30.0)


class WarmPool:
    def __init__(
        self,
        *,
        db: Database,
        runtime: Runtime,
        clock: Clock,
        metrics: Metrics,
        scheduler: Scheduler,
        tasks: TaskOwner,
        size: int,
        max_age: timedelta,
        boot_timeout: float,
        max_browser_vms: int | None = None,
        lease: LeasePolicy | None = None,
    ) -> None:
        self.db = db
        self.runtime = runtime
        self.clock = clock
        self.metrics = metrics
        self.scheduler = scheduler
        self.tasks = tasks
        self.size = size
        self.max_age = max_age
        self.boot_timeout = boot_timeout
        self.max_browser_vms = max_browser_vms  # warm VMs are live VMs: they count too
        self.lease = lease  # warm VMs are browser VMs: leased like the others
        self.boots = VmBooter(
            db=db, runtime=runtime, clock=clock, metrics=metrics, boot_timeout=boot_timeout
        )
        self._poked = asyncio.Event()
        self._failures = 0

    def poke(self) -> None:
        """A warm VM was taken or is gone: look at the pool now."""
        self._poked.set()

    # --- claiming (inside the session's transaction) ---------------------------------
    async def claim(
        self,
        repo: Repo,
        *,
        user_id: str,
        now: datetime,
        destroy_after: datetime,
        reason: DestroyReason,
    ) -> Vm | None:
        """Take a running warm VM for a new session, or None when none is ready. The VM
        becomes ``user_id``'s, with the session's deadline instead of the pool's."""
        if self.size <= 0:
            return None
        for vm in await repo.warm_vms([VmState.RUNNING], limit=self.size + 2, lock=True):
            if vm.destroy_after is not None and vm.destroy_after - now < MIN_REMAINING:
                continue
            if await repo.claim_warm(
                vm.id,
                now=now,
                user_id=user_id,
                destroy_after=destroy_after,
                destroy_reason=reason,
            ):
                vm.warm, vm.user_id, vm.updated_at = False, user_id, now
                vm.destroy_after, vm.destroy_reason = destroy_after, reason
                return vm
        return None

    # --- filling ---------------------------------------------------------------------
    async def recover(self) -> None:
        """After a restart: a warm VM whose boot was cut off is destroyed (its row says
        ``creating`` but nobody is booting it); running warm VMs are simply the pool."""
        async with self.db.read() as repo:
            stale = await repo.warm_vms([VmState.CREATING])
        for vm in stale:
            await self.scheduler.destroy_now(
                vm.id, reason=DestroyReason.BOOT_FAILED, actor="warm_pool"
            )

    async def run(self) -> None:
        while not self.tasks.closed:
            delay = CHECK_INTERVAL_S
            try:
                await self.fill()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("warm pool round failed")
            if self._failures:
                delay = _backoff(self._failures)
            with contextlib.suppress(TimeoutError):
                async with self.clock.timeout(delay):
                    await self._poked.wait()
            self._poked.clear()

    async def fill(self) -> int:
        """Start booting as many VMs as the pool lacks (rows first, so a boot in flight
        counts); return how many were started."""
        if self.size <= 0 or self.tasks.closed:
            return 0
        now = self.clock.now()
        new: list[Vm] = []
        async with self.db.transaction() as repo:
            pooled = await repo.warm_vms(IN_SERVICE)
            wanted = self.size - len(pooled)
            if self.max_browser_vms is not None and wanted > 0:
                await repo.lock_quota(None)  # the node's cap, as starts count it
                live = await repo.vms(
                    role=VmRole.BROWSER,
                    states=LIVE,  # every VM a VM
                    node=repo.node,
                )
                wanted = min(wanted, self.max_browser_vms - len(live))
            for _ in range(wanted):
                vm = new_vm(
                    role=VmRole.BROWSER,
                    runtime=self.runtime.name,
                    user_id=WARM_USER,
                    now=now,
                    destroy_after=now + self.max_age,
                    destroy_reason=DestroyReason.WARM_RETIRED,
                    warm=True,
                    guest_lease_until=self.lease.boot_until(now) if self.lease else None,
                )
                add_vm(repo, vm, cause="warm_pool_fill", actor="warm_pool")
                new.append(vm)
        if new:
            self.scheduler.poke()  # a new deadline (the pool's maximum age)
        for vm in new:
            self.tasks.spawn(self._boot(vm), name=f"warm-boot:{vm.id}")
        return len(new)

    async def _boot(self, vm: Vm) -> None:
        started = time.monotonic()
        spec = browser_spec(vm.id, WARM_USER, self.lease)
        try:
            # The state dir is where the session will start the VM's egress proxy.
            running = await self.boots.boot_and_record(
                vm, spec, source="warm_pool", actor="warm_pool", keep_state_dir=True
            )
        except BootFailed:
            self._failures += 1
            return
        self._failures = 0
        if running is not None:  # else retired or destroyed while it booted
            log.info(
                "warm VM ready in %d ms",
                (time.monotonic() - started) * 1000,
                extra={"vm_id": vm.id},
            )
