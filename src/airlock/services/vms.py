"""VMs as the API sees them: create a user's long-lived CLI VM, list, read, delete.

A CLI VM has no deadline (``destroy_after`` stays empty) until its owner deletes it. Once
it runs (and again when a restarted controller adopts it) ``on_running`` gives it what it
needs from the controller: its egress proxy.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path

from airlock.clock import Clock
from airlock.domain.quotas import Limits, StartKind
from airlock.domain.sessions import SessionStatus
from airlock.domain.vms import DestroyReason, VmRole, VmState
from airlock.errors import InvalidInput, NotFound, RuntimeFailure
from airlock.metrics import Metrics
from airlock.runtimes.base import Runtime, VmSpec
from airlock.services import quotas, records
from airlock.services.scheduler import Scheduler
from airlock.services.sessions import new_vm_id
from airlock.store.db import Database
from airlock.store.tables import Vm

log = logging.getLogger("airlock.vms")

_VM_ID = re.compile(r"vm-[A-Za-z0-9]{1,61}")  # ASCII only: str.isalnum takes "²" too


def check_vm_id(vm_id: str) -> str:
    if not _VM_ID.fullmatch(vm_id):
        raise InvalidInput(f"malformed VM id {vm_id[:40]!r}", code="invalid_id")
    return vm_id


class VmService:
    def __init__(
        self,
        *,
        db: Database,
        runtime: Runtime,
        clock: Clock,
        metrics: Metrics,
        scheduler: Scheduler,
        boot_timeout: float,
        limits: Limits,
        on_running: Callable[[str, Path], Awaitable[None]] | None = None,
    ) -> None:
        self.on_running = on_running
        self.db = db
        self.runtime = runtime
        self.clock = clock
        self.metrics = metrics
        self.scheduler = scheduler
        self.boot_timeout = boot_timeout
        self.limits = limits

    async def get(self, vm_id: str, user_id: str | None) -> Vm:
        check_vm_id(vm_id)
        async with self.db.read() as repo:
            vm = await repo.vm(vm_id)
        if vm is None or (user_id is not None and vm.user_id != user_id):
            raise NotFound(f"no VM {vm_id} for this user", code="vm_not_found")
        return vm

    async def list(
        self,
        user_id: str | None,
        *,
        role: str | None = None,
        state: str | None = None,
        live_only: bool = False,
    ) -> list[Vm]:
        if role is not None and role not in {r.value for r in VmRole}:
            raise InvalidInput(f"unknown role {role!r}", code="invalid_role")
        if state is not None and state not in {s.value for s in VmState}:
            raise InvalidInput(f"unknown state {state!r}", code="invalid_state")
        states = [state] if state else None
        if live_only and states is None:
            states = [s.value for s in VmState if s.live]
        async with self.db.read() as repo:
            return await repo.vms(user_id=user_id, role=role, states=states)

    async def create_cli(self, *, user_id: str, actor: str) -> Vm:
        now = self.clock.now()
        vm = Vm(
            id=new_vm_id(),
            role=VmRole.CLI.value,
            runtime=self.runtime.name,
            user_id=user_id,
            state=VmState.CREATING.value,
            created_at=now,
            updated_at=now,
            destroy_after=None,
            destroy_attempts=0,
            warm=False,
            detail={},
        )
        async with self.db.transaction() as repo:
            refusal = await quotas.check(
                repo,
                StartKind.CLI_VM,
                user_id=user_id,
                limits=self.limits,
                now=now,
                login_timeout=timedelta(0),  # CLI VMs have no login
            )
            if refusal is not None:
                raise quotas.error(refusal)
            repo.add_vm(vm)
            repo.add_event(
                at=now,
                kind="vm",
                subject_id=vm.id,
                vm_id=vm.id,
                to_state=VmState.CREATING.value,
                cause="created",
                actor=actor,
            )
        started = asyncio.get_running_loop().time()
        try:
            async with asyncio.timeout(self.boot_timeout):
                running = await self.runtime.create(
                    VmSpec(vm_id=vm.id, role=VmRole.CLI, user_id=user_id)
                )
        except Exception as exc:
            await self.runtime.destroy(vm.id)
            async with self.db.transaction() as repo:
                await records.move_vm(
                    repo,
                    vm,
                    VmState.DESTROYING,
                    now=self.clock.now(),
                    cause=DestroyReason.BOOT_FAILED.value,
                    actor=actor,
                    destroy_reason=DestroyReason.BOOT_FAILED.value,
                )
                await records.move_vm(
                    repo,
                    vm,
                    VmState.DESTROYED,
                    now=self.clock.now(),
                    cause=DestroyReason.BOOT_FAILED.value,
                    actor=actor,
                    destroyed_at=self.clock.now(),
                    last_error=str(exc)[:500],
                )
            raise RuntimeFailure(f"the CLI VM did not start: {exc}") from exc
        self.metrics.vm_boot.labels("cli", self.runtime.name, "cold").observe(
            asyncio.get_running_loop().time() - started
        )
        now = self.clock.now()
        async with self.db.transaction() as repo:
            await records.move_vm(
                repo,
                vm,
                VmState.RUNNING,
                now=now,
                cause="booted",
                actor=actor,
                running_at=now,
                detail=dict(running.detail),
            )
        await self._running(vm.id, running.state_dir)
        return vm

    async def adopt(self) -> None:
        """After a restart: every CLI VM of this node that runs gets ``on_running`` again."""
        running = {v.vm_id: v for v in await self.runtime.list() if v.role is VmRole.CLI}
        async with self.db.read() as repo:
            rows = await repo.vms(
                role=VmRole.CLI.value, states=[VmState.RUNNING.value], node=self.db.node
            )
        for vm in rows:
            if vm.id in running:
                await self._running(vm.id, running[vm.id].state_dir)

    async def _running(self, vm_id: str, state_dir: Path) -> None:
        if self.on_running is None:
            return
        try:
            await self.on_running(vm_id, state_dir)
        except Exception:  # the VM runs; without its proxy it reaches nothing, as before
            log.exception("could not set up CLI VM %s", vm_id, extra={"vm_id": vm_id})

    async def delete(self, vm_id: str, *, user_id: str | None, actor: str) -> Vm:
        """Destroy a VM at its owner's request (a browser VM's live session is cancelled
        first). Idempotent: deleting a destroyed VM answers its tombstone."""
        vm = await self.get(vm_id, user_id)
        now = self.clock.now()
        async with self.db.transaction() as repo:
            session = await repo.session_of_vm(vm.id)
            if session is not None and not SessionStatus(session.status).terminal:
                await records.move_session(
                    repo, session, SessionStatus.CANCELLED, now=now, cause="vm_deleted", actor=actor
                )
        await self.scheduler.destroy_now(vm.id, reason=DestroyReason.OWNER_DELETE, actor=actor)
        return await self.get(vm_id, user_id)
