"""Nodes of a cluster: their state as read from a heartbeat, and where a new VM goes.

A node's row holds the operator's intent (``active`` or ``draining``) and a heartbeat. What
placement and the operator see is the *effective* state: ``down`` once the heartbeat is
older than the lease, whatever the intent; ``lost`` past the longer grace, when its VMs are
given up (E2B waits five minutes before it acts on a node that stopped answering: never
destructive on missing data). Pure: time comes in as an argument.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum


class NodeState(StrEnum):
    ACTIVE = "active"
    DRAINING = "draining"
    DOWN = "down"


INTENTS = frozenset({NodeState.ACTIVE, NodeState.DRAINING})  # what an operator may set


@dataclass(frozen=True, slots=True)
class NodeTimes:
    """``lease``: a heartbeat older than this makes the node ``down``. ``grace``: down for
    this long (heartbeat older than lease + grace), its live VMs are marked ``lost``."""

    heartbeat: timedelta
    lease: timedelta
    grace: timedelta

    def __post_init__(self) -> None:
        if self.lease <= self.heartbeat:
            raise ValueError("the node lease must be longer than the heartbeat interval")


def effective_state(
    intent: str, heartbeat_at: datetime, *, now: datetime, lease: timedelta
) -> NodeState:
    """``down`` when the heartbeat is older than the lease, else the operator's intent."""
    if now - heartbeat_at > lease:
        return NodeState.DOWN
    return NodeState(intent)


def is_given_up(heartbeat_at: datetime, *, now: datetime, times: NodeTimes) -> bool:
    """Whether a silent node has been down past the grace: its VMs are ``lost``."""
    return now - heartbeat_at > times.lease + times.grace


@dataclass(frozen=True, slots=True)
class Candidate:
    """A node placement may choose: its free slots for the role asked for, and whether it
    holds a warm VM ready to hand out."""

    name: str
    free: int
    warm: int = 0


def choose(
    candidates: Sequence[Candidate], *, k: int, rng: random.Random, exclude: frozenset[str]
) -> Candidate | None:
    """Where a new VM goes: a node with a warm VM first (the one with most of them); else
    the best of ``k`` nodes drawn at random among those with a free slot (the
    "power of k choices" E2B's placement uses: nearly as even as asking every node, without
    every controller piling onto the one emptiest node at the same moment). ``exclude``:
    nodes that already handed this VM back. None: no node can take it."""
    usable = [c for c in candidates if c.name not in exclude and c.free > 0]
    if not usable:
        return None
    warm = [c for c in usable if c.warm > 0]
    if warm:
        return max(warm, key=lambda c: (c.warm, c.free, c.name))
    drawn = rng.sample(usable, min(k, len(usable)))
    return max(drawn, key=lambda c: c.free)  # a tie goes to the first drawn: at random
