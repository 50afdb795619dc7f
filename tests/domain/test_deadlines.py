"""The deadline table of lifecycle.md, row by row, then properties over random events."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from airlock.domain.deadlines import DeadlinePolicy, Durations
from airlock.domain.sessions import SessionStatus
from airlock.domain.vms import VmState

T0 = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
D = Durations()  # the documented defaults
POLICY = DeadlinePolicy(D)


def s(seconds: float) -> timedelta:
    return timedelta(seconds=seconds)


def test_defaults_are_the_documented_ones() -> None:
    assert (D.grace_success, D.grace_failure, D.max_drain) == (s(30), s(5), s(120))
    assert (D.login_timeout, D.max_session, D.idle_extension) == (s(600), s(1800), s(120))


def test_session_created_gets_the_login_deadline() -> None:
    assert POLICY.on_created(T0) == T0 + s(600)


def test_viewer_activity_extends_but_never_past_max_session() -> None:
    created = T0
    current = created + s(600)
    late = created + s(1750)
    new = POLICY.on_viewer_activity(
        now=late,
        current=current,
        vm_state=VmState.RUNNING,
        vm_created_at=created,
        session_status=SessionStatus.AWAITING_USER,
        completed_at=None,
    )
    assert new == created + s(1800)  # capped, not late + 120


def test_viewer_activity_never_shortens() -> None:
    new = POLICY.on_viewer_activity(
        now=T0 + s(1),
        current=T0 + s(600),
        vm_state=VmState.RUNNING,
        vm_created_at=T0,
        session_status=SessionStatus.AWAITING_USER,
        completed_at=None,
    )
    assert new == T0 + s(600)


def test_completed_drains_for_grace_success() -> None:
    plan = POLICY.on_completed(T0)
    assert plan.state is VmState.DRAINING
    assert plan.destroy_after == T0 + s(30)


def test_keepalive_while_draining_extends_up_to_max_drain() -> None:
    completed = T0
    current = completed + s(30)
    new = POLICY.on_viewer_activity(
        now=completed + s(20),
        current=current,
        vm_state=VmState.DRAINING,
        vm_created_at=T0,
        session_status=SessionStatus.COMPLETED,
        completed_at=completed,
    )
    assert new == completed + s(50)
    capped = POLICY.on_viewer_activity(
        now=completed + s(110),
        current=new,
        vm_state=VmState.DRAINING,
        vm_created_at=T0,
        session_status=SessionStatus.COMPLETED,
        completed_at=completed,
    )
    assert capped == completed + s(120)


def test_failed_gets_grace_failure_or_retained() -> None:
    plan = POLICY.on_failed(T0)
    assert (plan.state, plan.destroy_after) == (VmState.DRAINING, T0 + s(5))
    keep = DeadlinePolicy(Durations(keep_failed=True, debug_retention=s(3600)))
    assert keep.on_failed(T0).state is VmState.RETAINED
    assert keep.on_failed(T0).destroy_after == T0 + s(3600)
    forever = DeadlinePolicy(Durations(keep_failed=True, debug_retention=None))
    assert forever.on_failed(T0).destroy_after is None


def test_explicit_destroys_are_due_now() -> None:
    assert POLICY.on_destroy_now(T0) == T0
    assert POLICY.is_due(T0, T0)
    assert not POLICY.is_due(T0 + s(0.001), T0)
    assert not POLICY.is_due(None, T0)


def test_viewer_activity_after_failure_changes_nothing() -> None:
    new = POLICY.on_viewer_activity(
        now=T0 + s(1),
        current=T0 + s(5),
        vm_state=VmState.DRAINING,
        vm_created_at=T0,
        session_status=SessionStatus.FAILED,
        completed_at=None,
    )
    assert new == T0 + s(5)


durations = st.builds(
    Durations,
    grace_success=st.integers(0, 120).map(s),
    grace_failure=st.integers(0, 30).map(s),
    max_drain=st.integers(0, 300).map(s),
    login_timeout=st.integers(1, 900).map(s),
    max_session=st.integers(1, 3600).map(s),
    idle_extension=st.integers(0, 300).map(s),
)
events = st.lists(
    st.tuples(st.sampled_from(["viewer", "complete_capture"]), st.integers(0, 200)),
    max_size=40,
)


@given(durations, events)
def test_deadlines_respect_caps_and_never_move_earlier_on_activity(
    d: Durations, evs: list[tuple[str, int]]
) -> None:
    """Invariant 1 at the domain level: a viewer's activity only ever pushes the
    deadline later, within ``max_session`` (login) or ``max_drain`` (after success); the
    one event that may bring it closer is the capture itself, and that one lands at
    ``completed_at + min(grace_success, max_drain)``, never before ``completed_at``."""
    policy = DeadlinePolicy(d)
    now = T0
    status = SessionStatus.AWAITING_USER
    state = VmState.RUNNING
    deadline: datetime | None = policy.on_created(T0)
    completed_at: datetime | None = None
    for kind, dt in evs:
        now += s(dt)
        if policy.is_due(deadline, now):
            break  # the scheduler destroys it here; nothing after matters
        if kind == "viewer":
            new = policy.on_viewer_activity(
                now=now,
                current=deadline,
                vm_state=state,
                vm_created_at=T0,
                session_status=status,
                completed_at=completed_at,
            )
            assert deadline is not None and new is not None
            assert new >= deadline
            if status is SessionStatus.COMPLETED:
                assert completed_at is not None
                assert new <= max(deadline, completed_at + d.max_drain)
            else:
                assert new <= max(deadline, T0 + d.max_session)
            deadline = new
        elif status is SessionStatus.AWAITING_USER:
            plan = policy.on_completed(now)
            status, state, completed_at, deadline = (
                SessionStatus.COMPLETED,
                plan.state,
                now,
                plan.destroy_after,
            )
            assert deadline is not None and deadline >= now
            assert deadline <= now + d.max_drain
