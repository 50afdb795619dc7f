"""The VNC proxy: ``WS /api/auth/session/{sessionId}/vnc?token=`` carries binary RFB between
a browser (noVNC) and the VM's VNC server, through ``Runtime.open_vnc`` (no port open to
the world).

Backpressure both ways, with nothing unbounded: VM -> browser, ``VmStream`` stops reading
the VM's socket once ``READ_HIGH_WATER`` bytes wait, and each WebSocket send waits while
uvicorn's transport is over its high-water mark; browser -> VM takes the next WebSocket
message only after the last one's bytes went into the VM socket's bounded write buffer
(uvicorn stops reading the TCP socket until the app asks for the next message). The other
buffer of our own is the client's unfinished RFB message, capped at ``MAX_CLIENT_MESSAGE``.

The client's stream is parsed message by message (``RfbClientFilter``), so that a view-only
token's input (keys, pointer, clipboard, resize) is dropped exactly, and a message noVNC
never sends closes the socket. ``ClientInit`` is always sent as shared, so a second viewer
never disconnects the first.

Presence: an open viewer socket is a person looking (lifecycle.md). ``ViewerRegistry``
keeps the sockets per session and, while a session has any, one named task per session
sends ``SessionService.keepalive`` on connect and then every ``keepalive_interval`` (a few
seconds, shorter than the grace period), and watches the ``SessionBus`` (and the database
on a timer, for other controllers' changes): when the VM is going or gone every socket of
the session closes with a code and reason a page can show.

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
import struct
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, cast

from fastapi import WebSocket
from starlette.websockets import WebSocketState

from airlock.aio import TaskOwner, cancel_and_wait
from airlock.api.deps import ViewerClaims, ViewerSigner, get_core, get_viewer_signer
from airlock.api.deps import verify_viewer_token as verify_token
from airlock.domain.vms import VmState
from airlock.errors import AirlockError, NotFound
from airlock.services.core import Core

log = logging.getLogger("airlock.vnc")

CHUNK = 1024 * 1024  # the most bytes from the VM sent as one WebSocket frame
READ_HIGH_WATER = 1024 * 1024  # bytes from the VM waiting for the browser: reading pauses
WRITE_HIGH_WATER = 256 * 1024  # the VM socket's write buffer before writes wait
MAX_CLIENT_MESSAGE = 1024 * 1024  # the longest client RFB message we buffer (clipboard)
MAX_KEEPALIVE_INTERVAL_S = 5.0
MIN_KEEPALIVE_INTERVAL_S = 0.1
CLOSE_TIMEOUT_S = 2.0
VM_END_WAIT_S = 8.0  # after the VNC stream ends: how long to wait to learn the VM's fate

SERVER_OPTIONS: dict[str, Any] = {"ws_per_message_deflate": False, "proxy_headers": False}
"""What the uvicorn serving this app needs: no permessage-deflate for the proxy (RFB is
already encoded; deflating it cost two thirds of the throughput, bench/vnc_proxy.py), and
no ``X-Forwarded-For`` rewriting of the client address by uvicorn (it believes any
loopback peer): ``api.clients`` decides whose header to believe
(``AIRLOCK_TRUSTED_PROXIES``)."""

CLOSE_VM_DESTROYED = 4001
CLOSE_VM_LOST = 4002
CLOSE_VM_NOT_VIEWABLE = 4003
CLOSE_VNC_CLOSED = 4004
CLOSE_BAD_MESSAGE = 4400
CLOSE_SHUTDOWN = 1001
CLOSE_TEXT_FRAME = 1003


# --- the client's RFB stream --------------------------------------------------------------
class RfbViolation(Exception):
    """The client sent something noVNC never sends: the socket is closed."""


# Client -> server message types (RFC 6143 section 7.5, and the extensions noVNC uses with
# TigerVNC). Input types are the ones a view-only viewer must not send.
SET_PIXEL_FORMAT = 0
SET_ENCODINGS = 2
FB_UPDATE_REQUEST = 3
KEY_EVENT = 4
POINTER_EVENT = 5
CLIENT_CUT_TEXT = 6
ENABLE_CONTINUOUS_UPDATES = 150
CLIENT_FENCE = 248
XVP = 250
SET_DESKTOP_SIZE = 251
QEMU = 255  # subtype 0: QEMU extended key event
INPUT_TYPES = frozenset({KEY_EVENT, POINTER_EVENT, CLIENT_CUT_TEXT, XVP, SET_DESKTOP_SIZE, QEMU})
FIXED_SIZES = {
    SET_PIXEL_FORMAT: 20,
    FB_UPDATE_REQUEST: 10,
    KEY_EVENT: 8,
    POINTER_EVENT: 6,
    ENABLE_CONTINUOUS_UPDATES: 10,
    XVP: 4,
}


class RfbClientFilter:
    """Splits the client's byte stream into RFB messages and forwards them, dropping input
    when ``view_only``. Handshake (client side): ProtocolVersion (12 bytes), the security
    type (1 byte; none in 3.3), a VNC-auth response (16 bytes) if that type was chosen,
    ClientInit (1 byte, rewritten to shared). Only whole messages are forwarded, so a
    message is dropped or passed as a unit whatever the WebSocket framing was."""

    def __init__(
        self,
        *,
        view_only: bool,
        clipboard_max: int = MAX_CLIENT_MESSAGE,
        parseable_encodings: bool = False,
    ) -> None:
        self.view_only = view_only
        self.clipboard_max = clipboard_max
        # Ask the server only for encodings RfbServerFilter can walk (when it runs).
        self.parseable_encodings = parseable_encodings
        self.bytes_per_pixel: int | None = None  # from SetPixelFormat (else ServerInit's)
        self.security_type: int | None = None
        self._buf = bytearray()
        self._stage = "version"  # version -> security -> [auth] -> init -> messages
        self.dropped = 0

    def feed(self, data: bytes) -> bytes:
        """The bytes to send on to the VNC server now (possibly none)."""
        self._buf += data
        out = bytearray()
        buf = self._buf
        pos = 0
        while True:
            size = self._next_size(buf, pos)
            if size is not None and size > MAX_CLIENT_MESSAGE:
                raise RfbViolation("client message too long")
            if size is None or len(buf) - pos < size:
                break
            message = buf[pos : pos + size]
            pos += size
            if self._stage == "messages":
                if self.view_only and message[0] in INPUT_TYPES:
                    self.dropped += 1
                    continue
                if message[0] == CLIENT_CUT_TEXT and len(message) - 8 > self.clipboard_max:
                    self.dropped += 1  # a paste over the cap: dropped, never logged
                    continue
                if message[0] == SET_PIXEL_FORMAT:
                    self.bytes_per_pixel = message[4] // 8
                if message[0] == SET_ENCODINGS and self.parseable_encodings:
                    message = _parseable(message)
                out += message
            else:
                out += self._handshake(message)
        del buf[:pos]
        if len(buf) > MAX_CLIENT_MESSAGE:
            raise RfbViolation("client message too long")
        return bytes(out)

    def _handshake(self, message: bytearray) -> bytes:
        if self._stage == "version":
            if message[:4] != b"RFB " or message[11:12] != b"\n":
                raise RfbViolation("not an RFB client")
            minor = message[8:11]
            self._stage = "init" if minor == b"003" else "security"
        elif self._stage == "security":
            self.security_type = message[0]
            if message[0] == 2:
                self._stage = "auth"
            elif message[0] == 1:
                self._stage = "init"
            else:
                raise RfbViolation(f"unsupported security type {message[0]}")
        elif self._stage == "auth":
            self._stage = "init"
        else:  # init: ClientInit's shared-flag, always shared
            self._stage = "messages"
            return b"\x01"
        return bytes(message)

    def _next_size(self, buf: bytearray, pos: int) -> int | None:
        """The length of the message at ``pos``; None until enough of it is there to tell."""
        stage = self._stage
        if stage != "messages":
            return {"version": 12, "security": 1, "auth": 16, "init": 1}[stage]
        if len(buf) <= pos:
            return None
        kind = buf[pos]
        fixed = FIXED_SIZES.get(kind)
        if fixed is not None:
            return fixed
        avail = len(buf) - pos
        if kind == SET_ENCODINGS:
            return None if avail < 4 else 4 + 4 * struct.unpack_from(">H", buf, pos + 2)[0]
        if kind == CLIENT_CUT_TEXT:  # a negative length: the extended clipboard format
            return None if avail < 8 else 8 + abs(struct.unpack_from(">i", buf, pos + 4)[0])
        if kind == CLIENT_FENCE:
            return None if avail < 9 else 9 + buf[pos + 8]
        if kind == SET_DESKTOP_SIZE:
            return None if avail < 8 else 8 + 16 * buf[pos + 6]
        if kind == QEMU:
            if avail < 2:
                return None
            if buf[pos + 1] != 0:
                raise RfbViolation(f"unsupported QEMU message subtype {buf[pos + 1]}")
            return 12
        raise RfbViolation(f"unknown client message type {kind}")


# --- the server's RFB stream (only where the clipboard must not reach the browser) --------
# Encodings RfbServerFilter can walk without decoding: each rectangle's length follows from
# its header (Raw, Cursor), is fixed (CopyRect, DesktopSize, ...) or is given (ZRLE).
ENC_RAW, ENC_COPYRECT, ENC_ZRLE = 0, 1, 16
ENC_DESKTOP_SIZE, ENC_LAST_RECT, ENC_CURSOR = -223, -224, -239
ENC_QEMU_KEY, ENC_QEMU_LED = -258, -261
ENC_DESKTOP_NAME, ENC_EXT_DESKTOP_SIZE, ENC_FENCE, ENC_CONTINUOUS = -307, -308, -312, -313
ENC_EXT_CLIPBOARD = -1063131698  # 0xC0A1E5CE
PARSEABLE = frozenset(
    {
        ENC_RAW,
        ENC_COPYRECT,
        ENC_ZRLE,
        ENC_DESKTOP_SIZE,
        ENC_LAST_RECT,
        ENC_CURSOR,
        ENC_QEMU_KEY,
        ENC_QEMU_LED,
        ENC_DESKTOP_NAME,
        ENC_EXT_DESKTOP_SIZE,
        ENC_FENCE,
        ENC_CONTINUOUS,
        ENC_EXT_CLIPBOARD,  # its messages are walked: what carries text is dropped
        *range(-32, -22),  # JPEG quality levels: hints only
        *range(-256, -246),  # compression levels: hints only
    }
)
SERVER_CUT_TEXT = 3
# Extended clipboard actions (the flags' top byte): the server may send its caps (which
# list every action it supports, and sizes, no text) and ask for the client's text
# (request, peek: a paste needs that); it may not announce or send its own (notify, provide).
EXT_CAPS = 1 << 24
EXT_ASK = (1 << 25) | (1 << 26)


def _parseable(message: bytearray) -> bytearray:
    """SetEncodings with only the encodings in ``PARSEABLE`` (ZRLE first: the server uses
    the first it supports)."""
    count = struct.unpack_from(">H", message, 2)[0]
    wanted = [e for e in struct.unpack_from(f">{count}i", message, 4) if e in PARSEABLE]
    wanted.sort(key=lambda e: e != ENC_ZRLE)
    if ENC_RAW not in wanted:
        wanted.append(ENC_RAW)
    return bytearray(struct.pack(f">BxH{len(wanted)}i", SET_ENCODINGS, len(wanted), *wanted))


class RfbServerFilter:
    """Walks the server's byte stream message by message and drops ServerCutText: the
    remote clipboard does not reach a view-only viewer, nor anyone when copy-out is off
    (``AIRLOCK_VIEWER_COPY_OUT``). Pixel data passes through as it comes, never buffered;
    only headers are. Needs the client's SetEncodings rewritten (``_parseable``), and the
    client's pixel format from ``client``; anything else it meets closes the socket."""

    def __init__(self, client: RfbClientFilter) -> None:
        self.client = client
        self._buf = bytearray()
        self._pass = 0  # bytes to forward as they are (pixel data)
        self._skip = 0  # bytes to drop as they come (cut text)
        self._stage = "version"
        self._rects = 0  # rectangles left in the current FramebufferUpdate
        self._bpp = 4
        self.dropped = 0

    def feed(self, data: bytes) -> bytes:
        self._buf += data
        out = bytearray()
        while True:
            if self._pass:
                n = min(self._pass, len(self._buf))
                out += self._buf[:n]
                del self._buf[:n]
                self._pass -= n
                if self._pass:
                    break
                continue
            if self._skip:
                n = min(self._skip, len(self._buf))
                del self._buf[:n]
                self._skip -= n
                if self._skip:
                    break
                continue
            step = self._step()
            if step is None:
                break
            head, keep, then_pass, then_skip = step
            if keep:
                out += self._buf[:head]
            del self._buf[:head]
            self._pass, self._skip = then_pass, then_skip
        if len(self._buf) > MAX_CLIENT_MESSAGE:
            raise RfbViolation("server header too long")
        return bytes(out)

    def _step(self) -> tuple[int, bool, int, int] | None:
        """The next unit at the buffer's start: (header bytes, forward them?, bytes to pass
        after, bytes to drop after); None until the header is complete."""
        buf, avail = self._buf, len(self._buf)
        stage = self._stage
        if stage == "version":
            if avail < 12:
                return None
            self._stage = "security" if buf[8:11] != b"003" else "security33"
            return 12, True, 0, 0
        if stage == "security":  # 3.7/3.8: a list of types; the client picks one
            if avail < 1 or avail < 1 + buf[0]:
                return None
            if buf[0] == 0:
                raise RfbViolation("the server refused the connection")
            self._stage = "chosen"
            return 1 + buf[0], True, 0, 0
        if stage == "security33":  # 3.3: the server says the type
            if avail < 4:
                return None
            self._stage = "challenge" if buf[3] == 2 else "init"
            return 4, True, 0, 0
        if stage == "chosen":  # the client's pick went through RfbClientFilter first
            if avail < 1:
                return None
            self._stage = "challenge" if self.client.security_type == 2 else "result"
            return 0, True, 0, 0
        if stage == "challenge":  # VNC auth: 16 bytes, then the result
            if avail < 16:
                return None
            self._stage = "result"
            return 16, True, 0, 0
        if stage == "result":
            if avail < 4:
                return None
            if struct.unpack_from(">I", buf, 0)[0] != 0:
                raise RfbViolation("security handshake failed")
            self._stage = "init"
            return 4, True, 0, 0
        if stage == "init":
            if avail < 24:
                return None
            self._bpp = buf[4] // 8
            name = struct.unpack_from(">I", buf, 20)[0]
            self._stage = "messages"
            return 24, True, name, 0
        if self._rects:
            return self._rect()
        if avail < 1:
            return None
        kind = buf[0]
        if kind == 0:  # FramebufferUpdate
            if avail < 4:
                return None
            self._rects = struct.unpack_from(">H", buf, 2)[0]
            self._bpp = self.client.bytes_per_pixel or self._bpp
            return 4, True, 0, 0
        if kind == 1:  # SetColourMapEntries
            if avail < 6:
                return None
            return 6, True, 6 * struct.unpack_from(">H", buf, 4)[0], 0
        if kind in (2, 150):  # Bell, EndOfContinuousUpdates
            return 1, True, 0, 0
        if kind == SERVER_CUT_TEXT:
            if avail < 8:
                return None
            length = struct.unpack_from(">i", buf, 4)[0]
            if length <= -4:  # extended: its flags say what it carries
                if avail < 12:
                    return None
                actions = struct.unpack_from(">I", buf, 8)[0] & 0xFF000000
                if actions & EXT_CAPS or (actions and not actions & ~EXT_ASK):
                    return 12, True, -length - 4, 0  # caps, request, peek: no text
            self.dropped += 1
            return 8, False, 0, abs(length)
        if kind == CLIENT_FENCE:  # ServerFence has the same number and shape
            if avail < 9:
                return None
            return 9, True, buf[8], 0
        if kind == XVP:
            return 4, True, 0, 0
        raise RfbViolation(f"unknown server message type {kind}")

    def _rect(self) -> tuple[int, bool, int, int] | None:
        buf, avail = self._buf, len(self._buf)
        if avail < 12:
            return None
        _, _, w, h, enc = struct.unpack_from(">HHHHi", buf, 0)
        self._rects -= 1
        if enc == ENC_RAW:
            return 12, True, w * h * self._bpp, 0
        if enc == ENC_COPYRECT:
            return 12, True, 4, 0
        if enc == ENC_CURSOR:
            return 12, True, w * h * self._bpp + (w + 7) // 8 * h, 0
        if enc == ENC_QEMU_LED:
            return 12, True, 1, 0
        if enc in (ENC_DESKTOP_SIZE, ENC_QEMU_KEY, ENC_FENCE, ENC_CONTINUOUS):
            return 12, True, 0, 0
        if enc == ENC_LAST_RECT:
            self._rects = 0
            return 12, True, 0, 0
        # Variable: the header is followed by a length (or a count) to read first.
        if enc in (ENC_ZRLE, ENC_DESKTOP_NAME):
            if avail < 16:
                self._rects += 1
                return None
            return 16, True, struct.unpack_from(">I", buf, 12)[0], 0
        if enc == ENC_EXT_DESKTOP_SIZE:
            if avail < 16:
                self._rects += 1
                return None
            return 16, True, 16 * buf[12], 0
        raise RfbViolation(f"the server used encoding {enc}, which was not asked for")


# --- presence and the VM's end, per session -----------------------------------------------
def keepalive_interval(core: Core) -> float:
    """Often enough that an open socket keeps a draining VM (grace_success) and a running
    one (idle_extension) alive; at most every few seconds, never per message."""
    s = core.settings
    shortest = min(s.grace_success, s.idle_extension, timedelta(seconds=15)).total_seconds()
    return max(MIN_KEEPALIVE_INTERVAL_S, min(MAX_KEEPALIVE_INTERVAL_S, shortest / 3))


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


def close_for(state: VmState) -> tuple[int, str] | None:
    """How a viewer socket closes when its VM is in ``state``; None while viewable."""
    if state in (VmState.CREATING, VmState.RUNNING, VmState.DRAINING):
        return None
    if state in (VmState.DESTROYING, VmState.DESTROYED):
        return CLOSE_VM_DESTROYED, "vm destroyed"
    if state == VmState.LOST:
        return CLOSE_VM_LOST, "vm lost"
    return CLOSE_VM_NOT_VIEWABLE, f"vm {state.value}"


class ViewerRegistry:
    """The open viewer sockets of this controller, per session, and one watcher task per
    session that has any (owned here; ``close`` stops every socket and task)."""

    def __init__(self, core: Core) -> None:
        self.core = core
        self.tasks = TaskOwner("viewers")
        self._sockets: dict[str, set[ViewerSocket]] = {}
        self._watchers: dict[str, asyncio.Task[None]] = {}
        self.interval = keepalive_interval(core)

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
                _, vm = await sessions.get(session_id, None)
                closing = close_for(VmState(vm.state)) if vm is not None else None
                if vm is None:
                    closing = CLOSE_VM_DESTROYED, "vm destroyed"
                if closing is not None:
                    self._stop_all(session_id, *closing)
                    return
                if clock.monotonic() - last_keepalive >= self.interval:
                    last_keepalive = clock.monotonic()
                    await sessions.keepalive(session_id, None)
            except NotFound:
                self._stop_all(session_id, CLOSE_VM_DESTROYED, "vm destroyed")
                return
            except Exception:  # a database hiccup must not drop the viewers: retry
                log.warning("viewer watcher failed; retrying", exc_info=True)
                await asyncio.sleep(self.interval)

    async def close(self) -> None:
        """Shutdown: every socket closes with 1001, every watcher stops."""
        for session_id in list(self._sockets):
            self._stop_all(session_id, CLOSE_SHUTDOWN, "controller shutting down")
        await self.tasks.close()


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
        await core.sessions.keepalive(session_id, None)  # a viewer connected: presence
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
        """The VNC server closed: say why, from the VM's state. A VM that died is marked
        ``lost`` only at the reconciler's next round, so wait for that (briefly) first."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + VM_END_WAIT_S
        version = core.bus.version(sock.session_id)
        while True:
            try:
                _, vm = await core.sessions.get(sock.session_id, None)
                closing = close_for(VmState(vm.state)) if vm is not None else None
            except AirlockError:
                closing = None
            left = deadline - loop.time()
            if closing is not None or left <= 0:
                break
            version = await core.bus.wait(sock.session_id, version, min(left, 0.5))
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
