"""PostgreSQL ``LISTEN/NOTIFY`` on one dedicated connection per controller.

``Channel.run()`` is a loop its owner starts and cancels: it connects (asyncpg, outside the
SQLAlchemy pool: a listening connection must stay open and must never be handed to a
query), ``LISTEN``s, calls ``on_connect`` (the bus wakes every waiter, since whatever was
sent while no connection listened is lost), then sends what ``send`` queued and checks the
connection now and then. When the connection drops (a restart, a failover,
``pg_terminate_backend``), it connects again after a back-off that doubles up to a cap, and
``on_connect`` runs again. Payloads queued meanwhile are kept and sent once it is back.

Why the NOTIFY is sent right after the change's commit, on this connection, instead of
inside the changing transaction: a transaction that notifies takes PostgreSQL's one
notify-queue lock for its commit, so every notifying commit on the database waits for the
others (the scheduler's destroys among them); sent from here, many changes go out in one
short statement that holds no row locks, and a pool connection is not used for it. The
cost: a change whose controller dies between its commit and this send reaches the peers'
watchers only at their safety re-read. PostgreSQL delivers notifications only after the
sending statement commits, so a peer's re-read always sees the change.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import asyncpg
from sqlalchemy.engine import make_url

log = logging.getLogger("airlock.store")

CHANNEL = "airlock_sessions"
BACKOFF_FIRST_S = 0.1
BACKOFF_MAX_S = 5.0
PING_S = 10.0  # a connection nobody heard from this long is asked whether it is alive
PING_TIMEOUT_S = 5.0
CONNECT_TIMEOUT_S = 10.0
SEND_BATCH = 500  # payloads per NOTIFY statement


def asyncpg_dsn(url: str) -> str:
    """A ``postgresql+asyncpg://`` SQLAlchemy URL as asyncpg's own DSN."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


class Channel:
    def __init__(
        self,
        url: str,
        *,
        on_message: Callable[[str], None],
        on_connect: Callable[[], None],
        channel: str = CHANNEL,
    ) -> None:
        self._dsn = asyncpg_dsn(url)
        self._channel = channel
        self._on_message = on_message
        self._on_connect = on_connect
        self._outbox: list[str] = []
        self._ready = asyncio.Event()  # something to send, or the connection was lost
        self.connected = asyncio.Event()  # set while LISTEN is in place
        self.connects = 0  # how many times LISTEN was established (1 + reconnects)
        self.backend_pid: int | None = None  # the server process of the listening connection

    def send(self, payload: str) -> None:
        """Queue a NOTIFY; it goes out at once if connected, else once reconnected."""
        self._outbox.append(payload)
        self._ready.set()

    async def flush(self) -> None:
        """Send what is queued on a connection of its own, for a process that never ran
        the loop (the CLI: ``airlock reconcile`` on PostgreSQL tells the controllers).
        Best effort: what cannot be sent now is left to the watchers' safety re-read."""
        if not self._outbox:
            return
        batch, self._outbox = self._outbox, []
        try:
            conn = await asyncpg.connect(self._dsn, timeout=CONNECT_TIMEOUT_S)
            try:
                await self._notify(conn, batch)
            finally:
                await conn.close(timeout=PING_TIMEOUT_S)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            log.warning("events: %d notifications not sent (%s)", len(batch), exc)

    async def _notify(self, conn: Any, payloads: list[str]) -> None:
        for i in range(0, len(payloads), SEND_BATCH):
            await conn.execute(
                "SELECT pg_notify($1, p) FROM unnest($2::text[]) AS p",
                self._channel,
                payloads[i : i + SEND_BATCH],
            )

    async def run(self) -> None:
        delay = BACKOFF_FIRST_S
        while True:
            try:
                conn = await asyncpg.connect(self._dsn, timeout=CONNECT_TIMEOUT_S)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
                log.warning("events: cannot connect to listen (%s); again in %.1f s", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX_S)
                continue
            connects = self.connects
            try:
                await self._serve(conn)
            except Exception as exc:  # whatever it was, the loop must go on listening
                log.warning("events: the listening connection failed (%s); reconnecting", exc)
            finally:
                self.connected.clear()
                self.backend_pid = None
                conn.terminate()
            if self.connects != connects:
                delay = BACKOFF_FIRST_S  # it listened: this drop starts the back-off afresh
            await asyncio.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX_S)

    async def _serve(self, conn: Any) -> None:
        """Until the connection is lost: listen, deliver, send, ping."""

        def lost(_: object) -> None:
            self._ready.set()

        def heard(_conn: object, _pid: int, _channel: str, payload: str) -> None:
            self._on_message(payload)

        conn.add_termination_listener(lost)
        await conn.add_listener(self._channel, heard)
        self.backend_pid = conn.get_server_pid()
        self.connects += 1
        self.connected.set()
        log.info("events: listening on %s (connection %d)", self._channel, self.connects)
        self._on_connect()
        while not conn.is_closed():
            self._ready.clear()
            if self._outbox:
                batch, self._outbox = self._outbox[:SEND_BATCH], self._outbox[SEND_BATCH:]
                try:
                    await self._notify(conn, batch)
                except BaseException:
                    self._outbox[:0] = batch  # not sent: the next connection sends it
                    raise
                continue
            try:
                async with asyncio.timeout(PING_S):
                    await self._ready.wait()
            except TimeoutError:
                await conn.fetchval("SELECT 1", timeout=PING_TIMEOUT_S)
        raise ConnectionResetError("the listening connection was closed")
