"""The one place that reads the wall clock, and the one the background loops wait on.

Services take a ``Clock``: they read ``now()`` from it, and the loops that wait for a
deadline or a period (scheduler, reconciler, warm pool, lease keeper, viewer keepalives)
wait through ``sleep`` and ``timeout``, so a test can move time instead of waiting for it
(``ManualClock``). Timeouts that guard real I/O (a boot, an agent call) stay on the wall:
a hung process is hung whatever the test's clock says. The domain never reads a clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta


class Clock:
    def now(self) -> datetime:
        return datetime.now(UTC)

    def monotonic(self) -> float:
        """Seconds on a clock that never jumps: for periods, not for deadlines."""
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    def timeout(self, seconds: float | None) -> contextlib.AbstractAsyncContextManager[object]:
        """``asyncio.timeout`` measured on this clock: raises ``TimeoutError`` out of the
        block when ``seconds`` (None: never) pass first."""
        return asyncio.timeout(seconds)


class ManualClock(Clock):
    """A clock that moves only when the test says so (``advance``); whatever sleeps or
    times out on it wakes when time is moved past its deadline, in deadline order.

    ``settled()`` tells a test when every task the last ``advance`` woke has gone back to
    sleep on this clock (or ended): the round it was woken for is over, so what that round
    did not do, it will not do until time moves again.

    What runs in another process keeps the wall's time: a VM's own lease, an agent's
    timeouts. The lease keeper renews on this clock, so a test that keeps a VM for longer
    than its boot lease (a few minutes) must move the clock past a renewal period.
    """

    def __init__(self, start: datetime | None = None) -> None:
        self._now = self._start = start or datetime.now(UTC)
        self._due: list[tuple[datetime, int]] = []
        self._wakes: dict[int, tuple[Callable[[], None], asyncio.Task[object] | None]] = {}
        self._seq = itertools.count()
        self._naps: dict[asyncio.Task[object] | None, int] = {}
        self._woken: dict[asyncio.Task[object] | None, int] = {}

    def now(self) -> datetime:
        return self._now

    def monotonic(self) -> float:
        return (self._now - self._start).total_seconds()

    def advance(self, **kwargs: float) -> None:
        """Move time forward (``timedelta`` keywords) and wake every sleeper now due."""
        self._now += timedelta(**kwargs)
        while self._due and self._due[0][0] <= self._now:
            _, seq = heapq.heappop(self._due)
            entry = self._wakes.pop(seq, None)
            if entry is None:
                continue  # woke or left before its deadline
            wake, task = entry
            self._woken[task] = self._naps.get(task, 0)
            wake()

    def settled(self) -> bool:
        """Every task the last ``advance`` woke has slept on this clock again, or ended."""
        for task, naps in list(self._woken.items()):
            if (task is not None and task.done()) or self._naps.get(task, 0) > naps:
                del self._woken[task]
        return not self._woken

    def sleepers(self) -> int:
        """How many sleeps and timeouts wait on this clock now."""
        return len(self._wakes)

    def asleep(self, task_name: str) -> bool:
        """Whether a task whose name ends with ``task_name`` waits on this clock now."""
        return any(
            task is not None and task.get_name().endswith(task_name)
            for _, task in self._wakes.values()
        )

    def _register(self, seconds: float, wake: Callable[[], None]) -> int:
        task: asyncio.Task[object] | None = asyncio.current_task()
        self._naps[task] = self._naps.get(task, 0) + 1
        seq = next(self._seq)
        if seconds <= 0:
            wake()
            return seq
        self._wakes[seq] = (wake, task)
        heapq.heappush(self._due, (self._now + timedelta(seconds=seconds), seq))
        return seq

    def _forget(self, seq: int) -> None:
        self._wakes.pop(seq, None)

    async def sleep(self, seconds: float) -> None:
        done = asyncio.get_running_loop().create_future()

        def wake() -> None:
            if not done.done():
                done.set_result(None)

        seq = self._register(seconds, wake)
        try:
            await done
        finally:
            self._forget(seq)

    @contextlib.asynccontextmanager
    async def _timeout(self, seconds: float | None) -> AsyncIterator[object]:
        async with asyncio.timeout(None) as cm:
            if seconds is None:
                yield cm
                return
            loop = asyncio.get_running_loop()
            seq = self._register(seconds, lambda: cm.reschedule(loop.time()))
            try:
                yield cm
            finally:
                self._forget(seq)

    def timeout(self, seconds: float | None) -> contextlib.AbstractAsyncContextManager[object]:
        return self._timeout(seconds)
