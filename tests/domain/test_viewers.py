"""Viewer presence, decided (``domain.viewers``): which VM states a person may still look at,
how an open viewer socket closes for every other one, and how often it keeps the VM alive."""

from __future__ import annotations

from datetime import timedelta

import pytest

from airlock.domain.viewers import (
    CLOSE_VM_DESTROYED,
    CLOSE_VM_LOST,
    CLOSE_VM_NOT_VIEWABLE,
    MAX_KEEPALIVE_INTERVAL_S,
    MIN_KEEPALIVE_INTERVAL_S,
    VIEWABLE,
    keepalive_interval,
    viewer_end,
)
from airlock.domain.vms import VmState


@pytest.mark.parametrize("state", list(VmState))
def test_every_state_is_viewable_or_closes_with_a_code(state: VmState) -> None:
    end = viewer_end(state)
    if state in (VmState.CREATING, VmState.RUNNING, VmState.DRAINING):
        assert end is None and state in VIEWABLE
        return
    assert end is not None and state not in VIEWABLE
    code, reason = end
    if state in (VmState.DESTROYING, VmState.DESTROYED):
        assert (code, reason) == (CLOSE_VM_DESTROYED, "vm destroyed")
    elif state == VmState.LOST:
        assert (code, reason) == (CLOSE_VM_LOST, "vm lost")
    else:
        assert (code, reason) == (CLOSE_VM_NOT_VIEWABLE, f"vm {state.value}")


def test_a_vm_that_is_gone_reads_as_destroyed() -> None:
    assert viewer_end(None) == (CLOSE_VM_DESTROYED, "vm destroyed")


@pytest.mark.parametrize(
    ("grace_s", "idle_s", "expected"),
    [
        (30, 300, 5.0),  # the defaults: at most every few seconds
        (3, 300, 1.0),  # a short grace period: a third of it
        (300, 6, 2.0),  # a short idle extension: a third of that
        (0.01, 300, MIN_KEEPALIVE_INTERVAL_S),  # never per message
    ],
)
def test_keepalives_come_well_within_the_shortest_deadline(
    grace_s: float, idle_s: float, expected: float
) -> None:
    interval = keepalive_interval(timedelta(seconds=grace_s), timedelta(seconds=idle_s))
    assert interval == pytest.approx(expected)
    assert MIN_KEEPALIVE_INTERVAL_S <= interval <= MAX_KEEPALIVE_INTERVAL_S
