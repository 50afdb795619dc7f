"""Viewer presence, decided: which VMs a person can still look at, when an open viewer
socket ends and with what close code, and how often an open socket says someone is looking
(lifecycle.md: an open viewer is presence). Pure: the VNC proxy and the services that keep
its sockets act on these answers.

Close codes (a page shows them): 4001 ``vm destroyed``, 4002 ``vm lost``, 4003
``vm <state>`` (no longer viewable otherwise), 1001 ``controller shutting down``.
"""

from __future__ import annotations

from datetime import timedelta

from airlock.domain.vms import VmState

# VMs whose screen a person can still look at; a session's novncURL is null otherwise.
VIEWABLE = frozenset({VmState.CREATING, VmState.RUNNING, VmState.DRAINING})

CLOSE_VM_DESTROYED = 4001
CLOSE_VM_LOST = 4002
CLOSE_VM_NOT_VIEWABLE = 4003
CLOSE_SHUTDOWN = 1001
VM_GONE = (CLOSE_VM_DESTROYED, "vm destroyed")

MAX_KEEPALIVE_INTERVAL_S = 5.0
MIN_KEEPALIVE_INTERVAL_S = 0.1


def viewer_end(state: VmState | None) -> tuple[int, str] | None:
    """How a viewer socket closes when its VM is in ``state`` (None: the VM is gone), as
    (close code, reason); None while it is viewable."""
    if state in VIEWABLE:
        return None
    if state is None or state in (VmState.DESTROYING, VmState.DESTROYED):
        return VM_GONE
    if state == VmState.LOST:
        return CLOSE_VM_LOST, "vm lost"
    return CLOSE_VM_NOT_VIEWABLE, f"vm {state.value}"


def keepalive_interval(grace_success: timedelta, idle_extension: timedelta) -> float:
    """Seconds between an open socket's keepalives: often enough that it keeps a draining
    VM (``grace_success``) and a running one (``idle_extension``) alive; at most every few
    seconds, never per message."""
    shortest = min(grace_success, idle_extension, timedelta(seconds=15)).total_seconds()
    return max(MIN_KEEPALIVE_INTERVAL_S, min(MAX_KEEPALIVE_INTERVAL_S, shortest / 3))
