"""The reconciler: level-triggered repair of the database against what really runs.

Observe (list the runtime, then read the rows), decide (``domain.reconcile.decide``, pure),
apply (conditional updates, so a row that moved meanwhile is left for the next round).
When the runtime cannot be listed it does nothing that round, and says so.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta

from airlock.clock import Clock
from airlock.domain.reconcile import Action, ActionKind, RecordedVm, decide
from airlock.domain.sessions import FailureReason, SessionStatus
from airlock.domain.vms import DestroyReason, VmState
from airlock.metrics import Metrics
from airlock.runtimes.base import Runtime
from airlock.services import records
from airlock.services.bus import SessionBus
from airlock.store.db import Database

log = logging.getLogger("airlock.reconciler")


@dataclass
class ReconcileReport:
    skipped: bool = False
    running: int = 0
    actions: list[Action] = field(default_factory=list)
    applied: list[Action] = field(default_factory=list)


class Reconciler:
    def __init__(
        self,
        *,
        db: Database,
        runtime: Runtime,
        clock: Clock,
        metrics: Metrics,
        bus: SessionBus,
        interval: timedelta,
        boot_timeout: timedelta,
        on_gone: Callable[[str], Awaitable[None]] | None = None,
    ) -> None:
        self.db = db
        self.runtime = runtime
        self.clock = clock
        self.metrics = metrics
        self.bus = bus
        self.interval = interval
        self.boot_timeout = boot_timeout
        self.on_gone = on_gone

    async def run(self) -> None:
        while True:
            await self.clock.sleep(self.interval.total_seconds())
            try:
                await self.reconcile_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("reconcile round failed")

    async def reconcile_once(self, *, dry_run: bool = False) -> ReconcileReport:
        observed_at = self.clock.now()
        try:
            running = await self.runtime.list()
        except Exception as exc:
            self.metrics.reconcile_failures.inc()
            log.warning("runtime could not be listed; reconcile skipped: %s", exc)
            return ReconcileReport(skipped=True)
        ids = [vm.vm_id for vm in running]
        async with self.db.read() as repo:
            rows = await repo.live_vms() + await repo.vms(ids=ids)
        recorded = {
            row.id: RecordedVm(
                row.id,
                VmState(row.state),
                row.destroy_after,
                row.created_at,
                row.updated_at,
                row.guest_lease_until,
            )
            for row in rows
        }
        actions = decide(
            observed=ids,
            observed_at=observed_at,
            recorded=recorded,
            now=self.clock.now(),
            boot_timeout=self.boot_timeout,
        )
        report = ReconcileReport(running=len(running), actions=actions)
        if dry_run:
            return report
        for action in actions:
            try:
                if await self._apply(action):
                    report.applied.append(action)
            except Exception:
                log.exception("reconcile action failed", extra={"vm_id": action.vm_id})
        return report

    async def _apply(self, action: Action) -> bool:
        if action.kind is ActionKind.DESTROY_ORPHAN:
            await self.runtime.destroy(action.vm_id)
            self.metrics.orphans_reaped.inc()
            log.warning("orphan VM destroyed", extra={"vm_id": action.vm_id})
            now = self.clock.now()
            async with self.db.transaction() as repo:
                repo.add_event(
                    at=now,
                    kind="vm",
                    subject_id=action.vm_id,
                    vm_id=action.vm_id,
                    cause=DestroyReason.ORPHAN,
                    actor="reconciler",
                )
            return True
        # The VM is gone: clean whatever files it left before recording that.
        await self.runtime.destroy(action.vm_id)
        if self.on_gone is not None:
            await self.on_gone(action.vm_id)
        now = self.clock.now()
        async with self.db.transaction() as repo:
            vm = await repo.vm(action.vm_id, lock=True)
            if vm is None or vm.state != action.expected_state:
                return False  # it moved since we looked: next round decides again
            session = await repo.session_of_vm(vm.id)
            live_session = session is not None and not SessionStatus(session.status).terminal
            if action.kind is ActionKind.MARK_LOST:
                await records.move_vm(
                    repo,
                    vm,
                    VmState.LOST,
                    now=now,
                    cause=DestroyReason.VANISHED,
                    actor="reconciler",
                    destroyed_at=now,
                    destroy_reason="vanished",
                )
                self.metrics.premature_destructions.inc()
                log.error("VM vanished while it should be alive", extra={"vm_id": vm.id})
                failure = FailureReason.VM_LOST
            else:
                if vm.state != VmState.DESTROYING:
                    cause = {
                        ActionKind.MARK_BOOT_FAILED: DestroyReason.BOOT_FAILED,
                        ActionKind.MARK_LEASE_EXPIRED: DestroyReason.LEASE_EXPIRED,
                    }.get(action.kind, DestroyReason.VANISHED)
                    reason = vm.destroy_reason or cause
                    if action.kind is ActionKind.MARK_LEASE_EXPIRED:
                        reason = cause  # how it really ended, whatever was planned
                        log.warning(
                            "VM ended itself: its lease ran out with no controller to renew it",
                            extra={"vm_id": vm.id},
                        )
                    await records.move_vm(
                        repo,
                        vm,
                        VmState.DESTROYING,
                        now=now,
                        cause=cause,
                        actor="reconciler",
                        destroy_reason=reason,
                    )
                await records.move_vm(
                    repo,
                    vm,
                    VmState.DESTROYED,
                    now=now,
                    cause="runtime_gone",
                    actor="reconciler",
                    destroyed_at=now,
                    lease_until=None,
                )
                failure = (
                    FailureReason.VM_LEASE_EXPIRED
                    if action.kind is ActionKind.MARK_LEASE_EXPIRED
                    else FailureReason.VM_BOOT_FAILED
                )
            if live_session and session is not None:
                await records.move_session(
                    repo,
                    session,
                    SessionStatus.FAILED,
                    now=now,
                    cause=failure,
                    actor="reconciler",
                    failure_reason=_failure_text(failure),
                )
                self.metrics.sessions.labels(SessionStatus.FAILED).inc()
        if session is not None:
            await self.bus.publish(session.id)
        return True


def _failure_text(reason: FailureReason) -> str:
    if reason is FailureReason.VM_LOST:
        return "vm_lost: the browser VM stopped unexpectedly; start a new login"
    if reason is FailureReason.VM_LEASE_EXPIRED:
        return (
            "vm_lease_expired: the browser VM ended itself while no controller was running "
            "to renew its lease; start a new login"
        )
    return "vm_boot_failed: the browser VM did not come up in time; start a new login"
