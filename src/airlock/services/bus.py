"""In-process change notifications, so the SSE streams and the VNC proxy wake when a
session changes.

The database stays the truth: a subscriber re-reads the row after every wake-up, and also
on a timer, so a change made by another controller process is seen too, only later.

Memory: the bus holds an entry only for a session somebody waits on right now, and drops
it when its last waiter leaves, so ids nobody watches (a caller's made-up ones included)
leave nothing behind. Versions come from one counter for the whole bus, so they never
repeat; a wait that starts on a session with no entry cannot tell whether that session
changed since ``seen``, and so wakes at once if any unwatched change happened since then
(at worst one needless re-read, never a missed change).
"""

from __future__ import annotations

import asyncio
import contextlib


class SessionBus:
    def __init__(self) -> None:
        self._seq = 0  # the newest version handed out
        self._versions: dict[str, int] = {}  # watched sessions: version of their last change
        self._waiters: dict[str, int] = {}
        self._unwatched = 0  # the newest version of a change no entry recorded
        self._changed = asyncio.Condition()

    def __len__(self) -> int:
        """Sessions the bus holds an entry for (those being waited on)."""
        return len(self._versions)

    def version(self, session_id: str) -> int:
        """The version to pass to ``wait``: take it before reading the row."""
        return self._versions.get(session_id, self._seq)

    async def publish(self, *session_ids: str) -> None:
        async with self._changed:
            self._seq += 1
            for session_id in session_ids:
                if session_id in self._versions:
                    self._versions[session_id] = self._seq
                else:
                    self._unwatched = self._seq
            self._changed.notify_all()

    async def wait(self, session_id: str, seen: int, timeout: float) -> int:
        """Wait until the session's version moves past ``seen`` or ``timeout`` passes."""
        self._enter(session_id, seen)
        try:

            async def moved() -> None:
                async with self._changed:
                    await self._changed.wait_for(lambda: self._versions[session_id] != seen)

            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancel that
            # lands in the same loop turn as the wait finishing, and a shutdown would hang.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await moved()
            return self._versions[session_id]
        finally:
            self._leave(session_id)

    def _enter(self, session_id: str, seen: int) -> None:
        if session_id not in self._versions:
            self._versions[session_id] = self._unwatched if self._unwatched > seen else seen
        self._waiters[session_id] = self._waiters.get(session_id, 0) + 1

    def _leave(self, session_id: str) -> None:
        left = self._waiters[session_id] - 1
        if left:
            self._waiters[session_id] = left
            return
        del self._waiters[session_id]
        # What this entry knew is folded into the unwatched mark, so a later wait from an
        # older version still wakes.
        self._unwatched = max(self._unwatched, self._versions.pop(session_id))
