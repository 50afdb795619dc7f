"""The state machines refuse illegal moves, and terminal states never change."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from airlock.domain import IllegalTransition
from airlock.domain import sessions as session_sm
from airlock.domain import vms as vm_sm
from airlock.domain.sessions import SessionStatus
from airlock.domain.vms import VmState


def test_session_happy_path() -> None:
    s = SessionStatus.INITIALIZING
    s = session_sm.move(s, SessionStatus.AWAITING_USER)
    s = session_sm.move(s, SessionStatus.COMPLETED)
    assert s.terminal


@pytest.mark.parametrize("terminal", sorted(session_sm.TERMINAL))
@pytest.mark.parametrize("target", list(SessionStatus))
def test_terminal_session_never_changes(terminal: SessionStatus, target: SessionStatus) -> None:
    with pytest.raises(IllegalTransition):
        session_sm.move(terminal, target)


def test_session_cannot_go_back_to_initializing() -> None:
    with pytest.raises(IllegalTransition, match="awaiting_user -> initializing"):
        session_sm.move(SessionStatus.AWAITING_USER, SessionStatus.INITIALIZING)


@pytest.mark.parametrize("terminal", sorted(vm_sm.TERMINAL))
@pytest.mark.parametrize("target", list(VmState))
def test_terminal_vm_never_changes(terminal: VmState, target: VmState) -> None:
    with pytest.raises(IllegalTransition):
        vm_sm.move(terminal, target)


def test_vm_cannot_skip_destroying() -> None:
    for state in (VmState.CREATING, VmState.RUNNING, VmState.DRAINING, VmState.RETAINED):
        with pytest.raises(IllegalTransition):
            vm_sm.move(state, VmState.DESTROYED)


@given(st.lists(st.sampled_from(list(SessionStatus)), max_size=30))
def test_random_session_walks_stay_in_the_table(targets: list[SessionStatus]) -> None:
    """Any sequence of requested moves: the ones applied are table edges, and once a
    terminal status is reached every later request is refused (invariant 3 at the
    session level: a late complete or second capture is never re-applied)."""
    status = SessionStatus.INITIALIZING
    ended_as: SessionStatus | None = None
    for target in targets:
        if session_sm.can_move(status, target):
            assert ended_as is None
            status = session_sm.move(status, target)
            if status.terminal:
                ended_as = status
        else:
            with pytest.raises(IllegalTransition):
                session_sm.move(status, target)
    if ended_as is not None:
        assert status is ended_as


@given(
    st.lists(st.sampled_from(list(VmState)), max_size=30),
    st.integers(min_value=2, max_value=10),
)
def test_concurrent_destroy_claims_destroy_once(targets: list[VmState], claimers: int) -> None:
    """Invariant 3 at the domain level: however many actors race to destroy a VM (complete,
    cancel, deadline), and whatever moves came before, at most one move into
    ``destroying`` and one into ``destroyed`` are ever allowed."""
    state = VmState.CREATING
    for target in targets:
        if target not in (VmState.DESTROYING, VmState.DESTROYED) and vm_sm.can_move(state, target):
            state = vm_sm.move(state, target)
    claims = destroyed = 0
    for _ in range(claimers):
        if vm_sm.can_move(state, VmState.DESTROYING):
            state = vm_sm.move(state, VmState.DESTROYING)
            claims += 1
    for _ in range(claimers):
        if vm_sm.can_move(state, VmState.DESTROYED):
            state = vm_sm.move(state, VmState.DESTROYED)
            destroyed += 1
    assert claims <= 1
    assert destroyed <= 1
    assert destroyed == claims or state is VmState.LOST
