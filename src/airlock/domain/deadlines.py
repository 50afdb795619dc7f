"""The deadline policy: when a VM may be destroyed (lifecycle.md, "Deadlines are data").

Every function takes the moment it is about (``now``) and returns the new ``destroy_after``.
Nothing here reads a clock, so the same table is proven by property tests and used by the
services verbatim. ``destroy_after`` only ever says "not before": the scheduler destroys a
VM when its deadline is due, and nothing else in the system destroys one early except an
explicit ``complete``, cancel or owner delete (invariant 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from airlock.domain.sessions import SessionStatus
from airlock.domain.vms import IN_SERVICE, VmState


@dataclass(frozen=True, slots=True)
class Durations:
    """The lifecycle's knobs, as settings give them."""

    grace_success: timedelta = timedelta(seconds=30)
    grace_failure: timedelta = timedelta(seconds=5)
    max_drain: timedelta = timedelta(minutes=2)
    login_timeout: timedelta = timedelta(minutes=10)
    max_session: timedelta = timedelta(minutes=30)
    idle_extension: timedelta = timedelta(minutes=2)
    keep_failed: bool = False
    debug_retention: timedelta | None = timedelta(hours=1)  # None: keep until deleted


@dataclass(frozen=True, slots=True)
class Plan:
    """What a session event does to its VM: the state to move to and the new deadline."""

    state: VmState
    destroy_after: datetime | None


@dataclass(frozen=True, slots=True)
class DeadlinePolicy:
    durations: Durations

    def on_created(self, now: datetime) -> datetime:
        """Session created: the login deadline."""
        return now + self.durations.login_timeout

    def on_viewer_activity(
        self,
        *,
        now: datetime,
        current: datetime | None,
        vm_state: VmState,
        vm_created_at: datetime,
        session_status: SessionStatus,
        completed_at: datetime | None,
    ) -> datetime | None:
        """A viewer connected, sent traffic or a keepalive: extend, within the caps.

        While the login runs: ``max(current, now + idle_extension)``, never past
        ``created + max_session``. While draining after success: ``max(current, now +
        grace_success)``, never past ``completed_at + max_drain``. Otherwise unchanged.
        An extension never moves a deadline earlier.
        """
        if current is None:
            return None
        d = self.durations
        if not session_status.terminal and vm_state in IN_SERVICE:
            cap = vm_created_at + d.max_session
            return max(current, min(now + d.idle_extension, cap))
        if (
            session_status is SessionStatus.COMPLETED
            and vm_state is VmState.DRAINING
            and completed_at is not None
        ):
            cap = completed_at + d.max_drain
            return max(current, min(now + d.grace_success, cap))
        return current

    def on_completed(self, completed_at: datetime) -> Plan:
        """Credentials captured and stored: drain for the success grace period."""
        grace = min(self.durations.grace_success, self.durations.max_drain)
        return Plan(VmState.DRAINING, completed_at + grace)

    def on_failed(self, now: datetime) -> Plan:
        """The session failed: a short grace so the page can show why, or a debug keep."""
        d = self.durations
        if d.keep_failed:
            until = None if d.debug_retention is None else now + d.debug_retention
            return Plan(VmState.RETAINED, until)
        return Plan(VmState.DRAINING, now + d.grace_failure)

    def on_destroy_now(self, now: datetime) -> datetime:
        """``complete``, cancel, owner delete, login deadline passed: due at once."""
        return now

    @staticmethod
    def is_due(destroy_after: datetime | None, now: datetime) -> bool:
        return destroy_after is not None and destroy_after <= now
