"""The reconcile decision: never destroys a live row's VM, never acts without a listing,
and makes vanishing loud."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from airlock.domain.reconcile import Action, ActionKind, RecordedVm, decide
from airlock.domain.vms import VmState

T0 = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
BOOT = timedelta(seconds=60)


def row(vm_id: str, state: VmState, *, due_in: float | None = 60, age: float = 10) -> RecordedVm:
    return RecordedVm(
        vm_id,
        state,
        None if due_in is None else T0 + timedelta(seconds=due_in),
        T0 - timedelta(seconds=age),
        T0 - timedelta(seconds=age),
    )


def run(observed: list[str] | None, rows: list[RecordedVm]) -> list[Action]:
    return decide(
        observed=observed,
        observed_at=T0,
        recorded={r.vm_id: r for r in rows},
        now=T0,
        boot_timeout=BOOT,
    )


def test_the_table_of_lifecycle_md() -> None:
    actions = run(
        ["vm-adopt", "vm-orphan", "vm-dead-row"],
        [
            row("vm-adopt", VmState.RUNNING),
            row("vm-dead-row", VmState.DESTROYED),
            row("vm-lost", VmState.RUNNING, due_in=60),
            row("vm-due", VmState.DRAINING, due_in=-1),
            row("vm-destroying", VmState.DESTROYING, due_in=-1),
        ],
    )
    kinds = {(a.kind, a.vm_id) for a in actions}
    assert kinds == {
        (ActionKind.DESTROY_ORPHAN, "vm-orphan"),
        (ActionKind.DESTROY_ORPHAN, "vm-dead-row"),
        (ActionKind.MARK_LOST, "vm-lost"),
        (ActionKind.MARK_DESTROYED, "vm-due"),
        (ActionKind.MARK_DESTROYED, "vm-destroying"),
    }


def test_cannot_list_means_do_nothing() -> None:
    assert run(None, [row("vm-a", VmState.RUNNING)]) == []


def test_creating_vm_gets_its_boot_time() -> None:
    assert run([], [row("vm-new", VmState.CREATING, age=5)]) == []
    [action] = run([], [row("vm-stuck", VmState.CREATING, age=61)])
    assert action.kind is ActionKind.MARK_BOOT_FAILED


def test_rows_changed_after_the_listing_wait_for_the_next_round() -> None:
    fresh = RecordedVm("vm-b", VmState.RUNNING, T0 + timedelta(seconds=60), T0, T0)
    assert run([], [fresh]) == []  # went running after the runtime was listed


def test_retained_without_deadline_that_vanished_is_lost() -> None:
    [action] = run([], [row("vm-r", VmState.RETAINED, due_in=None)])
    assert action.kind is ActionKind.MARK_LOST


vm_ids = st.sampled_from([f"vm-{i}" for i in range(8)])
states = st.sampled_from(list(VmState))


@given(
    st.lists(vm_ids, unique=True),
    st.dictionaries(vm_ids, st.tuples(states, st.integers(-100, 100), st.integers(0, 200))),
)
def test_never_destroys_a_live_row_and_judges_each_vm_once(
    observed: list[str], rows: dict[str, tuple[VmState, int, int]]
) -> None:
    recorded = [row(i, st_, due_in=due, age=age) for i, (st_, due, age) in rows.items()]
    actions = run(observed, recorded)
    by_id = {r.vm_id: r for r in recorded}
    assert len({a.vm_id for a in actions}) == len(actions)
    for a in actions:
        r = by_id.get(a.vm_id)
        if a.kind is ActionKind.DESTROY_ORPHAN:
            assert a.vm_id in observed
            assert r is None or r.state.terminal  # invariant 2 without touching live VMs
        else:
            assert a.vm_id not in observed
            assert r is not None and r.state.live
        if a.kind is ActionKind.MARK_LOST:
            # invariant 5: only a VM that should be alive is declared lost
            assert r is not None and r.state is not VmState.DESTROYING
            assert r.destroy_after is None or r.destroy_after > T0
    # invariant 2: every observed VM without a live row is reaped (a row that changed
    # after the listing is judged next round)
    for vm_id in observed:
        r = by_id.get(vm_id)
        if r is None or (r.state.terminal and r.updated_at < T0):
            assert any(a.vm_id == vm_id and a.kind is ActionKind.DESTROY_ORPHAN for a in actions)


def leased(
    vm_id: str, state: VmState, *, lease_in: float | None, due_in: float | None = 600
) -> RecordedVm:
    base = row(vm_id, state, due_in=due_in, age=120)
    lease = None if lease_in is None else T0 + timedelta(seconds=lease_in)
    return RecordedVm(
        base.vm_id, base.state, base.destroy_after, base.created_at, base.updated_at, lease
    )


def test_gone_after_its_lease_ran_out_is_lease_expired_not_lost() -> None:
    actions = run(
        [],
        [
            leased("vm-ended", VmState.RUNNING, lease_in=-1),
            leased("vm-ended-draining", VmState.DRAINING, lease_in=0),
            leased("vm-ended-retained", VmState.RETAINED, lease_in=-30, due_in=None),
            leased("vm-ended-warm-or-due", VmState.RUNNING, lease_in=-5, due_in=-1),
        ],
    )
    assert {(a.kind, a.vm_id) for a in actions} == {
        (ActionKind.MARK_LEASE_EXPIRED, "vm-ended"),
        (ActionKind.MARK_LEASE_EXPIRED, "vm-ended-draining"),
        (ActionKind.MARK_LEASE_EXPIRED, "vm-ended-retained"),
        (ActionKind.MARK_LEASE_EXPIRED, "vm-ended-warm-or-due"),
    }


def test_gone_before_its_lease_ran_out_is_still_lost() -> None:
    # Invariant 5: a leased VM that vanished while its lease still held did not end itself.
    [action] = run([], [leased("vm-crashed", VmState.RUNNING, lease_in=1)])
    assert action.kind is ActionKind.MARK_LOST
    [action] = run([], [leased("vm-cli", VmState.RUNNING, lease_in=None)])
    assert action.kind is ActionKind.MARK_LOST  # no lease: a CLI VM that vanished


def test_a_running_vm_past_its_lease_is_adopted_and_destroying_stays_destroyed() -> None:
    # Still listed (within its margin, or the lease row lags): adopt it, the next renewal
    # extends it. A VM being destroyed was going anyway: plain destroyed.
    assert run(["vm-late"], [leased("vm-late", VmState.RUNNING, lease_in=-3)]) == []
    [action] = run([], [leased("vm-d", VmState.DESTROYING, lease_in=-3)])
    assert action.kind is ActionKind.MARK_DESTROYED


def test_a_creating_vm_is_judged_on_its_boot_time_first() -> None:
    # A create in flight may not be listed: a passed lease alone says nothing of it...
    young = leased("vm-young", VmState.CREATING, lease_in=-1)
    young = RecordedVm(
        young.vm_id,
        young.state,
        None,
        T0 - timedelta(seconds=5),
        T0 - timedelta(seconds=5),
        young.lease_until,
    )
    assert run([], [young]) == []
    # ...past its boot time, it ended itself if its lease ran out, else it never came up.
    [action] = run([], [leased("vm-ended", VmState.CREATING, lease_in=-1)])
    assert action.kind is ActionKind.MARK_LEASE_EXPIRED
    [action] = run([], [leased("vm-stuck", VmState.CREATING, lease_in=30)])
    assert action.kind is ActionKind.MARK_BOOT_FAILED


@given(
    st.lists(vm_ids, unique=True),
    st.dictionaries(
        vm_ids,
        st.tuples(states, st.integers(-100, 100), st.none() | st.integers(-100, 100)),
    ),
)
def test_lease_expired_only_after_the_lease_and_lost_only_before(
    observed: list[str], rows: dict[str, tuple[VmState, int, int | None]]
) -> None:
    recorded = [leased(i, s, lease_in=lease, due_in=due) for i, (s, due, lease) in rows.items()]
    by_id = {r.vm_id: r for r in recorded}
    for a in run(observed, recorded):
        r = by_id.get(a.vm_id)
        if a.kind is ActionKind.MARK_LEASE_EXPIRED:
            assert r is not None and r.lease_until is not None and r.lease_until <= T0
            assert a.vm_id not in observed and r.state.live
        if a.kind is ActionKind.MARK_LOST:
            assert r is not None and (r.lease_until is None or r.lease_until > T0)
