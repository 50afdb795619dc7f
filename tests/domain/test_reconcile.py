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
