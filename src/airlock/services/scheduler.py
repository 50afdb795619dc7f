"""The scheduler: destroys VMs whose ``destroy_after`` is due. The only deadline timer.

It sleeps until the earliest deadline in the database (or until poked because a deadline
moved), claims due rows, and destroys them. Claims are conditional updates (on PostgreSQL
under ``FOR UPDATE SKIP LOCKED``) that set a lease, so a row is destroyed by one controller
once; a destroy that fails or dies with its process comes back when its lease ends, with
exponential backoff. Nothing lives only in memory: after a crash the same rows are due.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta

from airlock.aio import TaskOwner
from airlock.clock import Clock
from airlock.domain.sessions import FailureReason, SessionStatus
from airlock.domain.vms import DESTROYABLE, DestroyReason, VmRole, VmState
from airlock.metrics import Metrics
from airlock.runtimes.base import Runtime
from airlock.services import records
from airlock.services.bus import SessionBus
from airlock.store.db import Database
from airlock.store.repo import Repo
from airlock.store.tables import Vm

log = logging.getLogger("airlock.scheduler")

DESTROY_LEASE = timedelta(seconds=60)
MAX_SLEEP = 5.0  # seconds: catches deadlines set by another controller sharing the database
BATCH = 50


def retry_backoff(attempts: int) -> timedelta:
    """0.5 s, 1 s, 2 s ... capped at one minute."""
    return timedelta(seconds=min(0.5 * 2 ** max(attempts - 1, 0), 60.0))


class Scheduler:
    def __init__(
        self,
        *,
        db: Database,
        runtime: Runtime,
        clock: Clock,
        metrics: Metrics,
        bus: SessionBus,
        tasks: TaskOwner,
        on_destroyed: Callable[[str], Awaitable[None]] | None = None,
        concurrency: int = 16,
    ) -> None:
        self.db = db
        self.runtime = runtime
        self.clock = clock
        self.metrics = metrics
        self.bus = bus
        self.tasks = tasks
        self.on_destroyed = on_destroyed
        # Set by Core: a CLI VM about to be destroyed hands its logins back to the vault.
        self.before_destroy: Callable[[str], Awaitable[None]] | None = None
        self._poked = asyncio.Event()
        self._slots = asyncio.Semaphore(concurrency)
        # Set by Core: asks the node holding a VM of another node to destroy it now
        # (node, vm id, reason, actor) -> whether it did; raises when it cannot be reached.
        self.remote_destroy: Callable[[str, str, str, str], Awaitable[bool]] | None = None

    def poke(self) -> None:
        """A deadline moved earlier: re-read the next wake-up now."""
        self._poked.set()

    async def run(self) -> None:
        while not self.tasks.closed:
            try:
                await self.tick()
                async with self.db.read() as repo:
                    wake = await repo.next_wakeup()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("scheduler round failed; retrying")
                wake = None
            delay = MAX_SLEEP
            if wake is not None:
                delay = min(max((wake - self.clock.now()).total_seconds(), 0.0), MAX_SLEEP)
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    async with self.clock.timeout(delay):  # not wait_for: see bus.wait
                        await self._poked.wait()
            self._poked.clear()

    async def tick(self) -> int:
        """Claim every due row and start destroying it; return how many were claimed."""
        if self.tasks.closed:
            return 0  # shutting down: claim nothing we could not destroy
        now = self.clock.now()
        claimed: list[Vm] = []
        async with self.db.transaction(urgent=True) as repo:
            for vm in await repo.due_vms(now, BATCH):
                reason = vm.destroy_reason or DestroyReason.GRACE_ENDED
                if await self._claim(repo, vm, now=now, reason=reason, actor="scheduler"):
                    claimed.append(vm)
        for vm in claimed:
            self.tasks.spawn(self._destroy_claimed(vm), name=f"destroy:{vm.id}")
        return len(claimed)

    async def destroy_now(self, vm_id: str, *, reason: DestroyReason, actor: str) -> bool:
        """Destroy a VM at once (``complete``, cancel, owner delete). Concurrent callers:
        one performs the destroy, the others return False at once. Never raises for a
        VM that is already gone or being destroyed."""
        now = self.clock.now()
        async with self.db.transaction(urgent=True) as repo:
            vm = await repo.vm(vm_id, lock=True)
            if vm is None or vm.state not in DESTROYABLE:  # being destroyed, or gone
                return False
            remote = vm.node if vm.node and vm.node != self.db.node else None
            if remote is not None and self.remote_destroy is None:
                return await self._due_now(repo, vm, now=now, reason=reason)
            if remote is None and not await self._claim(
                repo, vm, now=now, reason=reason, actor=actor
            ):
                return False
            if remote is None:
                # The deadline becomes "now": destroy lag measures from the moment it was asked.
                await repo.set_vm(vm.id, [VmState.DESTROYING], destroy_after=now)
                vm.destroy_after = now
        if remote is not None:
            return await self._destroy_remote(remote, vm, reason=reason, actor=actor)
        await self._destroy_claimed(vm)
        return True

    async def _destroy_remote(
        self, node: str, vm: Vm, *, reason: DestroyReason, actor: str
    ) -> bool:
        """Only the holder can destroy its VM: ask it. When it cannot be reached, the row
        is made due now instead, so the holder's scheduler destroys it when it returns (or
        the node is given up and the VM marked lost): never destructive from outside."""
        assert self.remote_destroy is not None
        try:
            return await self.remote_destroy(node, vm.id, reason.value, actor)
        except Exception as exc:
            log.warning(
                "the node holding the VM did not destroy it: %s; it is due now",
                exc,
                extra={"vm_id": vm.id, "node": node},
            )
        async with self.db.transaction(urgent=True) as repo:
            return await self._due_now(repo, vm, now=self.clock.now(), reason=reason)

    async def _due_now(self, repo: Repo, vm: Vm, *, now: datetime, reason: DestroyReason) -> bool:
        await repo.set_vm(
            vm.id, list(DESTROYABLE), destroy_after=now, destroy_reason=reason, updated_at=now
        )
        return False

    async def _claim(
        self, repo: Repo, vm: Vm, *, now: datetime, reason: DestroyReason, actor: str
    ) -> bool:
        """Take the destroy of ``vm`` (one claimer wins) and record it. A login still in
        progress when its VM's deadline comes has passed its login deadline: it expires."""
        was = vm.state
        if not await repo.claim_destroy(vm, now=now, lease=DESTROY_LEASE, reason=reason):
            return False
        session = await repo.session_of_vm(vm.id)
        if session is not None and not SessionStatus(session.status).terminal:
            await records.move_session(
                repo,
                session,
                SessionStatus.EXPIRED,
                now=now,
                cause="login_deadline",
                actor=actor,
                failure_reason=FailureReason.LOGIN_TIMEOUT,
            )
            self.metrics.sessions.labels(SessionStatus.EXPIRED).inc()
        if was != VmState.DESTROYING:
            repo.add_event(
                at=now,
                kind="vm",
                subject_id=vm.id,
                vm_id=vm.id,
                session_id=session.id if session else None,
                from_state=was,
                to_state=VmState.DESTROYING,
                cause=reason,
                actor=actor,
            )
            vm.destroy_reason = reason
        vm.state = VmState.DESTROYING
        return True

    async def _destroy_claimed(self, vm: Vm) -> None:
        async with self._slots:
            if self.before_destroy is not None and vm.role == VmRole.CLI.value:
                await self.before_destroy(vm.id)
            try:
                await self.runtime.destroy(vm.id)
            except Exception as exc:
                await self._destroy_failed(vm, exc)
                return
        now = self.clock.now()
        async with self.db.transaction(urgent=True) as repo:
            won = await records.move_vm(
                repo,
                vm,
                VmState.DESTROYED,
                now=now,
                cause=vm.destroy_reason or "destroyed",
                actor="scheduler",
                destroyed_at=now,
                lease_until=None,
                last_error=None,
            )
            session = await repo.session_of_vm(vm.id)
        if won:
            self.metrics.destroys.labels(vm.role, vm.destroy_reason or "").inc()
            self.metrics.vm_lifetime.labels(vm.role, vm.runtime).observe(
                (now - vm.created_at).total_seconds()
            )
            if vm.destroy_after is not None:
                self.metrics.destroy_lag.observe(max((now - vm.destroy_after).total_seconds(), 0))
        if self.on_destroyed is not None:
            await self.on_destroyed(vm.id)
        if session is not None:
            await self.bus.publish(session.id)

    async def _destroy_failed(self, vm: Vm, exc: Exception) -> None:
        now = self.clock.now()
        attempts = vm.destroy_attempts + 1
        log.warning(
            "destroy failed (attempt %d): %s",
            attempts,
            exc,
            extra={"vm_id": vm.id},
        )
        self.metrics.destroy_failures.inc()
        async with self.db.transaction(urgent=True) as repo:
            await repo.set_vm(
                vm.id,
                [VmState.DESTROYING],
                destroy_attempts=attempts,
                lease_until=now + retry_backoff(attempts),
                last_error=str(exc)[:500],
                updated_at=now,
            )
        vm.destroy_attempts = attempts
        self.poke()
