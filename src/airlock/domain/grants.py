"""A login (grant): one account of one provider, with exactly one holder.

The vendors rotate single-use refresh tokens: whoever refreshes first kills every other copy.
So a captured login lives in exactly one place that may refresh it, a CLI VM (its
``holder``) or nobody (the vault, ``holder = None``). The vault keeps every version the
controller read back from the holder (``VersionSource``): the capture, each sync back, each
move; superseded versions keep their metadata for audit, their secrets are wiped after a
retention.

Pure: the states, the version sources, how an account is named, which vault context seals a
version, and the decisions of a move and of a sync. No I/O; time is an argument.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any


class GrantState(StrEnum):
    """How a login is doing (its health; decided by the health checks)."""

    ACTIVE = "active"
    EXPIRING = "expiring"  # the refresh token nears its end
    EXPIRED = "expired"
    REVOKED = "revoked"  # the CLI or the token endpoint said so
    NEEDS_LOGIN = "needs_login"


class VersionSource(StrEnum):
    """Where a sealed version of a login's files came from."""

    CAPTURE = "capture"  # the browser VM's capture (the login itself)
    SYNC = "sync"  # read back from the holder because the CLI had refreshed them
    MOVE = "move"  # read back from the old holder while moving the login


class MoveOutcome(StrEnum):
    """What a move did, as its event's cause says."""

    MOVED = "moved"  # from one VM into another
    INJECTED = "injected"  # from the vault into a VM
    ALREADY_THERE = "already_there"  # the target already holds it: files re-written in place


def account_key(account: Mapping[str, Any] | None) -> str:
    """The name of the account a login is of: its email, else its id, else "" (a provider
    that does not say; then a user has one login of that provider)."""
    if not account:
        return ""
    for key in ("email", "id"):
        value = account.get(key)
        if isinstance(value, str) and value.strip():
            return value.strip().lower()[:255]
    return ""


def version_context(
    *, grant_id: str, version: int, provider: str, source: str, session_id: str | None
) -> str:
    """The vault's associated data for one version: a sealed blob copied to another row
    does not open. A capture keeps the context its credentials row was sealed under
    (``{session}:{provider}``), so that the rows migrated from before grants open as they
    are; every later version is bound to its grant and number."""
    if source == VersionSource.CAPTURE.value and session_id:
        return f"{session_id}:{provider}"
    return f"grant:{grant_id}:{version}:{provider}"


@dataclass(frozen=True, slots=True)
class MovePlan:
    """What a move must do before the login lands in ``target``."""

    take_from: str | None  # the VM whose files are read back and removed first; None: vault
    same_vm: bool  # the target already holds the login (taken back and written again)


def plan_move(*, holder: str | None, target: str) -> MovePlan:
    """Inject into ``target``: take the files back from the current holder first, unless it
    is the vault. The target itself too, when it holds the login: rewriting its files while
    its CLI may be refreshing them could put back a token the refresh just rotated."""
    if holder is None:
        return MovePlan(take_from=None, same_vm=False)
    return MovePlan(take_from=holder, same_vm=holder == target)


def changed(stored: Mapping[str, bytes], read: Mapping[str, bytes]) -> bool:
    """Whether the files read back from a holder differ from the vault's newest version
    (the CLI refreshed them). A file the holder no longer has is kept from the vault: a CLI
    does not delete its login when it refreshes."""
    return any(stored.get(path) != content for path, content in read.items())


def merge_files(stored: Mapping[str, bytes], read: Mapping[str, bytes]) -> dict[str, bytes]:
    """The new version: what was read back, over the files the vault had."""
    return {**stored, **read}


def lease_free(lease_until: datetime | None, now: datetime) -> bool:
    """Whether nobody is moving the login right now (no lease, or one that ran out)."""
    return lease_until is None or lease_until <= now


def wipe_due(superseded_at: datetime | None, now: datetime, retention: timedelta) -> bool:
    """Whether a superseded version's secret has been kept for audit long enough."""
    return superseded_at is not None and superseded_at + retention <= now
