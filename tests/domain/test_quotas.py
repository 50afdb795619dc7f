"""``domain.quotas.decide``: counts in, verdict out, time given."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from airlock.domain.quotas import Limits, Scope, StartKind, Usage, decide

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
LIMITS = Limits(
    user_sessions=3,
    user_cli_vms=5,
    user_starts_per_minute=10,
    node_browser_vms=4,
    node_cli_vms=2,
)


def usage(**values: object) -> Usage:
    base: dict[str, object] = {
        "live_session_deadlines": (),
        "user_cli_vms": 0,
        "recent_starts": (),
        "node_browser_vms": 0,
        "node_browser_deadlines": (),
        "node_cli_vms": 0,
    }
    return Usage(**{**base, **values})  # type: ignore[arg-type]


def test_under_every_limit_goes_ahead() -> None:
    assert decide(StartKind.LOGIN, usage(), LIMITS, NOW) is None
    assert decide(StartKind.CLI_VM, usage(), LIMITS, NOW) is None


def test_sessions_retry_when_the_oldest_login_deadline_passes() -> None:
    deadlines = tuple(NOW + timedelta(seconds=s) for s in (300, 90.5, 500))
    refusal = decide(StartKind.LOGIN, usage(live_session_deadlines=deadlines), LIMITS, NOW)
    assert refusal is not None
    assert (refusal.scope, refusal.code, refusal.retry_after_s) == (
        Scope.USER,
        "too_many_sessions",
        91,
    )
    # Sessions do not limit CLI VMs.
    assert decide(StartKind.CLI_VM, usage(live_session_deadlines=deadlines), LIMITS, NOW) is None


def test_starts_per_minute_retry_when_the_window_frees_one() -> None:
    starts = tuple(NOW - timedelta(seconds=s) for s in range(50, 40, -1))  # 10 starts
    refusal = decide(StartKind.CLI_VM, usage(recent_starts=starts), LIMITS, NOW)
    assert refusal is not None
    assert (refusal.scope, refusal.code) == (Scope.USER, "rate_limited")
    assert refusal.retry_after_s == 10  # the start 50 s ago leaves the window in 10 s
    old = (*starts[1:], NOW - timedelta(seconds=61))  # one is older than the window
    assert decide(StartKind.CLI_VM, usage(recent_starts=old), LIMITS, NOW) is None


def test_a_full_node_is_503_and_the_users_own_limit_is_said_first() -> None:
    full = usage(node_browser_vms=4, node_browser_deadlines=(NOW + timedelta(seconds=7),))
    refusal = decide(StartKind.LOGIN, full, LIMITS, NOW)
    assert refusal is not None
    assert (refusal.scope, refusal.code, refusal.retry_after_s) == (Scope.NODE, "at_capacity", 7)
    no_deadline = usage(node_browser_vms=4)
    refusal = decide(StartKind.LOGIN, no_deadline, LIMITS, NOW)
    assert refusal is not None and refusal.retry_after_s >= 1
    both = usage(node_browser_vms=9, live_session_deadlines=(NOW,) * 3, node_browser_deadlines=())
    refusal = decide(StartKind.LOGIN, both, LIMITS, NOW)
    assert refusal is not None and refusal.scope is Scope.USER


def test_cli_vms_have_their_own_caps() -> None:
    refusal = decide(StartKind.CLI_VM, usage(user_cli_vms=5), LIMITS, NOW)
    assert refusal is not None and refusal.code == "too_many_cli_vms"
    refusal = decide(StartKind.CLI_VM, usage(node_cli_vms=2), LIMITS, NOW)
    assert refusal is not None and (refusal.scope, refusal.code) == (Scope.NODE, "at_capacity")
    assert decide(StartKind.LOGIN, usage(node_cli_vms=2, user_cli_vms=5), LIMITS, NOW) is None


def test_retry_after_is_at_least_one_second() -> None:
    past = (NOW - timedelta(seconds=5),) * 3
    refusal = decide(StartKind.LOGIN, usage(live_session_deadlines=past), LIMITS, NOW)
    assert refusal is not None and refusal.retry_after_s == 1
