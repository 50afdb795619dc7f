"""Invariant 4 at the domain level: the record tells the truth, whatever happens."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from airlock.domain import IllegalTransition
from airlock.domain.sessions import SessionStatus, record_changes

T0 = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)


def test_failure_needs_a_reason() -> None:
    with pytest.raises(ValueError, match="failure reason"):
        record_changes(SessionStatus.AWAITING_USER, SessionStatus.FAILED, now=T0)
    with pytest.raises(ValueError, match="failure reason"):
        record_changes(
            SessionStatus.AWAITING_USER, SessionStatus.FAILED, now=T0, failure_reason="  "
        )


def test_a_success_carries_no_failure_reason() -> None:
    with pytest.raises(ValueError, match="no failure reason"):
        record_changes(
            SessionStatus.AWAITING_USER, SessionStatus.COMPLETED, now=T0, failure_reason="x"
        )


def test_the_moments_are_recorded() -> None:
    ready = record_changes(SessionStatus.INITIALIZING, SessionStatus.AWAITING_USER, now=T0)
    assert ready == {"status": "awaiting_user", "ready_at": T0}
    done = record_changes(SessionStatus.AWAITING_USER, SessionStatus.COMPLETED, now=T0)
    assert done == {"status": "completed", "completed_at": T0, "ended_at": T0}


events = st.lists(
    st.tuples(
        st.sampled_from(list(SessionStatus)),
        st.one_of(st.none(), st.sampled_from(["vm_lost: gone", "login_timeout", ""])),
        st.integers(0, 60),
    ),
    max_size=25,
)


@given(events)
def test_any_event_sequence_leaves_a_truthful_record(
    sequence: list[tuple[SessionStatus, str | None, int]],
) -> None:
    """Apply random requested moves the way ``services.records`` does (refused moves change
    nothing); after every step the record is consistent with its status."""
    record: dict[str, Any] = {"status": SessionStatus.INITIALIZING.value, "vm_id": "vm-1"}
    now = T0
    for target, reason, dt in sequence:
        now += timedelta(seconds=dt)
        current = SessionStatus(record["status"])
        before = dict(record)
        try:
            record.update(record_changes(current, target, now=now, failure_reason=reason))
        except (IllegalTransition, ValueError):
            assert record == before  # a refused move changes nothing
            continue
        status = SessionStatus(record["status"])
        assert record["vm_id"] == "vm-1"  # the session always names its VM
        if status is SessionStatus.FAILED:
            assert record.get("failure_reason", "").strip()
        if status is SessionStatus.COMPLETED:
            assert record.get("completed_at") is not None
            assert "failure_reason" not in record
        if status.terminal:
            assert record.get("ended_at") == now
        if before["status"] != SessionStatus.INITIALIZING.value:
            assert record.get("ready_at") is None or record["ready_at"] <= now
    final = SessionStatus(record["status"])
    if final.terminal:  # a terminal record is frozen: nothing after it applied
        ended = record["ended_at"]
        assert all(v <= ended for k, v in record.items() if k.endswith("_at"))
