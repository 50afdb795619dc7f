"""``ManualClock``: sleeps and timeouts on it wake when, and only when, the test moves it
past their deadline, in deadline order; ``settled`` says when the woken have slept again."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime, timedelta

import pytest

from airlock.clock import Clock, ManualClock
from tests.lifecycle_helpers import advance, wait_for

START = datetime(2026, 1, 1, tzinfo=UTC)


async def test_sleepers_wake_only_when_time_passes_their_deadline_in_order() -> None:
    clock = ManualClock(START)
    woke: list[str] = []

    async def sleeper(name: str, seconds: float) -> None:
        await clock.sleep(seconds)
        woke.append(name)

    tasks = [asyncio.create_task(sleeper(n, s)) for n, s in (("b", 2.0), ("a", 1.0))]
    await wait_for(lambda: clock.sleepers() == 2)
    await asyncio.sleep(0.05)  # real time passes: nothing wakes
    assert woke == []
    clock.advance(seconds=0.999)
    await asyncio.sleep(0)
    assert woke == []
    clock.advance(seconds=0.001)
    await wait_for(lambda: woke == ["a"])
    clock.advance(seconds=5)
    await asyncio.gather(*tasks)
    assert woke == ["a", "b"] and clock.now() == START + timedelta(seconds=6)
    assert clock.monotonic() == 6.0 and clock.sleepers() == 0


async def test_a_timeout_expires_on_the_clock_and_not_before() -> None:
    clock = ManualClock(START)
    never = asyncio.Event()

    async def waiter() -> str:
        try:
            async with clock.timeout(3.0):
                await never.wait()
        except TimeoutError:
            return "timed out"
        return "set"

    task = asyncio.create_task(waiter())
    await wait_for(lambda: clock.sleepers() == 1)
    clock.advance(seconds=2.9)
    await asyncio.sleep(0.05)
    assert not task.done()
    clock.advance(seconds=0.1)
    assert await task == "timed out"
    assert clock.sleepers() == 0


async def test_a_timeout_whose_block_ends_first_leaves_nothing_behind() -> None:
    clock = ManualClock(START)
    event = asyncio.Event()
    event.set()
    async with clock.timeout(1.0):
        await event.wait()
    async with clock.timeout(None):
        await event.wait()
    assert clock.sleepers() == 0
    clock.advance(seconds=10)  # the forgotten deadline fires nothing


async def test_cancelling_a_sleeper_forgets_it() -> None:
    clock = ManualClock(START)
    task = asyncio.create_task(clock.sleep(1.0))
    await wait_for(lambda: clock.sleepers() == 1)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert clock.sleepers() == 0
    clock.advance(seconds=2)


async def test_advance_waits_until_each_woken_loop_sleeps_again() -> None:
    clock = ManualClock(START)
    rounds: list[datetime] = []

    async def loop() -> None:
        while True:
            await clock.sleep(1.0)
            await asyncio.sleep(0.05)  # a round that does real work takes real time
            rounds.append(clock.now())

    task = asyncio.create_task(loop(), name="loop")
    try:
        await wait_for(lambda: clock.sleepers() == 1)
        assert clock.asleep("loop") and not clock.asleep("other")
        assert clock.settled()
        await advance(clock, seconds=1)
        assert rounds == [START + timedelta(seconds=1)]  # over when advance returns
        await advance(clock, seconds=0.5)  # due for nobody: nothing woke
        assert len(rounds) == 1
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_the_wall_clock_sleeps_and_times_out_for_real() -> None:
    clock = Clock()
    before = clock.monotonic()
    await clock.sleep(0.01)
    with pytest.raises(TimeoutError):
        async with clock.timeout(0.01):
            await asyncio.Event().wait()
    assert clock.monotonic() - before >= 0.02
    assert abs((clock.now() - datetime.now(UTC)).total_seconds()) < 1
