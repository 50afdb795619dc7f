"""The VM state machine (lifecycle.md, "Two state machines").

    creating -> running -> draining -> destroying -> destroyed
                     \\-> retained (debug keep of a failed VM)   \\-> lost (vanished early)

``destroyed`` and ``lost`` are terminal; rows are never deleted (they are tombstones).
"""

from __future__ import annotations

from enum import StrEnum

from airlock.domain import IllegalTransition


class VmRole(StrEnum):
    BROWSER = "browser"
    CLI = "cli"


class VmState(StrEnum):
    CREATING = "creating"
    RUNNING = "running"
    DRAINING = "draining"
    RETAINED = "retained"
    DESTROYING = "destroying"
    DESTROYED = "destroyed"
    LOST = "lost"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL

    @property
    def live(self) -> bool:
        return self not in TERMINAL


TRANSITIONS: dict[VmState, frozenset[VmState]] = {
    # creating -> destroying: boot failed, cancelled, or the login deadline passed mid-boot.
    VmState.CREATING: frozenset(
        {VmState.RUNNING, VmState.DRAINING, VmState.RETAINED, VmState.DESTROYING, VmState.LOST}
    ),
    VmState.RUNNING: frozenset(
        {VmState.DRAINING, VmState.RETAINED, VmState.DESTROYING, VmState.LOST}
    ),
    VmState.DRAINING: frozenset({VmState.DESTROYING, VmState.LOST}),
    VmState.RETAINED: frozenset({VmState.DESTROYING, VmState.LOST}),
    # A failed destroy is retried under a fresh lease (``store.repo``), not by a new move:
    # leaving ``destroying`` happens once.
    VmState.DESTROYING: frozenset({VmState.DESTROYED}),
    VmState.DESTROYED: frozenset(),
    VmState.LOST: frozenset(),
}

# The named sets, read off the table above (``tests/domain/test_state_sets.py`` pins them).
TERMINAL = frozenset(s for s, moves in TRANSITIONS.items() if not moves)  # destroyed, lost
LIVE = frozenset(set(VmState) - TERMINAL)
# A deadline (or a request) can still start its destroy: creating, running, draining,
# retained. ``destroying`` rows come back to the scheduler through their lease instead.
DESTROYABLE = frozenset(s for s, moves in TRANSITIONS.items() if VmState.DESTROYING in moves)
# Booting or booted and not yet on its way out: creating, running. A login can use the VM;
# the warm pool counts these as its own.
IN_SERVICE = frozenset(s for s, moves in TRANSITIONS.items() if VmState.DRAINING in moves)
# Booted and not yet being destroyed: running, draining, retained. The guest runs and its
# lease must be renewed.
BOOTED = frozenset({VmState.RUNNING} | (TRANSITIONS[VmState.RUNNING] & DESTROYABLE))


def can_move(current: VmState, target: VmState) -> bool:
    return target in TRANSITIONS[current]


def move(current: VmState, target: VmState) -> VmState:
    """Return ``target`` if the table allows it, else raise ``IllegalTransition``."""
    if not can_move(current, target):
        raise IllegalTransition("vm", current.value, target.value)
    return target


class DestroyReason(StrEnum):
    """Why a VM was (or will be) destroyed: the tombstone's answer to "what happened"."""

    COMPLETED = "completed"  # the frontend called complete
    GRACE_ENDED = "grace_ended"  # the success grace period or max drain ran out
    FAILED = "failed"  # the session failed; grace_failure ran out
    CANCELLED = "cancelled"
    LOGIN_TIMEOUT = "login_timeout"
    RETENTION_ENDED = "retention_ended"
    OWNER_DELETE = "owner_delete"
    ORPHAN = "orphan"
    VANISHED = "vanished"  # the runtime no longer runs it (lost, or gone while due)
    BOOT_FAILED = "boot_failed"
    LEASE_EXPIRED = "lease_expired"  # a browser VM ended itself: no controller renewed it
    WARM_RETIRED = "warm_retired"  # a warm-pool VM reached its maximum age unused
