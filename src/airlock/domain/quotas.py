"""Quotas: may this user start one more login or CLI VM, and may this node run one more VM?

Counts in, a verdict out. The services count (under a lock that makes count-then-insert one
step: ``Repo.lock_quota``) and ask ``decide``; nothing here reads a clock or a database.

Per user, across every node: live login sessions, live CLI VMs, and starts (logins and CLI
VMs) in the last minute. A service token acting for a user counts against that user, since
the counts are by user. Per node: every live browser VM counts, draining, retained and
destroying ones included (they hold a display, a browser and memory until they are gone),
and CLI VMs have a cap of their own. A per-user limit is the caller's to fix (HTTP 429); a
full node is not (HTTP 503). Each refusal says when to retry and what a person can do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

START_WINDOW = timedelta(minutes=1)
# A CLI VM never ends by itself, and a full node frees a slot when some login ends: no
# moment can be promised, so these are how soon asking again is reasonable.
RETRY_CLI_VM_S = 60
RETRY_NODE_S = 30
MAX_RETRY_S = 3600


class StartKind(StrEnum):
    LOGIN = "login"  # POST /api/auth/start: a session and its browser VM
    CLI_VM = "cli_vm"  # POST /api/vms


class Scope(StrEnum):
    USER = "user"  # HTTP 429: this user's own limit
    NODE = "node"  # HTTP 503: this host is full


@dataclass(frozen=True, slots=True)
class Limits:
    user_sessions: int
    user_cli_vms: int
    user_starts_per_minute: int
    node_browser_vms: int
    node_cli_vms: int


@dataclass(frozen=True, slots=True)
class Usage:
    """What the database holds right now, for one user and this node.

    ``live_session_deadlines``: when each of the user's live sessions ends at the latest
    (its login deadline); ``recent_starts``: when each of the user's starts in the last
    minute happened; ``node_browser_deadlines``: the deadlines of this node's live browser
    VMs that have one (a VM a viewer holds may have none)."""

    live_session_deadlines: tuple[datetime, ...]
    user_cli_vms: int
    recent_starts: tuple[datetime, ...]
    node_browser_vms: int
    node_browser_deadlines: tuple[datetime, ...]
    node_cli_vms: int


@dataclass(frozen=True, slots=True)
class Refusal:
    scope: Scope
    code: str
    message: str
    retry_after_s: int


def _seconds(until: datetime, now: datetime) -> int:
    """Whole seconds from ``now`` to ``until``, at least 1, at most an hour."""
    return max(1, min(MAX_RETRY_S, math.ceil((until - now).total_seconds())))


def decide(kind: StartKind, usage: Usage, limits: Limits, now: datetime) -> Refusal | None:
    """``None`` when the start may go ahead, else why not. The user's own limits are
    checked first: a user over them is told so even when the node is full too."""
    recent = sorted(t for t in usage.recent_starts if t > now - START_WINDOW)
    if len(recent) >= limits.user_starts_per_minute:
        # The window frees a start when its oldest one leaves it.
        oldest_needed = recent[len(recent) - limits.user_starts_per_minute]
        return Refusal(
            Scope.USER,
            "rate_limited",
            f"too many starts: {len(recent)} in the last minute "
            f"(limit {limits.user_starts_per_minute} a minute); wait and retry",
            _seconds(oldest_needed + START_WINDOW, now),
        )
    if kind is StartKind.LOGIN:
        live = sorted(usage.live_session_deadlines)
        if len(live) >= limits.user_sessions:
            return Refusal(
                Scope.USER,
                "too_many_sessions",
                f"you have {len(live)} logins in progress (limit {limits.user_sessions}): "
                "finish or cancel one (DELETE /api/auth/session/{sessionId}), then retry",
                _seconds(live[len(live) - limits.user_sessions], now),
            )
        if usage.node_browser_vms >= limits.node_browser_vms:
            soonest = min(usage.node_browser_deadlines, default=None)
            return Refusal(
                Scope.NODE,
                "at_capacity",
                f"this controller runs {usage.node_browser_vms} browser VMs, its limit "
                f"({limits.node_browser_vms}); retry in a moment",
                _seconds(soonest, now) if soonest is not None else RETRY_NODE_S,
            )
        return None
    if usage.user_cli_vms >= limits.user_cli_vms:
        return Refusal(
            Scope.USER,
            "too_many_cli_vms",
            f"you have {usage.user_cli_vms} CLI VMs (limit {limits.user_cli_vms}): "
            "delete one you no longer use (DELETE /api/vms/{vmId}), then retry",
            RETRY_CLI_VM_S,
        )
    if usage.node_cli_vms >= limits.node_cli_vms:
        return Refusal(
            Scope.NODE,
            "at_capacity",
            f"this controller runs {usage.node_cli_vms} CLI VMs, its limit "
            f"({limits.node_cli_vms}); retry later",
            RETRY_NODE_S,
        )
    return None
