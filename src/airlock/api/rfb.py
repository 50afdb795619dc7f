"""RFB (RFC 6143) as the VNC proxy reads it, sans-I/O: bytes in, bytes out.

``RfbClientFilter`` splits the browser's stream into whole messages, so that a view-only
viewer's input (keys, pointer, clipboard, resize) is dropped exactly, a message noVNC never
sends is refused (``RfbViolation``: the proxy closes the socket), and ``ClientInit`` is
always sent as shared, so a second viewer never disconnects the first. ``RfbServerFilter``
walks the server's stream, when the viewer may not copy out, to drop the remote clipboard
(only encodings it can walk are asked for). What each buffers is one unfinished message's
head, capped at ``MAX_CLIENT_MESSAGE``.
"""

from __future__ import annotations

import struct

MAX_CLIENT_MESSAGE = 1024 * 1024  # the longest client RFB message we buffer (clipboard)


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
