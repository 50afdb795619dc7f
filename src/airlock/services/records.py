"""Every state change goes through here: a conditional update, an event row in the same
transaction, and one log line with the session and VM ids. So the audit trail and the
logs cannot disagree with the tables."""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from airlock.domain import sessions as session_sm
from airlock.domain import vms as vm_sm
from airlock.domain.sessions import SessionStatus
from airlock.domain.vms import DestroyReason, VmState
from airlock.store.repo import Repo
from airlock.store.tables import AuthSession, Vm

log = logging.getLogger("airlock.lifecycle")


async def move_vm(
    repo: Repo,
    vm: Vm,
    to: VmState,
    *,
    now: datetime,
    cause: str,
    actor: str,
    session_id: str | None = None,
    **values: Any,
) -> bool:
    """Move ``vm`` from the state it was read in to ``to``; False if it moved meanwhile."""
    current = VmState(vm.state)
    vm_sm.move(current, to)  # raises IllegalTransition: a bug in the caller, not a race
    won = await repo.move_vm(vm.id, [current], to, updated_at=now, **values)
    if won:
        repo.add_event(
            at=now,
            kind="vm",
            subject_id=vm.id,
            vm_id=vm.id,
            session_id=session_id,
            from_state=current,
            to_state=to,
            cause=cause,
            actor=actor,
        )
        log.info(
            "vm %s -> %s",
            current,
            to,
            extra={"vm_id": vm.id, "session_id": session_id, "cause": cause, "actor": actor},
        )
        vm.state = to
        for key, value in values.items():
            setattr(vm, key, value)
    return won


async def move_session(
    repo: Repo,
    session: AuthSession,
    to: SessionStatus,
    *,
    now: datetime,
    cause: str,
    actor: str,
    **values: Any,
) -> bool:
    """Move ``session`` from the status it was read in to ``to``; False if it moved."""
    current = SessionStatus(session.status)
    changes = session_sm.record_changes(
        current, to, now=now, failure_reason=values.pop("failure_reason", None)
    )
    changes.pop("status")
    values = {**changes, **values}
    won = await repo.move_session(session.id, [current], to, updated_at=now, **values)
    if won:
        repo.add_event(
            at=now,
            kind="session",
            subject_id=session.id,
            session_id=session.id,
            vm_id=session.vm_id,
            from_state=current,
            to_state=to,
            cause=cause,
            actor=actor,
            detail={"failure_reason": values["failure_reason"]}
            if values.get("failure_reason")
            else None,
        )
        log.info(
            "session %s -> %s",
            current,
            to,
            extra={
                "session_id": session.id,
                "vm_id": session.vm_id,
                "cause": cause,
                "actor": actor,
            },
        )
        session.status = to
        session.updated_at = now
        for key, value in values.items():
            setattr(session, key, value)
    return won


async def record_boot_failure(repo: Repo, vm: Vm, *, now: datetime, actor: str, error: str) -> bool:
    """A VM that never booted: ``destroying`` then ``destroyed`` with ``boot_failed`` and
    the error, in one transaction; False when another move won the row first."""
    if not await move_vm(
        repo,
        vm,
        VmState.DESTROYING,
        now=now,
        cause=DestroyReason.BOOT_FAILED,
        actor=actor,
        destroy_reason=DestroyReason.BOOT_FAILED,
    ):
        return False
    return await move_vm(
        repo,
        vm,
        VmState.DESTROYED,
        now=now,
        cause=DestroyReason.BOOT_FAILED,
        actor=actor,
        destroyed_at=now,
        last_error=error[:500],
    )
