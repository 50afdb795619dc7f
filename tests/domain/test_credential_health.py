"""The health decision, case by case, with the time passed in."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from airlock.domain.credential_health import CheckResult, HealthFacts, decide, needs_attention
from airlock.domain.grants import GrantState

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
DAY = timedelta(days=1)
WEEK = timedelta(days=7)


def state(**facts: object) -> GrantState:
    defaults: dict[str, object] = {
        "access_expires_at": NOW + timedelta(hours=1),
        "refresh_expires_at": NOW + 30 * DAY,
        "has_refresh_token": True,
    }
    defaults.update(facts)
    return decide(HealthFacts(**defaults), now=NOW, expiring_within=WEEK)  # type: ignore[arg-type]


def test_a_fresh_login_is_active_even_with_its_access_token_expired() -> None:
    assert state() is GrantState.ACTIVE
    # The access token ended: the CLI refreshes it, nothing for a person to do.
    assert state(access_expires_at=NOW - DAY) is GrantState.ACTIVE


def test_the_refresh_token_nearing_its_end_is_expiring_then_expired() -> None:
    assert state(refresh_expires_at=NOW + WEEK + timedelta(seconds=1)) is GrantState.ACTIVE
    assert state(refresh_expires_at=NOW + WEEK) is GrantState.EXPIRING
    assert state(refresh_expires_at=NOW + timedelta(seconds=1)) is GrantState.EXPIRING
    assert state(refresh_expires_at=NOW) is GrantState.EXPIRED
    assert state(refresh_expires_at=NOW - DAY) is GrantState.EXPIRED


def test_without_a_refresh_token_the_access_token_is_the_end() -> None:
    facts = {"has_refresh_token": False, "refresh_expires_at": None}
    assert state(access_expires_at=NOW + 30 * DAY, **facts) is GrantState.ACTIVE
    assert state(access_expires_at=NOW + DAY, **facts) is GrantState.EXPIRING
    assert state(access_expires_at=NOW - DAY, **facts) is GrantState.EXPIRED
    assert state(access_expires_at=None, **facts) is GrantState.ACTIVE  # an API key: no end


def test_an_unstated_refresh_expiry_is_estimated_only_from_a_known_lifetime() -> None:
    facts = HealthFacts(
        access_expires_at=NOW - DAY,
        refresh_expires_at=None,
        has_refresh_token=True,
        last_refresh_seen_at=NOW - 25 * DAY,
    )
    assert decide(facts, now=NOW, expiring_within=WEEK) is GrantState.ACTIVE
    got = decide(facts, now=NOW, expiring_within=WEEK, refresh_lifetime=30 * DAY)
    assert got is GrantState.EXPIRING
    got = decide(facts, now=NOW, expiring_within=WEEK, refresh_lifetime=20 * DAY)
    assert got is GrantState.EXPIRED


def test_what_a_check_says_wins_over_the_expiries() -> None:
    assert state(check=CheckResult.REVOKED) is GrantState.REVOKED
    assert state(check=CheckResult.LOGGED_OUT) is GrantState.NEEDS_LOGIN
    assert state(check=CheckResult.OK) is GrantState.ACTIVE
    assert state(check=CheckResult.UNKNOWN) is GrantState.ACTIVE
    assert state(has_secret=False, check=CheckResult.OK) is GrantState.NEEDS_LOGIN


@pytest.mark.parametrize("check", [None, CheckResult.OK, CheckResult.UNKNOWN])
def test_revoked_stays_revoked(check: CheckResult | None) -> None:
    assert state(previous=GrantState.REVOKED, check=check) is GrantState.REVOKED


def test_needs_login_ends_only_when_a_check_finds_the_login_again() -> None:
    assert state(previous=GrantState.NEEDS_LOGIN) is GrantState.NEEDS_LOGIN
    assert state(previous=GrantState.NEEDS_LOGIN, check=CheckResult.UNKNOWN) is (
        GrantState.NEEDS_LOGIN
    )
    assert state(previous=GrantState.NEEDS_LOGIN, check=CheckResult.OK) is GrantState.ACTIVE


def test_expiring_and_expired_follow_time_without_a_check() -> None:
    facts = HealthFacts(
        access_expires_at=None,
        refresh_expires_at=NOW + 2 * DAY,
        has_refresh_token=True,
        previous=GrantState.ACTIVE,
    )
    assert decide(facts, now=NOW - 7 * DAY, expiring_within=WEEK) is GrantState.ACTIVE
    assert decide(facts, now=NOW, expiring_within=WEEK) is GrantState.EXPIRING
    assert decide(facts, now=NOW + 3 * DAY, expiring_within=WEEK) is GrantState.EXPIRED


def test_attention_is_a_change_into_a_state_a_person_must_act_on() -> None:
    assert needs_attention(GrantState.ACTIVE, GrantState.REVOKED)
    assert needs_attention(None, GrantState.EXPIRING)
    assert needs_attention(GrantState.EXPIRING, GrantState.EXPIRED)
    assert not needs_attention(GrantState.REVOKED, GrantState.REVOKED)
    assert not needs_attention(GrantState.REVOKED, GrantState.ACTIVE)
    assert not needs_attention(None, GrantState.ACTIVE)
