"""The reconcile decision: compare what the runtime runs with what the database holds.

Level-triggered (lifecycle.md, "Reconciler"). The service observes (lists the runtime
first, then reads the rows), calls ``decide``, and applies each action with a conditional
update, so a row that moved meanwhile is left for the next round.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from airlock.domain.vms import VmState


@dataclass(frozen=True, slots=True)
class RecordedVm:
    """A VM row as the reconciler needs it."""

    vm_id: str
    state: VmState
    destroy_after: datetime | None
    created_at: datetime
    updated_at: datetime


class ActionKind(StrEnum):
    DESTROY_ORPHAN = "destroy_orphan"  # running, but no live row: destroy it, count it
    MARK_LOST = "mark_lost"  # gone before its deadline: loud (invariant 5)
    MARK_DESTROYED = "mark_destroyed"  # gone, and it was due or being destroyed anyway
    MARK_BOOT_FAILED = "mark_boot_failed"  # never came up within the boot timeout


@dataclass(frozen=True, slots=True)
class Action:
    kind: ActionKind
    vm_id: str
    expected_state: VmState | None = None  # the row's state the action was decided on


def decide(
    *,
    observed: Iterable[str] | None,
    observed_at: datetime,
    recorded: Mapping[str, RecordedVm],
    now: datetime,
    boot_timeout: timedelta,
) -> list[Action]:
    """Decide what to do. ``observed`` is None when the runtime could not be listed.

    ``recorded`` holds every live row plus the rows of every observed VM. A row updated
    at or after ``observed_at`` changed after the runtime was listed: it is left for the
    next round rather than judged on a stale observation.
    """
    if observed is None:
        return []  # never destructive on missing data
    running = frozenset(observed)
    actions: list[Action] = []
    for vm_id in sorted(running):
        row = recorded.get(vm_id)
        if row is None:
            actions.append(Action(ActionKind.DESTROY_ORPHAN, vm_id))
        elif row.state.terminal and row.updated_at < observed_at:
            actions.append(Action(ActionKind.DESTROY_ORPHAN, vm_id, row.state))
    for vm_id, row in sorted(recorded.items()):
        if vm_id in running or row.state.terminal or row.updated_at >= observed_at:
            continue
        if row.state is VmState.CREATING:
            if now - row.created_at > boot_timeout:
                actions.append(Action(ActionKind.MARK_BOOT_FAILED, vm_id, row.state))
        elif row.state is VmState.DESTROYING or (
            row.destroy_after is not None and row.destroy_after <= now
        ):
            actions.append(Action(ActionKind.MARK_DESTROYED, vm_id, row.state))
        else:
            actions.append(Action(ActionKind.MARK_LOST, vm_id, row.state))
    return actions
