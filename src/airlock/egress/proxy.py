"""``EgressProxy``: one browser VM's forward proxy (see the package's docstring), its
connections, their policy checks, tunnels and log lines. HTTP parsing is ``egress.http``,
the listening socket ``egress.sockets``."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from airlock.domain.egress_policy import Decision, EgressPolicy, Verdict
from airlock.egress.http import (
    Reject,
    Request,
    downstream_head,
    parse_request,
    read_head,
    response_length,
    send_error,
    status_of,
    upstream_head,
)
from airlock.egress.sockets import bind_unix, unlink_if

log = logging.getLogger("airlock.egress")

MAX_HEAD = 16 * 1024  # request head (request line + headers), bytes
MAX_RESPONSE_HEAD = 64 * 1024  # upstream response head for plain-HTTP requests, bytes
CHUNK = 64 * 1024  # one read while piping; with drain() this bounds what we buffer


@dataclass(slots=True)
class _Conn:
    """What one connection did, for its log line."""

    started: float
    method: str = "-"
    dest: str = "-"
    decision: str = "-"
    status: int = 0
    up: int = 0  # client -> upstream, bytes
    down: int = 0  # upstream -> client, bytes
    note: str = ""
    head_bytes: int = 0  # of the request head read so far
    last_activity: float = field(default_factory=time.monotonic)


class EgressProxy:
    """One browser VM's forward proxy on a Unix socket, allowing what ``policy`` allows.

    ``await serve(path)`` binds and returns once listening; connections are then handled in
    tasks this object owns until ``await close()``, which stops the listener, cancels every
    connection and removes the socket file. Also an async context manager for ``close``.
    """

    def __init__(
        self,
        policy: EgressPolicy,
        *,
        vm_id: str,
        observer: Callable[[Verdict], None] | None = None,
        head_timeout: float = 10.0,
        connect_timeout: float = 10.0,
        idle_timeout: float = 300.0,
        max_connections: int = 256,
        max_head: int = MAX_HEAD,
    ) -> None:
        self.vm_id = vm_id
        self.policy = policy
        self._observer = observer
        self._head_timeout = head_timeout
        self._connect_timeout = connect_timeout
        self._idle_timeout = idle_timeout
        self._max_connections = max_connections
        self._max_head = max_head
        self._server: asyncio.AbstractServer | None = None
        self._path: Path | None = None
        self._inode: tuple[int, int] | None = None
        self._tasks: set[asyncio.Task[None]] = set()  # one per connection, ours
        self._handlers: set[asyncio.Task[Any]] = set()  # asyncio's server tasks awaiting ours
        self._closing = False

    @property
    def path(self) -> Path | None:
        return self._path

    @property
    def active_connections(self) -> int:
        return len(self._tasks)

    async def serve(self, path: Path) -> None:
        """Listen on ``path`` (mode 0600) and return. A stale socket there is replaced."""
        if self._server is not None or self._closing:
            raise RuntimeError("this EgressProxy has already been started")
        sock, inode = bind_unix(path)
        try:
            self._server = await asyncio.start_unix_server(
                self._handle, sock=sock, limit=self._max_head
            )
        except BaseException:
            sock.close()
            unlink_if(path, inode)
            raise
        self._path, self._inode = path, inode
        log.info(
            "egress proxy for vm %s (%s) listening, allowing %s",
            self.vm_id,
            self.policy.provider,
            self.policy.describe(),
            extra={"vm_id": self.vm_id},
        )
        if self.policy.learn:
            log.warning(
                "egress LEARN MODE for vm %s (%s): every host name is allowed and recorded",
                self.vm_id,
                self.policy.provider,
                extra={"vm_id": self.vm_id, "egress": "learn"},
            )

    async def close(self) -> None:
        """Stop listening, cancel and await every connection, remove the socket file."""
        self._closing = True
        if self._server is not None:
            self._server.close()
        # Only tasks not done yet: one cancelled before it ever ran never ran its clean-up,
        # so it stays in the set, and waiting on it again would spin here forever.
        while pending := {t for t in self._tasks | self._handlers if not t.done()}:
            for task in self._tasks:
                task.cancel()
            await asyncio.wait(pending)
        self._tasks.clear()
        self._handlers.clear()
        if self._server is not None:
            await self._server.wait_closed()
        if self._path is not None and self._inode is not None:
            unlink_if(self._path, self._inode)
            self._inode = None

    async def __aenter__(self) -> EgressProxy:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- one connection ------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """asyncio's server runs this in a task of its own. The work runs in a task we own,
        which ``close()`` cancels: cancelling the server's task trips a Python 3.11 bug
        (``StreamReaderProtocol`` calls ``exception()`` on the cancelled task)."""
        handler = asyncio.current_task()
        if self._closing or handler is None:
            writer.close()
            return
        work = asyncio.create_task(self._connection(reader, writer), name=f"egress:{self.vm_id}")
        self._tasks.add(work)
        work.add_done_callback(self._tasks.discard)  # even if cancelled before it ran
        self._handlers.add(handler)
        try:
            await asyncio.wait([work])
        finally:
            self._handlers.discard(handler)
            if not work.done():
                work.cancel()  # the loop is shutting down under us
            elif not work.cancelled() and (exc := work.exception()) is not None:
                log.error("egress vm=%s: connection handler failed", self.vm_id, exc_info=exc)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = _Conn(started=time.monotonic())
        try:
            if len(self._tasks) > self._max_connections:
                raise Reject(503, "too many connections")
            await self._serve_one(reader, writer, conn)
        except Reject as exc:
            conn.status = exc.status
            conn.note = exc.reason
            if conn.decision == "-":
                conn.decision = "rejected"
            await send_error(writer, exc.status, exc.reason if exc.status == 403 else None)
        except (OSError, asyncio.IncompleteReadError, TimeoutError):
            conn.note = "connection lost"
        except asyncio.CancelledError:
            conn.note = "closed with the proxy"
            raise
        finally:
            current = asyncio.current_task()
            if current is not None:
                self._tasks.discard(current)
            writer.close()
            self._log(conn)
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def _log(self, conn: _Conn) -> None:
        """One line per connection: never a path, header or body, they may hold secrets."""
        if conn.decision == "-" and conn.method == "-" and not conn.status:
            return  # connected and left without a word
        failed = conn.decision not in ("allowed", "learned") or conn.status >= 500
        level = logging.WARNING if failed else logging.INFO
        if conn.decision == Decision.NOISE:
            level = logging.DEBUG  # the browser's own background traffic: counted, not warned
        log.log(
            level,
            "egress vm=%s %s %s %s status=%d up=%d down=%d ms=%d%s",
            self.vm_id,
            conn.method,
            conn.dest,
            conn.decision,
            conn.status,
            conn.up,
            conn.down,
            (time.monotonic() - conn.started) * 1000,
            f" ({conn.note})" if conn.note else "",
            extra={
                "vm_id": self.vm_id,
                "egress_dest": conn.dest,
                "egress": conn.decision,
                "bytes_up": conn.up,
                "bytes_down": conn.down,
            },
        )

    async def _serve_one(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: _Conn
    ) -> None:
        try:
            async with asyncio.timeout(self._head_timeout):
                lines = await read_head(reader, self._max_head, conn)
        except TimeoutError:
            if not conn.head_bytes:
                return  # an idle (pre)connection: close it quietly, answer nothing
            raise Reject(408, "no complete request head in time") from None
        if lines is None:
            return  # connected and closed without a word: nothing to do or log
        request = parse_request(lines)
        conn.method = request.method
        conn.dest = f"{request.host}:{request.port}"
        verdict = self.policy.decide(request.host, request.port)
        conn.decision = verdict.decision.value
        if self._observer is not None:
            try:
                self._observer(verdict)
            except Exception:  # counting must never break the connection
                log.exception("egress vm=%s: the observer failed", self.vm_id)
        if verdict.decision not in (Decision.ALLOWED, Decision.LEARNED):
            raise Reject(403, f"{conn.dest} is denied by the egress policy: {verdict.reason}")
        if verdict.decision is Decision.LEARNED:
            conn.note = "learn mode"
        target = self.policy.target(verdict.host, request.port)
        mapped = target != (verdict.host, request.port)
        try:
            async with asyncio.timeout(self._connect_timeout):
                if not mapped:  # a real name: connect to the address we checked
                    target = await _public_address(verdict.host, request.port)
                up_reader, up_writer = await asyncio.open_connection(
                    target[0], target[1], limit=MAX_RESPONSE_HEAD
                )
        except TimeoutError:
            raise Reject(504, "upstream connect timed out") from None
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            raise Reject(502, f"upstream connect failed: {reason}") from None
        try:
            if request.method == "CONNECT":
                writer.write(b"HTTP/1.1 200 Connection Established\r\n\r\n")
                await writer.drain()
                conn.status = 200
                await self._tunnel(reader, writer, up_reader, up_writer, conn)
            else:
                await self._forward(request, reader, writer, up_reader, up_writer, conn)
        finally:
            up_writer.close()
            with contextlib.suppress(Exception):
                await up_writer.wait_closed()

    async def _tunnel(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        up_reader: asyncio.StreamReader,
        up_writer: asyncio.StreamWriter,
        conn: _Conn,
    ) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(self._pipe(reader, up_writer, conn, upstream=True), name="egress-up")
            group.create_task(
                self._pipe(up_reader, writer, conn, upstream=False), name="egress-down"
            )

    async def _forward(
        self,
        request: Request,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        up_reader: asyncio.StreamReader,
        up_writer: asyncio.StreamWriter,
        conn: _Conn,
    ) -> None:
        up_writer.write(upstream_head(request))
        await up_writer.drain()
        # The body goes up while the answer is awaited: an upstream may answer early (an
        # error, or 100 Continue that the client waits for before sending the body).
        body = asyncio.create_task(
            self._send_body(reader, up_writer, request.length, conn), name="egress-body"
        )
        try:
            while True:  # interim 1xx responses pass through, then the final one
                try:
                    head = await self._read_response_head(up_reader)
                except Reject:
                    if conn.down:
                        raise ConnectionResetError from None  # the client has a partial answer
                    raise
                status = status_of(head)
                if status is None or status == 101:
                    raise Reject(502, "upstream sent an unusable response")
                data = downstream_head(head, final=status >= 200)
                writer.write(data)
                await writer.drain()
                conn.down += len(data)
                if status >= 200:
                    conn.status = status
                    break
            length = response_length(request.method, status, head)
            await self._pipe(up_reader, writer, conn, upstream=False, length=length)
        finally:
            body.cancel()
            await asyncio.wait([body])

    async def _send_body(
        self,
        reader: asyncio.StreamReader,
        up_writer: asyncio.StreamWriter,
        length: int,
        conn: _Conn,
    ) -> None:
        """Exactly ``length`` bytes: whatever follows is not this request's and is dropped."""
        remaining = length
        with contextlib.suppress(OSError):
            while remaining > 0:
                data = await self._read_idle(reader, min(CHUNK, remaining), conn)
                if not data:
                    return
                remaining -= len(data)
                conn.up += len(data)
                up_writer.write(data)
                await up_writer.drain()

    async def _read_response_head(self, up_reader: asyncio.StreamReader) -> list[str]:
        try:
            async with asyncio.timeout(self._idle_timeout):
                lines = await read_head(up_reader, MAX_RESPONSE_HEAD)
        except TimeoutError:
            raise Reject(504, "upstream did not answer in time") from None
        except Reject as exc:
            raise Reject(502, f"upstream response: {exc.reason}") from None
        if lines is None:
            raise Reject(502, "upstream closed without answering")
        return lines

    async def _read_idle(self, src: asyncio.StreamReader, size: int, conn: _Conn) -> bytes:
        """Read up to ``size`` bytes; b"" at EOF or once the connection (both directions)
        has been idle for ``idle_timeout``."""
        while True:
            try:
                async with asyncio.timeout(self._idle_timeout):
                    data = await src.read(size)
            except TimeoutError:
                if time.monotonic() - conn.last_activity >= self._idle_timeout:
                    return b""
                continue
            conn.last_activity = time.monotonic()
            return data

    async def _pipe(
        self,
        src: asyncio.StreamReader,
        dst: asyncio.StreamWriter,
        conn: _Conn,
        *,
        upstream: bool,
        length: int | None = None,
    ) -> None:
        """Copy until EOF (or ``length`` bytes) with bounded reads and drain(), then
        half-close ``dst``."""
        remaining = length
        with contextlib.suppress(OSError):
            while remaining is None or remaining > 0:
                size = CHUNK if remaining is None else min(CHUNK, remaining)
                data = await self._read_idle(src, size, conn)
                if not data:
                    break
                dst.write(data)
                await dst.drain()
                if upstream:
                    conn.up += len(data)
                else:
                    conn.down += len(data)
                if remaining is not None:
                    remaining -= len(data)
            if dst.can_write_eof():
                dst.write_eof()
            else:
                dst.close()


async def _public_address(host: str, port: int) -> tuple[str, int]:
    """The address to connect to for an allowed name, resolved here once (no second lookup
    for a rebinding DNS to answer differently). A name that resolves to loopback,
    link-local (cloud metadata), multicast, unspecified or reserved space is refused: a
    wildcard rule or learn mode must not lead into the controller's host or its cloud.
    Private ranges stay reachable (an operator's internal identity provider)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    if not infos:
        raise OSError(f"{host} does not resolve")
    for *_, sockaddr in infos:
        address = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        mapped = getattr(address, "ipv4_mapped", None)
        checked = mapped or address
        if (
            checked.is_loopback
            or checked.is_link_local
            or checked.is_multicast
            or checked.is_unspecified
            or checked.is_reserved
        ):
            raise Reject(403, f"{host}:{port} resolves to a non-public address ({address})")
    first = infos[0][4]
    return str(first[0]), int(first[1])
