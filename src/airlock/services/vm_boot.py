"""A VM row's birth and boot, written once for logins, CLI VMs and the warm pool.

``new_vm`` builds the row (``creating``), ``add_vm`` adds it with its first event, and
``VmBooter`` boots it under the boot timeout, observes the boot time, and (``boot_and_record``)
records how it went: ``running``, or ``destroying`` then ``destroyed`` after a failed boot.
Every record is a conditional move, so a VM destroyed while it booted (a lost race with the
scheduler or an owner's delete) is not moved again; what the boot left behind is destroyed.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from datetime import datetime

from airlock.clock import Clock
from airlock.domain.vms import DestroyReason, VmRole, VmState
from airlock.metrics import Metrics
from airlock.runtimes.base import RunningVm, Runtime, VmSpec
from airlock.services import records
from airlock.store.db import Database
from airlock.store.repo import Repo
from airlock.store.tables import Vm

log = logging.getLogger("airlock.vm_boot")


def new_vm_id() -> str:
    return "vm-" + secrets.token_hex(8)


def new_vm(
    *,
    role: VmRole,
    runtime: str,
    user_id: str,
    now: datetime,
    destroy_after: datetime | None = None,
    destroy_reason: DestroyReason | None = None,
    warm: bool = False,
    guest_lease_until: datetime | None = None,
) -> Vm:
    """A VM row as it is born: ``creating``, never destroyed, no detail yet."""
    return Vm(
        id=new_vm_id(),
        role=role,
        runtime=runtime,
        user_id=user_id,
        state=VmState.CREATING,
        created_at=now,
        updated_at=now,
        destroy_after=destroy_after,
        destroy_reason=destroy_reason,
        destroy_attempts=0,
        warm=warm,
        detail={},
        guest_lease_until=guest_lease_until,
    )


def add_vm(repo: Repo, vm: Vm, *, cause: str, actor: str, session_id: str | None = None) -> None:
    """Add a new row and the event of its birth, in the caller's transaction."""
    repo.add_vm(vm)
    repo.add_event(
        at=vm.created_at,
        kind="vm",
        subject_id=vm.id,
        vm_id=vm.id,
        session_id=session_id,
        to_state=VmState.CREATING,
        cause=cause,
        actor=actor,
    )


class BootFailed(Exception):
    """The runtime did not boot the VM in time; what it left behind is destroyed."""

    def __init__(self, vm_id: str, cause: Exception) -> None:
        super().__init__(str(cause) or type(cause).__name__)
        self.vm_id = vm_id
        self.cause = cause


class VmBooter:
    def __init__(
        self,
        *,
        db: Database,
        runtime: Runtime,
        clock: Clock,
        metrics: Metrics,
        boot_timeout: float,
    ) -> None:
        self.db = db
        self.runtime = runtime
        self.clock = clock
        self.metrics = metrics
        self.boot_timeout = boot_timeout

    async def boot(self, spec: VmSpec, *, source: str, session_id: str | None = None) -> RunningVm:
        """Boot within the timeout and observe how long it took (``source``: cold or
        warm_pool); records nothing, since a login records its VM with its session.
        Raises ``BootFailed`` after destroying whatever the boot left."""
        started = time.monotonic()
        try:
            async with asyncio.timeout(self.boot_timeout):
                running = await self.runtime.create(spec)
        except Exception as exc:
            # The whole story (the runtime adds the VM's own log) for the operator.
            log.warning(
                "VM %s did not boot: %s",
                spec.vm_id,
                exc,
                extra={"vm_id": spec.vm_id, "session_id": session_id},
            )
            await self.runtime.destroy(spec.vm_id)
            raise BootFailed(spec.vm_id, exc) from exc
        self.metrics.vm_boot.labels(spec.role, self.runtime.name, source).observe(
            time.monotonic() - started
        )
        return running

    async def boot_and_record(
        self, vm: Vm, spec: VmSpec, *, source: str, actor: str, keep_state_dir: bool = False
    ) -> RunningVm | None:
        """Boot ``vm`` and record the outcome on its row. None: it was destroyed while it
        booted (the VM is destroyed again, in case that destroy ran before it existed).
        Raises ``BootFailed`` once the row says ``destroyed`` (unless a destroy that won
        the race is recording it)."""
        try:
            running = await self.boot(spec, source=source)
        except BootFailed as failed:
            async with self.db.transaction() as repo:
                now = self.clock.now()
                await records.record_boot_failure(
                    repo, vm, now=now, actor=actor, error=str(failed.cause)
                )
            raise
        detail = dict(running.detail)
        if keep_state_dir:
            detail["state_dir"] = str(running.state_dir)  # where a login starts its egress
        now = self.clock.now()
        async with self.db.transaction() as repo:
            won = await records.move_vm(
                repo,
                vm,
                VmState.RUNNING,
                now=now,
                cause="booted",
                actor=actor,
                running_at=now,
                detail=detail,
            )
        if not won:
            await self.runtime.destroy(vm.id)
            return None
        return running
