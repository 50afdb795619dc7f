"""In-process change notifications, so the SSE stream wakes when a session changes.

The database stays the truth: a subscriber re-reads the row after every wake-up, and also
on a timer, so a change made by another controller process is seen too, only later.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict


class SessionBus:
    def __init__(self) -> None:
        self._versions: dict[str, int] = defaultdict(int)
        self._changed = asyncio.Condition()

    def version(self, session_id: str) -> int:
        return self._versions[session_id]

    async def publish(self, *session_ids: str) -> None:
        async with self._changed:
            for session_id in session_ids:
                self._versions[session_id] += 1
            self._changed.notify_all()

    async def wait(self, session_id: str, seen: int, timeout: float) -> int:
        """Wait until the session's version moves past ``seen`` or ``timeout`` passes."""

        async def moved() -> None:
            async with self._changed:
                await self._changed.wait_for(lambda: self._versions[session_id] != seen)

        # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancel that lands
        # in the same loop turn as the wait finishing, and a shutdown would then hang.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await moved()
        return self._versions[session_id]
