"""The open viewer sockets of this controller and what keeps them honest: while a session
has any, one named task per session sends ``SessionService.keepalive`` every
``domain.viewers.keepalive_interval`` (the socket's connect sent the first one) and watches
the ``SessionBus`` (and the database on a timer, for other controllers' changes); when the
VM is going or gone (``domain.viewers.viewer_end``) every socket of the session is stopped
with the close code and reason a page can show. The API's VNC proxy attaches a socket for
as long as it proxies, and closes the WebSocket with what ``stop`` was given.

The viewer page's own calls (viewer token, no bearer token) are decided here too:
``keepalive`` is presence from any viewer, a view-only one too; ``complete`` is refused to
a view-only viewer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from datetime import datetime

from airlock.aio import TaskOwner
from airlock.domain.viewers import CLOSE_SHUTDOWN, VM_GONE, keepalive_interval, viewer_end
from airlock.domain.vms import VmState
from airlock.errors import AirlockError, Forbidden, NotFound
from airlock.services.core import Core
from airlock.store.tables import AuthSession, Vm

log = logging.getLogger("airlock.vnc")


@dataclass(eq=False)
class ViewerSocket:
    """One open viewer: ``stop`` ends its proxying with a close code and reason."""

    session_id: str
    view_only: bool
    stopped: asyncio.Event = field(default_factory=asyncio.Event)
    close_code: int = 1000
    close_reason: str = ""

    def stop(self, code: int, reason: str) -> None:
        if not self.stopped.is_set():
            self.close_code, self.close_reason = code, reason
            self.stopped.set()


async def vm_end(core: Core, session_id: str) -> tuple[int, str] | None:
    """How the session's viewers close now, from its VM's state; None while viewable."""
    _, vm = await core.sessions.get(session_id, None)
    return viewer_end(VmState(vm.state) if vm is not None else None)


async def await_vm_end(core: Core, session_id: str, wait_s: float) -> tuple[int, str] | None:
    """The VM's stream ended: how the viewers close, waiting up to ``wait_s`` for the VM's
    fate to be recorded (a VM that died is marked ``lost`` only at the reconciler's next
    round); None if it still looks viewable then."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    version = core.bus.version(session_id)
    while True:
        try:
            closing = await vm_end(core, session_id)
        except AirlockError:
            closing = None
        left = deadline - loop.time()
        if closing is not None or left <= 0:
            return closing
        version = await core.bus.wait(session_id, version, min(left, 0.5))


async def keepalive(core: Core, session_id: str) -> datetime | None:
    """The viewer page is visible: presence, as an open socket is (view-only or not).
    Returns the VM's new destroy deadline (None: it has none)."""
    return await core.sessions.keepalive(session_id, None)


async def complete(
    core: Core, session: AuthSession, *, view_only: bool
) -> tuple[AuthSession, Vm | None]:
    """The viewer page showed the outcome: end the session now; a view-only viewer may
    only look (``Forbidden``)."""
    if view_only:
        raise Forbidden("a view-only viewer cannot end the session", code="view_only")
    return await core.sessions.complete(session.id, None, actor=f"viewer:{session.user_id}")


class ViewerRegistry:
    """The open viewer sockets of this controller, per session, and one watcher task per
    session that has any (owned here; ``close`` stops every socket and task)."""

    def __init__(self, core: Core) -> None:
        self.core = core
        self.tasks = TaskOwner("viewers")
        self._sockets: dict[str, set[ViewerSocket]] = {}
        self._watchers: dict[str, asyncio.Task[None]] = {}
        s = core.settings
        self.interval = keepalive_interval(s.grace_success, s.idle_extension)

    def count(self, session_id: str | None = None) -> int:
        if session_id is not None:
            return len(self._sockets.get(session_id, ()))
        return sum(len(s) for s in self._sockets.values())

    def attach(self, sock: ViewerSocket) -> None:
        self._sockets.setdefault(sock.session_id, set()).add(sock)
        watcher = self._watchers.get(sock.session_id)
        if watcher is None or watcher.done():
            self._watchers[sock.session_id] = self.tasks.spawn(
                self._watch(sock.session_id), name=f"watch:{sock.session_id}"
            )

    def detach(self, sock: ViewerSocket) -> None:
        group = self._sockets.get(sock.session_id)
        if group is None:
            return
        group.discard(sock)
        if not group:
            del self._sockets[sock.session_id]
            watcher = self._watchers.pop(sock.session_id, None)
            if watcher is not None:
                watcher.cancel()

    def _stop_all(self, session_id: str, code: int, reason: str) -> None:
        for sock in self._sockets.get(session_id, ()):
            sock.stop(code, reason)

    async def _watch(self, session_id: str) -> None:
        """Keepalive every ``interval`` while the session has sockets; close them all when
        its VM is no longer viewable. Wakes on the bus (this controller's changes) or after
        ``interval`` (another controller's)."""
        bus, sessions, clock = self.core.bus, self.core.sessions, self.core.clock
        version = bus.version(session_id)
        last_keepalive = clock.monotonic()  # the socket's own connect sent the first one
        while session_id in self._sockets:
            wait = max(0.0, last_keepalive + self.interval - clock.monotonic())
            # The keepalive period is on the core's clock (a test moves it); the bus's own
            # timeout is only a backstop behind it.
            with contextlib.suppress(TimeoutError):
                async with clock.timeout(wait):
                    version = await bus.wait(session_id, version, wait + 1.0)
            try:
                if (closing := await vm_end(self.core, session_id)) is not None:
                    self._stop_all(session_id, *closing)
                    return
                if clock.monotonic() - last_keepalive >= self.interval:
                    last_keepalive = clock.monotonic()
                    await sessions.keepalive(session_id, None)
            except NotFound:
                self._stop_all(session_id, *VM_GONE)
                return
            except Exception:  # a database hiccup must not drop the viewers: retry
                log.warning("viewer watcher failed; retrying", exc_info=True)
                await asyncio.sleep(self.interval)

    async def close(self) -> None:
        """Shutdown: every socket closes with 1001, every watcher stops."""
        for session_id in list(self._sockets):
            self._stop_all(session_id, CLOSE_SHUTDOWN, "controller shutting down")
        await self.tasks.close()
