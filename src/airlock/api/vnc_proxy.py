"""The VNC proxy: ``WS /api/auth/session/{sessionId}/vnc?token=`` carries binary RFB between
a browser (noVNC) and the VM's VNC server, through ``Runtime.open_vnc`` (no port open to
the world).

Backpressure both ways, with nothing unbounded: VM -> browser, ``VmStream`` stops reading
the VM's socket once ``READ_HIGH_WATER`` bytes wait, and each WebSocket send waits while
uvicorn's transport is over its high-water mark; browser -> VM takes the next WebSocket
message only after the last one's bytes went into the VM socket's bounded write buffer
(uvicorn stops reading the TCP socket until the app asks for the next message). The other
buffer of our own is the client's unfinished RFB message, capped at ``rfb.MAX_CLIENT_MESSAGE``.

The client's stream is parsed message by message (``api.rfb.RfbClientFilter``), so that a
view-only token's input (keys, pointer, clipboard, resize) is dropped exactly, and a
message noVNC never sends closes the socket. ``ClientInit`` is always sent as shared, so a
second viewer never disconnects the first.

Presence: an open viewer socket is a person looking (lifecycle.md). The socket sends
``SessionService.keepalive`` on connect and is attached to the ``ViewerRegistry``
(``services.viewers``) while it proxies, which keeps it alive and stops it, with a code and
reason a page can show, when the VM is going or gone (``domain.viewers``).

Close codes: 4001 ``vm destroyed``, 4002 ``vm lost``, 4003 ``vm <state>`` (no longer
viewable otherwise), 4004 ``vnc server closed``, 4400 a client message the proxy refuses,
1001 ``controller shutting down``; 1003 for a text frame. A refused viewer is accepted and
closed at once with 4000 + the HTTP status and the error code as reason: 4401
``invalid_viewer_token`` / ``viewer_token_expired``, 4404 ``vm_not_viewable``, 4503
``runtime_failure`` (VNC not reachable yet). Nothing is proxied before the token checks.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from typing import Any, cast

from fastapi import WebSocket
from starlette.websockets import WebSocketState

from airlock.aio import TaskOwner, cancel_and_wait
from airlock.api.deps import ViewerClaims, ViewerSigner, get_core, get_viewer_signer
from airlock.api.deps import verify_viewer_token as verify_token
from airlock.api.rfb import RfbClientFilter, RfbServerFilter, RfbViolation
from airlock.errors import AirlockError
from airlock.services.core import Core
from airlock.services.viewers import ViewerRegistry, ViewerSocket, await_vm_end, keepalive

log = logging.getLogger("airlock.vnc")

CHUNK = 1024 * 1024  # the most bytes from the VM sent as one WebSocket frame
READ_HIGH_WATER = 1024 * 1024  # bytes from the VM waiting for the browser: reading pauses
WRITE_HIGH_WATER = 256 * 1024  # the VM socket's write buffer before writes wait
CLOSE_TIMEOUT_S = 2.0
VM_END_WAIT_S = 8.0  # after the VNC stream ends: how long to wait to learn the VM's fate

SERVER_OPTIONS: dict[str, Any] = {"ws_per_message_deflate": False, "proxy_headers": False}
"""What the uvicorn serving this app needs: no permessage-deflate for the proxy (RFB is
already encoded; deflating it cost two thirds of the throughput, bench/vnc_proxy.py), and
no ``X-Forwarded-For`` rewriting of the client address by uvicorn (it believes any
loopback peer): ``api.clients`` decides whose header to believe
(``AIRLOCK_TRUSTED_PROXIES``)."""

CLOSE_VNC_CLOSED = 4004  # and 4001-4003, 1001: domain.viewers
CLOSE_BAD_MESSAGE = 4400
CLOSE_TEXT_FRAME = 1003


def get_registry(ws: WebSocket) -> ViewerRegistry:
    registry = getattr(ws.app.state, "viewers", None)
    if not isinstance(registry, ViewerRegistry):
        raise RuntimeError("the app's lifespan has not started: no viewer registry")
    return registry


# --- one viewer socket --------------------------------------------------------------------
async def serve_viewer(ws: WebSocket, session_id: str, token: str | None) -> None:
    """The whole life of one viewer socket: check the token, count the viewer as present,
    open the VM's VNC stream, accept (subprotocol ``binary`` when asked), proxy, close."""
    core = get_core(ws)
    signer: ViewerSigner = get_viewer_signer(ws)
    try:
        claims = await verify_token(core, signer, session_id, token)
        await keepalive(core, session_id)  # a viewer connected: presence
        reader, writer = await core.runtime.open_vnc(claims.vm_id)
    except AirlockError as exc:
        await _deny(ws, exc)
        return
    registry = get_registry(ws)
    try:
        await _accept(ws)
    except BaseException:
        writer.close()
        raise
    sock = ViewerSocket(session_id, claims.view_only)
    registry.attach(sock)
    try:
        await _proxy(ws, sock, claims, core, reader, writer)
    finally:
        registry.detach(sock)


async def _deny(ws: WebSocket, exc: AirlockError) -> None:
    """Refuse with a close code a page can read: 4000 + the HTTP status, the error code as
    the reason. (A browser never shows a page the HTTP status of a failed handshake.)"""
    status = 503 if exc.status >= 500 else exc.status
    await _accept(ws)
    await ws.close(code=4000 + status, reason=exc.code)


async def _accept(ws: WebSocket) -> None:
    """noVNC asks for the ``binary`` subprotocol: accept it when offered."""
    offered = ws.scope.get("subprotocols", ())
    await ws.accept(subprotocol="binary" if "binary" in offered else None)


class VmStream(asyncio.Protocol):
    """The VM's VNC socket, read without ``StreamReader``'s copies: each chunk the event
    loop reads is handed on as it is (a bytes object, no buffer to grow and slice; chunks
    that queued up while the browser was slow are joined into one frame). Bounded:
    reading pauses while ``READ_HIGH_WATER`` bytes wait for the browser. Writes wait while
    the socket's write buffer is over its high-water mark."""

    def __init__(self, transport: asyncio.Transport, pending: bytes) -> None:
        self.transport = transport
        self._chunks: collections.deque[bytes] = collections.deque([pending] if pending else [])
        self._size = len(pending)
        self._eof = False
        self._paused = False
        self._readable: asyncio.Future[None] | None = None
        self._writable = asyncio.Event()
        self._writable.set()

    @classmethod
    async def take_over(
        cls, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> VmStream:
        """Move the runtime's stream to this protocol. RFB's server speaks first, so the
        first read returns; nothing else is read before ``set_protocol``, so no byte is
        left behind in the ``StreamReader``."""
        pending = await reader.read(CHUNK)
        # A socket transport reads and writes (uvloop's does not subclass asyncio's).
        transport = cast(asyncio.Transport, writer.transport)
        stream = cls(transport, pending)
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        transport.set_protocol(stream)
        if not pending:
            stream._eof = True
        return stream

    def data_received(self, data: bytes) -> None:
        self._chunks.append(data)
        self._size += len(data)
        if self._size >= READ_HIGH_WATER and not self._paused:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = True
        self._wake()
        self._writable.set()

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    def _wake(self) -> None:
        if self._readable is not None and not self._readable.done():
            self._readable.set_result(None)

    async def read(self) -> bytes:
        """The next chunk from the VM; ``b""`` at the end."""
        while not self._chunks:
            if self._eof:
                return b""
            self._readable = asyncio.get_running_loop().create_future()
            await self._readable
        data = self._chunks.popleft()
        if self._chunks and len(data) < CHUNK:  # several small reads: one frame, one copy
            parts = [data]
            size = len(data)
            while self._chunks and size + len(self._chunks[0]) <= CHUNK:
                parts.append(self._chunks.popleft())
                size += len(parts[-1])
            data = b"".join(parts)
        self._size -= len(data)
        if self._paused and self._size < READ_HIGH_WATER // 2:
            self._paused = False
            self.transport.resume_reading()
        return data

    async def write(self, data: bytes) -> None:
        if self.transport.is_closing():
            raise ConnectionResetError("the VNC server closed the connection")
        self.transport.write(data)
        await self._writable.wait()


async def _proxy(
    ws: WebSocket,
    sock: ViewerSocket,
    claims: ViewerClaims,
    core: Core,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
) -> None:
    copy_out = core.settings.viewer_copy_out and not claims.view_only
    rfb = RfbClientFilter(
        view_only=claims.view_only,
        clipboard_max=core.settings.viewer_clipboard_max,
        parseable_encodings=not copy_out,
    )
    server = None if copy_out else RfbServerFilter(rfb)
    try:
        async with asyncio.timeout(CLOSE_TIMEOUT_S * 5):
            vm = await VmStream.take_over(reader, writer)
    except (TimeoutError, OSError):
        writer.close()
        with contextlib.suppress(Exception):
            await ws.close(code=CLOSE_VNC_CLOSED, reason="vnc server not answering")
        return

    async def to_vm() -> None:
        while True:
            try:
                message = await ws.receive()
            except (OSError, RuntimeError):
                sock.stop(1000, "")
                return
            if message["type"] == "websocket.disconnect":
                sock.stop(1000, "")
                return
            data = message.get("bytes")
            if data is None:
                sock.stop(CLOSE_TEXT_FRAME, "binary frames only")
                return
            try:
                out = rfb.feed(data)
            except RfbViolation as exc:
                sock.stop(CLOSE_BAD_MESSAGE, str(exc))
                return
            if out:
                try:
                    await vm.write(out)
                except OSError:
                    break
        await vm_closed()

    async def to_browser() -> None:
        while True:
            data = await vm.read()
            if not data:
                break
            if server is not None:
                try:
                    data = server.feed(data)
                except RfbViolation as exc:
                    sock.stop(CLOSE_BAD_MESSAGE, f"server: {exc}")
                    return
                if not data:
                    continue
            try:
                await ws.send_bytes(data)
            except (OSError, RuntimeError):  # the browser went away mid-send
                sock.stop(1000, "")
                return
        await vm_closed()

    async def vm_closed() -> None:
        """The VNC server closed: say why, from the VM's state (once it is known)."""
        closing = await await_vm_end(core, sock.session_id, VM_END_WAIT_S)
        sock.stop(*(closing or (CLOSE_VNC_CLOSED, "vnc server closed")))

    tasks = TaskOwner(f"vnc:{sock.session_id}")
    pumps = [
        tasks.spawn(to_vm(), name="browser-to-vm"),
        tasks.spawn(to_browser(), name="vm-to-browser"),
    ]
    stopped = tasks.spawn(sock.stopped.wait(), name="stopped")
    client_gone = False
    try:
        await asyncio.wait([*pumps, stopped], return_when=asyncio.FIRST_COMPLETED)
        client_gone = sock.close_code == 1000 and not sock.close_reason
    finally:
        await cancel_and_wait(*pumps, stopped)
        await tasks.close()
        vm.transport.close()
        if not client_gone and ws.application_state == WebSocketState.CONNECTED:
            with contextlib.suppress(Exception):
                await ws.close(code=sock.close_code, reason=sock.close_reason)
    if rfb.dropped:
        log.info(
            "view-only viewer closed; input messages dropped",
            extra={"session_id": sock.session_id, "dropped": rfb.dropped},
        )
