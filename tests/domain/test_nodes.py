"""``domain.nodes``: a node's state from its heartbeat, and where a new VM goes."""

from __future__ import annotations

import random
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest

from airlock.domain.nodes import (
    Candidate,
    NodeState,
    NodeTimes,
    choose,
    effective_state,
    is_given_up,
)

NOW = datetime(2026, 12, 1, 23, 0, tzinfo=UTC)
TIMES = NodeTimes(timedelta(seconds=2), timedelta(seconds=15), timedelta(minutes=5))


def test_down_after_the_lease_whatever_the_intent() -> None:
    fresh, stale = NOW - timedelta(seconds=15), NOW - timedelta(seconds=16)
    assert effective_state("active", fresh, now=NOW, lease=TIMES.lease) is NodeState.ACTIVE
    assert effective_state("draining", fresh, now=NOW, lease=TIMES.lease) is NodeState.DRAINING
    assert effective_state("active", stale, now=NOW, lease=TIMES.lease) is NodeState.DOWN
    assert effective_state("draining", stale, now=NOW, lease=TIMES.lease) is NodeState.DOWN


def test_given_up_only_past_lease_and_grace() -> None:
    edge = NOW - TIMES.lease - TIMES.grace
    assert not is_given_up(edge, now=NOW, times=TIMES)
    assert is_given_up(edge - timedelta(milliseconds=1), now=NOW, times=TIMES)


def test_a_lease_no_longer_than_the_heartbeat_is_refused() -> None:
    with pytest.raises(ValueError):
        NodeTimes(timedelta(seconds=2), timedelta(seconds=2), timedelta(0))


def test_warm_first_then_the_freer_of_k_random_nodes() -> None:
    rng = random.Random(7)
    nodes = [Candidate("a", 5), Candidate("b", 1, warm=1), Candidate("c", 9)]
    assert choose(nodes, k=2, rng=rng, exclude=frozenset()) == nodes[1]
    assert choose(nodes, k=3, rng=rng, exclude=frozenset({"b"})) == nodes[2]  # all drawn
    full = [Candidate("a", 0), Candidate("b", -1)]
    assert choose(full, k=2, rng=rng, exclude=frozenset()) is None
    assert choose(nodes, k=2, rng=rng, exclude=frozenset({"a", "b", "c"})) is None


def test_best_of_two_spreads_and_never_picks_the_fullest_of_the_two() -> None:
    rng = random.Random(1)
    nodes = [Candidate(name, free) for name, free in (("a", 10), ("b", 10), ("c", 1))]
    picks = Counter(choose(nodes, k=2, rng=rng, exclude=frozenset()).name for _ in range(3000))  # type: ignore[union-attr]
    # c wins only when drawn against itself, which sample() never does: never.
    assert picks["c"] == 0
    assert picks["a"] > 1200 and picks["b"] > 1200  # a tie is broken at random
