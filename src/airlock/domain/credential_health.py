"""A login's health: one pure decision from what is known of it and the time.

A login (a grant) is one account's sign-in with one provider. Its state:

- ``active``: usable, and nothing ends soon;
- ``expiring``: it still works, but what keeps it alive ends within the warning window: the
  refresh token (or, with none, the access token) nears its end; a person should log in
  again before then;
- ``expired``: that end has passed;
- ``revoked``: the token endpoint or the CLI said the login is no longer valid (a refresh
  token reused or revoked, "sign out everywhere"). It stays revoked: a revoked refresh
  token never comes back, only a new login replaces it;
- ``needs_login``: there is nothing to use: the holder has no login files (the CLI says it
  is logged out), or the vault holds no secret of it.

The inputs are facts the controller gathered (expiries from the files, when a refresh was
last seen, the last check's result); ``now`` is passed in. No I/O here.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from airlock.domain.grants import GrantState

ATTENTION = frozenset(
    {GrantState.EXPIRING, GrantState.EXPIRED, GrantState.REVOKED, GrantState.NEEDS_LOGIN}
)  # a person has to act (log in again) now or soon


class CheckResult(StrEnum):
    """What one scheduled check of a login found."""

    OK = "ok"  # the CLI or the token endpoint accepts it
    REVOKED = "revoked"  # the token endpoint or the CLI says it is revoked or unknown
    LOGGED_OUT = "logged_out"  # the holder has no login files, or the CLI says logged out
    UNKNOWN = "unknown"  # could not tell: the VM or the endpoint did not answer


@dataclass(frozen=True, slots=True)
class HealthFacts:
    access_expires_at: datetime | None
    refresh_expires_at: datetime | None
    has_refresh_token: bool
    last_refresh_seen_at: datetime | None = None
    previous: GrantState | None = None  # the state recorded before this decision
    check: CheckResult | None = None  # a check that just ran; None: only time passed
    has_secret: bool = True  # False: the vault holds nothing of it (wiped, superseded)


def decide(
    facts: HealthFacts,
    *,
    now: datetime,
    expiring_within: timedelta,
    refresh_lifetime: timedelta | None = None,
) -> GrantState:
    """The login's state now. ``refresh_lifetime``: how long a refresh token lives after its
    last refresh where the files do not say (None: unknown, never guessed)."""
    if not facts.has_secret:
        return GrantState.NEEDS_LOGIN
    if facts.check is CheckResult.REVOKED:
        return GrantState.REVOKED
    if facts.check is CheckResult.LOGGED_OUT:
        return GrantState.NEEDS_LOGIN
    if facts.previous is GrantState.REVOKED:
        return GrantState.REVOKED  # an OK from a stale cache does not bring it back
    if facts.previous is GrantState.NEEDS_LOGIN and facts.check is not CheckResult.OK:
        return GrantState.NEEDS_LOGIN
    end = _end(facts, refresh_lifetime)
    if end is None:
        return GrantState.ACTIVE
    if end <= now:
        return GrantState.EXPIRED
    if end - now <= expiring_within:
        return GrantState.EXPIRING
    return GrantState.ACTIVE


def _end(facts: HealthFacts, refresh_lifetime: timedelta | None) -> datetime | None:
    """When the login stops working unless a person logs in again."""
    if not facts.has_refresh_token:
        return facts.access_expires_at
    if facts.refresh_expires_at is not None:
        return facts.refresh_expires_at
    if refresh_lifetime is not None and facts.last_refresh_seen_at is not None:
        return facts.last_refresh_seen_at + refresh_lifetime
    return None


def needs_attention(old: GrantState | None, new: GrantState) -> bool:
    """Whether a change of state is one to tell a person about (audit + SSE)."""
    return new is not old and new in ATTENTION
