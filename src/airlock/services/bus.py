"""Change notifications, so the SSE streams and the VNC proxy wake when a session changes.

The database stays the truth: a subscriber re-reads the row after every wake-up (and, as a
slow safety net, on a timer of its own). ``publish`` wakes this process's waiters of the
sessions named, and no others: each waiter has its own future, filed under its session.

Across controllers (PostgreSQL): ``publish`` also hands the ids to an outbox, which
``store.notify.Channel`` sends as ``NOTIFY`` right after the change committed; every
controller LISTENs and feeds what its peers sent to ``receive``. A payload carries the
sending bus's ``origin``, so a controller ignores the echo of its own changes (it woke its
waiters already). When the listening connection was lost, ``wake_all`` wakes every waiter
once after it is back: whatever changed meanwhile is found by that re-read.

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
import secrets
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

Outbox = Callable[[str], None]


@dataclass
class _Entry:
    version: int
    waiters: int = 0
    futures: set[asyncio.Future[None]] = field(default_factory=set)


class SessionBus:
    def __init__(self) -> None:
        self.origin = secrets.token_hex(6)  # tells our own NOTIFYs from the peers'
        self._seq = 0  # the newest version handed out
        self._entries: dict[str, _Entry] = {}  # watched sessions only
        self._unwatched = 0  # the newest version of a change no entry recorded
        self._outbox: Outbox | None = None
        self.wakes = 0  # waiters woken by a change (not by their timeout): tests count them
        self.heard = 0  # payloads received from the channel, our own echoes included

    def __len__(self) -> int:
        """Sessions the bus holds an entry for (those being waited on)."""
        return len(self._entries)

    def attach(self, outbox: Outbox) -> None:
        """Send every publish on to the other controllers too (a payload per call)."""
        self._outbox = outbox

    def version(self, session_id: str) -> int:
        """The version to pass to ``wait``: take it before reading the row."""
        entry = self._entries.get(session_id)
        return entry.version if entry is not None else self._seq

    async def publish(self, *session_ids: str) -> None:
        """These sessions changed (committed): wake their waiters here and on the peers."""
        self.wake(session_ids)
        if self._outbox is not None and session_ids:
            for payload in encode(self.origin, session_ids):
                self._outbox(payload)

    def receive(self, payload: str) -> None:
        """A ``NOTIFY`` payload from the channel: wake the sessions a peer changed."""
        self.heard += 1
        decoded = decode(payload)
        if decoded is None or decoded[0] == self.origin:
            return  # junk, or the echo of our own publish
        self.wake(decoded[1])

    def wake(self, session_ids: Iterable[str]) -> None:
        """This process's waiters of these sessions, and only theirs."""
        self._seq += 1
        for session_id in session_ids:
            entry = self._entries.get(session_id)
            if entry is None:
                self._unwatched = self._seq
                continue
            entry.version = self._seq
            self._resolve(entry)

    def wake_all(self) -> None:
        """Every waiter once: after notifications may have been missed (a reconnect)."""
        self._seq += 1
        self._unwatched = self._seq
        for entry in self._entries.values():
            entry.version = self._seq
            self._resolve(entry)

    def _resolve(self, entry: _Entry) -> None:
        for future in entry.futures:
            if not future.done():
                future.set_result(None)
                self.wakes += 1
        entry.futures.clear()

    @contextlib.contextmanager
    def subscribe(self, session_id: str, seen: int) -> Iterator[Subscription]:
        """Watch one session for as long as the block runs (an SSE stream's life): the
        entry stays between waits, so a wait that timed out (a heartbeat) costs no re-read.
        ``seen``: the version taken before the first read."""
        entry = self._enter(session_id, seen)
        try:
            yield Subscription(entry, seen, self)
        finally:
            self._leave(session_id)

    def parked(self) -> int:
        """Waits in progress right now (streams idle between changes, not in a read)."""
        return sum(len(entry.futures) for entry in self._entries.values())

    async def _wait_entry(self, entry: _Entry, seen: int, timeout: float) -> None:
        if entry.version != seen or timeout <= 0:
            return
        future = asyncio.get_running_loop().create_future()
        entry.futures.add(future)
        # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancel that
        # lands in the same loop turn as the wait finishing, and a shutdown would hang.
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await future
        finally:
            entry.futures.discard(future)

    async def wait(self, session_id: str, seen: int, timeout: float) -> int:
        """Wait until the session's version moves past ``seen`` or ``timeout`` passes."""
        entry = self._enter(session_id, seen)
        try:
            await self._wait_entry(entry, seen, timeout)
            return entry.version
        finally:
            self._leave(session_id)

    def _enter(self, session_id: str, seen: int) -> _Entry:
        entry = self._entries.get(session_id)
        if entry is None:
            version = self._unwatched if self._unwatched > seen else seen
            entry = self._entries[session_id] = _Entry(version)
        entry.waiters += 1
        return entry

    def _leave(self, session_id: str) -> None:
        entry = self._entries[session_id]
        entry.waiters -= 1
        if entry.waiters:
            return
        del self._entries[session_id]
        # What this entry knew is folded into the unwatched mark, so a later wait from an
        # older version still wakes.
        self._unwatched = max(self._unwatched, entry.version)


class Subscription:
    """``SessionBus.subscribe``'s handle: one watcher of one session."""

    def __init__(self, entry: _Entry, seen: int, bus: SessionBus) -> None:
        self._entry = entry
        self._seen = seen
        self._bus = bus

    async def changed(self, timeout: float) -> bool:
        """Whether the session changed since the last call (or the first read), waiting up
        to ``timeout`` for it."""
        await self._bus._wait_entry(self._entry, self._seen, timeout)
        moved = self._entry.version != self._seen
        self._seen = self._entry.version
        return moved


# --- the payload of a NOTIFY: "<origin> <id> <id> ..." -------------------------------------
# PostgreSQL caps a payload below 8000 bytes; a session id is 32 characters.
_IDS_PER_PAYLOAD = 200


def encode(origin: str, session_ids: Sequence[str]) -> list[str]:
    """The payloads that carry these ids (several when there are many)."""
    return [
        " ".join((origin, *session_ids[i : i + _IDS_PER_PAYLOAD]))
        for i in range(0, len(session_ids), _IDS_PER_PAYLOAD)
    ]


def decode(payload: str) -> tuple[str, list[str]] | None:
    """``(origin, ids)``, or None for a payload that is not ours."""
    origin, *ids = payload.split(" ")
    if not origin or not ids or any(len(i) > 64 for i in ids):
        return None
    return origin, ids
