"""One Server-Sent Events stream of a session, for both routes that serve one:
``/api/auth/session/{id}/events`` (bearer tokens) and ``.../viewer/events`` (the viewer
page). They differ only in how the session is read (whose, with or without a viewer token
in ``novncURL``) and in the extra events the viewer page gets (``egress``).

What a stream sends: ``event: session`` with the session JSON at once and after every
change, the extra events whenever their data changed, a comment line after 15 s of silence
(so proxies keep an idle stream open), and the end of the stream once the VM is gone
(destroyed or lost), after its final state was sent. It wakes on the bus (a change on this
controller, or on a peer through ``LISTEN/NOTIFY``) and re-reads the session then; it also
re-reads every ``AIRLOCK_EVENTS_RESYNC_MS``, a safety net for a change nobody announced.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from fastapi.responses import StreamingResponse

from airlock.api import schemas
from airlock.domain.vms import VmState
from airlock.errors import NotFound
from airlock.services.bus import Subscription
from airlock.services.core import Core

SSE_HEARTBEAT_S = 15.0
HEADERS = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}

T = TypeVar("T")
Read = Callable[[], Awaitable[schemas.SessionOut]]  # raises NotFound once it is gone
Extra = Callable[[], Awaitable[str | None]]  # an extra event's data, None: nothing to say


def response(stream: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(stream, media_type="text/event-stream", headers=HEADERS)


@dataclass(frozen=True, slots=True)
class _Failed:
    error: Exception


async def _to_the_end(core: Core, read: Callable[[], Awaitable[T]]) -> T:
    """``read()``, run to its end even when the stream is cancelled meanwhile (the client
    left mid-read): a SQLite connection cut inside a query is never closed by aiosqlite,
    which leaks the connection and a task that waits on it for ever. The read is the core's
    task; a stream that left drops its result."""

    async def outcome() -> T | _Failed:
        try:
            return await read()
        except Exception as exc:  # handed to the stream, not logged as a crashed task
            return _Failed(exc)

    if core.tasks.closed:  # shutting down: nothing may be spawned, and the stream ends
        return await read()
    result = await asyncio.shield(core.tasks.spawn(outcome(), name="sse-read"))
    if isinstance(result, _Failed):
        raise result.error
    return result


def _key(view: schemas.SessionOut) -> str:
    # The viewer token in novncURL changes with time, so it does not count as a change.
    return view.model_dump_json(exclude={"novncURL"})


async def session_stream(
    core: Core,
    session_id: str,
    *,
    version: int,
    first: schemas.SessionOut,
    read: Read,
    extras: Mapping[str, Extra] | None = None,
) -> AsyncIterator[str]:
    """The stream's text. ``version``: the bus version taken before ``first`` was read, so
    no change falls between them."""
    with core.bus.subscribe(session_id, version) as subscription:
        async for text in _stream(core, subscription, first, read, extras or {}):
            yield text


async def _stream(
    core: Core,
    subscription: Subscription,
    first: schemas.SessionOut,
    read: Read,
    extras: Mapping[str, Extra],
) -> AsyncIterator[str]:
    loop = asyncio.get_running_loop()
    resync = core.settings.events_resync.total_seconds()
    sent: dict[str, str | None] = {name: None for name in extras}
    view = first
    last_key: str | None = None
    last_write = last_read = loop.time()
    while True:
        key = _key(view)
        if key != last_key:
            last_key = key
            last_write = loop.time()
            yield f"event: session\ndata: {view.model_dump_json(by_alias=True)}\n\n"
        for name, extra in extras.items():
            data = await _to_the_end(core, extra)
            if data is not None and data != sent[name]:
                sent[name] = data
                last_write = loop.time()
                yield f"event: {name}\ndata: {data}\n\n"
        if view.vm is None or VmState(view.vm.state).terminal:
            return
        # Until a change, the safety re-read or the heartbeat, whichever comes first.
        while True:
            now = loop.time()
            heartbeat_in = last_write + SSE_HEARTBEAT_S - now
            resync_in = last_read + resync - now
            if heartbeat_in <= 0:
                last_write = now
                yield ": keepalive\n\n"
                continue
            if resync_in <= 0 or await subscription.changed(min(heartbeat_in, resync_in)):
                break
        last_read = loop.time()
        try:
            view = await _to_the_end(core, read)
        except NotFound:
            return
