"""VMs as the API sees them: create a user's long-lived CLI VM, list, read, delete.

A CLI VM has no deadline (``destroy_after`` stays empty) until its owner deletes it. Once
it runs (and again when a restarted controller adopts it) ``on_running`` gives it what it
needs from the controller: its egress proxy.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path

from airlock.clock import Clock
from airlock.domain.quotas import Limits, Scope, StartKind
from airlock.domain.sessions import SessionStatus
from airlock.domain.vms import LIVE, DestroyReason, VmRole, VmState
from airlock.errors import Conflict, InvalidInput, NotFound, RuntimeFailure
from airlock.metrics import Metrics
from airlock.runtimes.base import Runtime, VmSpec
from airlock.services import quotas, records
from airlock.services.placement import MAX_PLACEMENTS, NO_HOST, Placement, no_host
from airlock.services.scheduler import Scheduler
from airlock.services.vm_boot import BootFailed, VmBooter, add_vm, new_vm
from airlock.store.db import Database
from airlock.store.tables import Vm

log = logging.getLogger("airlock.vms")

PLACED_POLL_S = 0.1

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
        placement: Placement | None = None,
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
        self.boots = VmBooter(
            db=db, runtime=runtime, clock=clock, metrics=metrics, boot_timeout=boot_timeout
        )
        self.placement = placement
        # Set by Core: wake the boot queue of the node a VM was placed on.
        self.poke: Callable[[str], Awaitable[None]] | None = None

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
        if role is not None and role not in set(VmRole):
            raise InvalidInput(f"unknown role {role!r}", code="invalid_role")
        if state is not None and state not in set(VmState):
            raise InvalidInput(f"unknown state {state!r}", code="invalid_state")
        states = [state] if state else None
        if live_only and states is None:
            states = list(LIVE)
        async with self.db.read() as repo:
            return await repo.vms(user_id=user_id, role=role, states=states)

    async def create_cli(self, *, user_id: str, actor: str) -> Vm:
        """Add the row, boot it, and answer it running. A boot that fails, or a VM deleted
        while it booted, is a clear error with the row's tombstone left behind."""
        now = self.clock.now()
        vm = new_vm(role=VmRole.CLI, runtime=self.runtime.name, user_id=user_id, now=now)
        async with self.db.transaction() as repo:
            refusal = await quotas.check(
                repo,
                StartKind.CLI_VM,
                user_id=user_id,
                limits=self.limits,
                clock=self.clock,
                login_timeout=timedelta(0),  # CLI VMs have no login
            )
            # A user's own limit is the user's; where there is room is placement's.
            if refusal is not None and (refusal.scope is Scope.USER or self.placement is None):
                raise quotas.error(refusal)
            if self.placement is not None:
                placed = await self.placement.choose(repo, VmRole.CLI)
                if placed is None:
                    raise no_host("a CLI VM")
                vm.node = placed.node
            add_vm(repo, vm, cause="created", actor=actor)
        if vm.node and vm.node != self.db.node:
            if self.poke is not None:
                await self.poke(vm.node)
            return await self._wait_placed(vm)
        spec = VmSpec(vm_id=vm.id, role=VmRole.CLI, user_id=user_id)
        try:
            running = await self.boots.boot_and_record(vm, spec, source="cold", actor=actor)
        except BootFailed as failed:
            raise RuntimeFailure(f"the CLI VM did not start: {failed.cause}") from failed
        if running is None:
            raise Conflict(f"the CLI VM {vm.id} was destroyed while it booted", code="vm_destroyed")
        await self._running(vm.id, running.state_dir)
        return vm

    async def _wait_placed(self, vm: Vm) -> Vm:
        """A CLI VM placed on another node: answer once that node has booted it (or
        another, after a hand-back), or its failure."""
        deadline = time.monotonic() + self.boot_timeout * MAX_PLACEMENTS + 10
        while time.monotonic() < deadline:
            async with self.db.read() as repo:
                row = await repo.vm(vm.id)
            assert row is not None
            if row.state == VmState.RUNNING:
                return row
            if row.state.terminal or row.state == VmState.DESTROYING:
                if (row.last_error or "").startswith(NO_HOST):
                    raise no_host("a CLI VM")
                raise RuntimeFailure(f"the CLI VM did not start: {row.last_error or row.state}")
            await asyncio.sleep(PLACED_POLL_S)
        raise RuntimeFailure(f"the CLI VM did not start: node {vm.node} did not boot it in time")

    async def take_up(self, vm: Vm, *, actor: str) -> str | None:
        """A CLI VM placed on this node by another: boot it and record it running. None
        when done (or destroyed meanwhile), else why not (the row is handed back)."""
        spec = VmSpec(vm_id=vm.id, role=VmRole.CLI, user_id=vm.user_id)
        try:
            running = await self.boots.boot(spec, source="cold")
        except BootFailed as failed:
            return f"the CLI VM did not start: {failed.cause}"[:300]
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
                detail={**vm.detail, **running.detail},
            )
        if not won:
            await self.runtime.destroy(vm.id)
            return None
        await self._running(vm.id, running.state_dir)
        return None

    async def give_up(self, vm: Vm, why: str, *, actor: str) -> None:
        """No node could take ``vm``: it ends here with the reason its creator answers."""
        now = self.clock.now()
        async with self.db.transaction() as repo:
            await records.record_boot_failure(
                repo, vm, now=now, actor=actor, error=f"{NO_HOST}: {why}"
            )

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
