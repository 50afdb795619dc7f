"""The auth session state machine (lifecycle.md, "Two state machines").

initializing --vm ready, login started--> awaiting_user --captured--> completed
     +----------- error / cancel / login deadline ---+--> failed | cancelled | expired
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from airlock.domain import IllegalTransition
from airlock.domain.quotas import Refusal, Scope


class SessionStatus(StrEnum):
    INITIALIZING = "initializing"
    AWAITING_USER = "awaiting_user"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


_ENDINGS = frozenset({SessionStatus.FAILED, SessionStatus.CANCELLED, SessionStatus.EXPIRED})

TRANSITIONS: dict[SessionStatus, frozenset[SessionStatus]] = {
    # A capture can race the "login started" report, so initializing may complete directly.
    SessionStatus.INITIALIZING: frozenset({SessionStatus.AWAITING_USER, SessionStatus.COMPLETED})
    | _ENDINGS,
    SessionStatus.AWAITING_USER: frozenset({SessionStatus.COMPLETED}) | _ENDINGS,
    SessionStatus.COMPLETED: frozenset(),
    SessionStatus.FAILED: frozenset(),
    SessionStatus.CANCELLED: frozenset(),
    SessionStatus.EXPIRED: frozenset(),
}

# Read off the table above (``tests/domain/test_state_sets.py`` pins them).
TERMINAL = frozenset(s for s, moves in TRANSITIONS.items() if not moves)
LIVE = frozenset(set(SessionStatus) - TERMINAL)  # initializing, awaiting_user


def can_move(current: SessionStatus, target: SessionStatus) -> bool:
    return target in TRANSITIONS[current]


def move(current: SessionStatus, target: SessionStatus) -> SessionStatus:
    """Return ``target`` if the table allows it, else raise ``IllegalTransition``."""
    if not can_move(current, target):
        raise IllegalTransition("session", current.value, target.value)
    return target


class FailureReason(StrEnum):
    """Why a session failed, in words a person can act on (invariant 4)."""

    VM_BOOT_FAILED = "vm_boot_failed"
    VM_LOST = "vm_lost"
    VM_LEASE_EXPIRED = "vm_lease_expired"
    LOGIN_FAILED = "login_failed"
    CAPTURE_FAILED = "capture_failed"
    CONTROLLER_RESTARTED = "controller_restarted"
    LOGIN_TIMEOUT = "login_timeout"


def record_changes(
    current: SessionStatus,
    target: SessionStatus,
    *,
    now: datetime,
    failure_reason: str | None = None,
) -> dict[str, Any]:
    """The fields a session record must change for a move, so that it tells the truth
    (invariant 4): when it became ready, completed and ended, and, for a failure, why.

    Raises ``IllegalTransition`` for a move the table refuses, and ``ValueError`` for a
    failure without a reason a person can act on, or a reason on a move that is no failure.
    """
    move(current, target)
    changes: dict[str, Any] = {"status": target.value}
    if target is SessionStatus.FAILED and not (failure_reason and failure_reason.strip()):
        raise ValueError("a failed session needs a failure reason a person can act on")
    if failure_reason is not None and target not in (SessionStatus.FAILED, SessionStatus.EXPIRED):
        raise ValueError(f"a move to {target.value} carries no failure reason")
    if failure_reason is not None:
        changes["failure_reason"] = failure_reason
    if target is SessionStatus.AWAITING_USER:
        changes["ready_at"] = now
    if target is SessionStatus.COMPLETED:
        changes["completed_at"] = now
    if target.terminal:
        changes["ended_at"] = now
    return changes


class StartPath(StrEnum):
    """How a login gets its browser VM."""

    WARM = "warm"  # claim a VM the warm pool booted ahead (the login starts at once)
    COLD = "cold"  # add a VM row and boot it now


def start_paths(refusal: Refusal | None, *, pool: bool) -> tuple[StartPath, ...]:
    """The ways a login may start, in the order to try them; none: ``refusal`` stands.

    A user over their own limits gets nothing. A warm VM is counted already, so a full
    node still hands out its warm VMs (when there is a ``pool``); a cold boot needs room.
    """
    if refusal is not None and refusal.scope is Scope.USER:
        return ()
    warm = (StartPath.WARM,) if pool else ()
    return warm + ((StartPath.COLD,) if refusal is None else ())
