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
    # After this moment the VM may have ended itself (its lease, granted by a controller,
    # plus the margin, ran out). None: it has no lease (a CLI VM).
    lease_until: datetime | None = None


class ActionKind(StrEnum):
    DESTROY_ORPHAN = "destroy_orphan"  # running, but no live row: destroy it, count it
    MARK_LOST = "mark_lost"  # gone before its deadline: loud (invariant 5)
    MARK_DESTROYED = "mark_destroyed"  # gone, and it was due or being destroyed anyway
    MARK_BOOT_FAILED = "mark_boot_failed"  # never came up within the boot timeout
    MARK_LEASE_EXPIRED = "mark_lease_expired"  # gone after its lease ran out: it ended itself


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

    A leased VM that is gone once its lease has run out (no controller renewed it: this one
    was down) ended itself, and that is no surprise; gone *before* then, it vanished while
    it should have been alive, and that is loud (invariant 5). The row's lease is never
    later than the VM's own (the controller records a lease only once the VM has it, timed
    from before it asked), so a VM that ended itself is never taken for a lost one.
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
        if row.state is VmState.DESTROYING:
            actions.append(Action(ActionKind.MARK_DESTROYED, vm_id, row.state))
        elif row.state is VmState.CREATING:  # a create in flight may not be listed yet
            if now - row.created_at > boot_timeout:
                kind = ActionKind.MARK_BOOT_FAILED
                if row.lease_until is not None and row.lease_until <= now:
                    kind = ActionKind.MARK_LEASE_EXPIRED
                actions.append(Action(kind, vm_id, row.state))
        elif row.lease_until is not None and row.lease_until <= now:
            actions.append(Action(ActionKind.MARK_LEASE_EXPIRED, vm_id, row.state))
        elif row.destroy_after is not None and row.destroy_after <= now:
            actions.append(Action(ActionKind.MARK_DESTROYED, vm_id, row.state))
        else:
            actions.append(Action(ActionKind.MARK_LOST, vm_id, row.state))
    return actions
