"""Just enough of the X11 core protocol for the guest agent to manage the kiosk window.

The browser VM runs Chromium on Xvnc with no window manager. Two things a window manager
would do, the agent does itself, in the standard library, over Xvnc's Unix socket (no
authorisation on it; the socket lives in the VM's private /tmp):

- **fit**: Chromium keeps its window size when a viewer resizes the screen (RandR); the
  agent moves and resizes the top-level window to cover the new screen (ConfigureWindow).
- **focus**: with no window manager the X input focus stays ``PointerRoot`` and follows
  the pointer; the agent gives the kiosk window the focus, as a window manager would, so
  keys reach it wherever the viewer's pointer is.

- **keymap**: the keysyms of European layouts are put on the keymap before Chromium starts
  (``preload_keymap``), so none needs the on-the-fly keymap change that Chromium misses.

Little-endian requests only; every call ends with a round trip, so an X error surfaces as
an ``OSError`` of the call that caused it.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

OP_GET_WINDOW_ATTRIBUTES = 3
OP_CONFIGURE_WINDOW = 12
OP_GET_GEOMETRY = 14
OP_QUERY_TREE = 15
OP_SET_INPUT_FOCUS = 42
OP_GET_INPUT_FOCUS = 43
OP_CHANGE_KEYBOARD_MAPPING = 100
OP_GET_KEYBOARD_MAPPING = 101
MAP_STATE_VIEWABLE = 2
REVERT_TO_POINTER_ROOT = 1
CW_X, CW_Y, CW_WIDTH, CW_HEIGHT = 1, 2, 4, 8
XF86_KEYSYMS = 0x1008FE00  # vendor keysyms from here on: media, launcher, power keys


@dataclass(frozen=True, slots=True)
class Window:
    wid: int
    x: int
    y: int
    width: int
    height: int


class XConnection:
    """One connection to the X server: the setup, then requests with their replies."""

    def __init__(self, path: str, timeout: float = 2.0) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        self._seq = 0
        try:
            self._sock.connect(path)
            self._sock.sendall(struct.pack("<BxHHHHxx", ord("l"), 11, 0, 0, 0))
            head = self._read(8)
            if head[0] != 1:
                raise OSError("the X server refused the connection")
            body = self._read(struct.unpack_from("<H", head, 6)[0] * 4)
        except BaseException:
            self._sock.close()
            raise
        vendor_len, formats = struct.unpack_from("<H", body, 16)[0], body[21]
        screen = 32 + (vendor_len + 3) // 4 * 4 + 8 * formats  # the first SCREEN
        self.min_keycode, self.max_keycode = body[26], body[27]
        self.root = struct.unpack_from("<I", body, screen)[0]
        self.width, self.height = struct.unpack_from("<HH", body, screen + 20)

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> XConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _read(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self._sock.recv(n - len(buf))
            if not chunk:
                raise OSError("the X server closed the connection")
            buf += chunk
        return bytes(buf)

    def _send(self, opcode: int, data: int, body: bytes) -> int:
        self._sock.sendall(struct.pack("<BBH", opcode, data, 1 + len(body) // 4) + body)
        self._seq = (self._seq + 1) & 0xFFFF
        return self._seq

    def _reply(self, seq: int) -> bytes:
        """The reply to request ``seq``; an error for it (or an earlier one) raises."""
        while True:
            packet = self._read(32)
            kind = packet[0]
            if kind == 0:
                code, bad_seq = packet[1], struct.unpack_from("<H", packet, 2)[0]
                raise OSError(f"X error {code} for request {bad_seq}")
            if kind == 1:
                extra = self._read(struct.unpack_from("<I", packet, 4)[0] * 4)
                if struct.unpack_from("<H", packet, 2)[0] == seq:
                    return packet + extra
                continue
            # an event (we select none, but the server may send some): skip it

    def sync(self) -> None:
        """A round trip: every request sent so far has been processed (or raised)."""
        self._reply(self._send(OP_GET_INPUT_FOCUS, 0, b""))

    def children(self, window: int) -> list[int]:
        reply = self._reply(self._send(OP_QUERY_TREE, 0, struct.pack("<I", window)))
        count = struct.unpack_from("<H", reply, 16)[0]
        return list(struct.unpack_from(f"<{count}I", reply, 32))

    def viewable(self, window: int) -> bool:
        """Mapped and not override-redirect: a top-level window, not a menu or tooltip."""
        reply = self._reply(self._send(OP_GET_WINDOW_ATTRIBUTES, 0, struct.pack("<I", window)))
        return reply[26] == MAP_STATE_VIEWABLE and reply[27] == 0

    def geometry(self, window: int) -> Window:
        reply = self._reply(self._send(OP_GET_GEOMETRY, 0, struct.pack("<I", window)))
        x, y, w, h = struct.unpack_from("<hhHH", reply, 12)
        return Window(window, x, y, w, h)

    def top_level(self) -> Window | None:
        """The largest viewable top-level window (Chromium's kiosk window), if any."""
        found = [self.geometry(w) for w in self.children(self.root) if self.viewable(w)]
        return max(found, key=lambda w: w.width * w.height, default=None)

    def configure(self, window: int, x: int, y: int, width: int, height: int) -> None:
        values = struct.pack("<iiII", x, y, width, height)
        mask = CW_X | CW_Y | CW_WIDTH | CW_HEIGHT
        self._send(OP_CONFIGURE_WINDOW, 0, struct.pack("<IHxx", window, mask) + values)
        self.sync()

    def focus(self, window: int) -> None:
        self._send(OP_SET_INPUT_FOCUS, REVERT_TO_POINTER_ROOT, struct.pack("<II", window, 0))
        self.sync()

    def keyboard_mapping(self) -> tuple[int, list[list[int]]]:
        """(keysyms per keycode, the keysyms of each keycode from ``min_keycode`` on)."""
        count = self.max_keycode - self.min_keycode + 1
        body = struct.pack("<BBxx", self.min_keycode, count)
        reply = self._reply(self._send(OP_GET_KEYBOARD_MAPPING, 0, body))
        per = reply[1]
        syms = struct.unpack_from(f"<{count * per}I", reply, 32)
        return per, [list(syms[i * per : (i + 1) * per]) for i in range(count)]

    def map_keysyms(self, keysyms: list[int]) -> int:
        """Put the ``keysyms`` the keymap lacks on free keycodes (none, or only XF86 media
        and launcher keys, which nobody sends to a kiosk browser through VNC), two to a
        keycode in the order given (plain, shifted: a letter and its capital). Returns how
        many were added."""
        per, mapping = self.keyboard_mapping()
        have = {k for row in mapping for k in row}
        missing = [k for k in keysyms if k and k not in have]
        free = [  # not keycode 8: XKB does not press it
            i
            for i, row in enumerate(mapping)
            if self.min_keycode + i > 8 and all(k == 0 or k >= XF86_KEYSYMS for k in row)
        ]
        added = 0
        for index in free:
            pair, missing = missing[:2], missing[2:]
            if not pair:
                break
            row = (pair + [0] * per)[:per]
            body = struct.pack(f"<BBxx{per}I", self.min_keycode + index, per, *row)
            self._send(OP_CHANGE_KEYBOARD_MAPPING, 1, body)
            added += len(pair)
        self.sync()
        return added

    def focused(self) -> int:
        reply = self._reply(self._send(OP_GET_INPUT_FOCUS, 0, b""))
        return int(struct.unpack_from("<I", reply, 8)[0])


# Keysyms a person types on European keyboards that a US keymap lacks: Latin-1's letters and
# signs (keysym = code point) and the euro sign. On the keymap before Chromium starts: Xvnc
# would add each one on its first use, and Chromium misses a key press that comes right
# after a keymap change (measured: at 25 ms between keys, "Pässwörd-@€#1" arrived as
# "Pässwrd-@#1"; the second time, once mapped, whole).
PRELOADED_KEYSYMS = [
    *(k for lower in range(0xE0, 0xFF) if lower != 0xF7 for k in (lower, lower - 0x20)),
    *range(0xA0, 0xC0),  # signs: ¡ ¢ £ ¤ ¥ § « ° ± µ ...
    *(0xD7, 0xDF, 0xF7, 0xFF),  # multiplication sign, sharp s, division sign, y diaeresis
    0x20AC,  # €
]


def preload_keymap(path: str) -> int:
    """Map ``PRELOADED_KEYSYMS`` on the X server at ``path``; how many were added."""
    with XConnection(path) as x:
        return x.map_keysyms(PRELOADED_KEYSYMS)


def fit_and_focus(path: str) -> tuple[int, int] | bool:
    """Make the kiosk window cover the screen and give it the input focus. Returns the
    screen size it fitted; while there is no window to fit yet, whether a client has made
    any window at all (Chromium's browser process makes its first ones early in its start,
    as early as it used to open its DevTools port). Blocking; idempotent."""
    with XConnection(path) as x:
        window = x.top_level()
        if window is None:
            return bool(x.children(x.root))
        if (window.x, window.y, window.width, window.height) != (0, 0, x.width, x.height):
            x.configure(window.wid, 0, 0, x.width, x.height)
        if x.focused() != window.wid:
            x.focus(window.wid)
        return x.width, x.height
