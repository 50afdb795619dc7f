"""``domain.sessions.start_paths``: which way a login gets its VM, given the quota's
verdict and whether there is a warm pool."""

from __future__ import annotations

import pytest

from airlock.domain.quotas import Refusal, Scope
from airlock.domain.sessions import StartPath, start_paths

USER_FULL = Refusal(Scope.USER, "too_many_sessions", "you have 3 logins open", 60)
NODE_FULL = Refusal(Scope.NODE, "node_full", "this host is full", 30)


@pytest.mark.parametrize("pool", [True, False])
def test_a_user_over_their_own_limits_gets_no_vm_at_all(pool: bool) -> None:
    assert start_paths(USER_FULL, pool=pool) == ()


def test_without_a_refusal_warm_first_then_cold() -> None:
    assert start_paths(None, pool=True) == (StartPath.WARM, StartPath.COLD)
    assert start_paths(None, pool=False) == (StartPath.COLD,)


def test_a_full_node_still_hands_out_its_warm_vms_but_boots_nothing() -> None:
    assert start_paths(NODE_FULL, pool=True) == (StartPath.WARM,)
    assert start_paths(NODE_FULL, pool=False) == ()
