"""The named state sets say what their names say, and agree with the transition tables
they are read from: a new state or a new move that changes one is caught here."""

from __future__ import annotations

from airlock.domain import sessions as session_sm
from airlock.domain import viewers
from airlock.domain import vms as vm_sm
from airlock.domain.sessions import SessionStatus
from airlock.domain.vms import VmState


def test_vm_sets_are_the_expected_states() -> None:
    assert {VmState.DESTROYED, VmState.LOST} == vm_sm.TERMINAL
    assert set(VmState) - {VmState.DESTROYED, VmState.LOST} == vm_sm.LIVE
    assert {
        VmState.CREATING,
        VmState.RUNNING,
        VmState.DRAINING,
        VmState.RETAINED,
    } == vm_sm.DESTROYABLE
    assert {VmState.CREATING, VmState.RUNNING} == vm_sm.IN_SERVICE
    assert {VmState.RUNNING, VmState.DRAINING, VmState.RETAINED} == vm_sm.BOOTED
    assert {VmState.CREATING, VmState.RUNNING, VmState.DRAINING} == viewers.VIEWABLE


def test_vm_sets_agree_with_the_transition_table() -> None:
    table = vm_sm.TRANSITIONS
    for state in VmState:
        moves = table[state]
        assert (state in vm_sm.TERMINAL) == (not moves), state
        assert (state in vm_sm.LIVE) == bool(moves), state
        assert state.terminal == (state in vm_sm.TERMINAL)
        assert state.live == (state in vm_sm.LIVE)
        # A destroy can start from exactly these states (the scheduler's due rows).
        assert (state in vm_sm.DESTROYABLE) == vm_sm.can_move(state, VmState.DESTROYING), state
        # In service: it can still be drained, i.e. it is not yet on its way out.
        assert (state in vm_sm.IN_SERVICE) == vm_sm.can_move(state, VmState.DRAINING), state
    # Booted: running, or any later state from which a destroy has not started yet.
    after_running = {s for s in table[VmState.RUNNING] if s in vm_sm.DESTROYABLE}
    assert {VmState.RUNNING} | after_running == vm_sm.BOOTED
    assert VmState.CREATING not in vm_sm.BOOTED  # not booted yet
    assert vm_sm.BOOTED <= vm_sm.DESTROYABLE <= vm_sm.LIVE
    assert vm_sm.IN_SERVICE <= vm_sm.DESTROYABLE
    assert VmState.DESTROYING in vm_sm.LIVE - vm_sm.DESTROYABLE
    # Viewable: in service or draining, never once a destroy may have started.
    assert vm_sm.IN_SERVICE < viewers.VIEWABLE <= vm_sm.DESTROYABLE
    assert VmState.RETAINED not in viewers.VIEWABLE  # a failed VM kept for debugging


def test_session_sets_agree_with_the_transition_table() -> None:
    assert {
        SessionStatus.COMPLETED,
        SessionStatus.FAILED,
        SessionStatus.CANCELLED,
        SessionStatus.EXPIRED,
    } == session_sm.TERMINAL
    assert {SessionStatus.INITIALIZING, SessionStatus.AWAITING_USER} == session_sm.LIVE
    for status in SessionStatus:
        moves = session_sm.TRANSITIONS[status]
        assert (status in session_sm.TERMINAL) == (not moves), status
        assert (status in session_sm.LIVE) == bool(moves), status
        assert status.terminal == (status in session_sm.TERMINAL)
