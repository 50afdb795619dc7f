"""The VNC proxy's parser of the client's RFB stream: message boundaries hold whatever the
WebSocket framing, a view-only viewer's input messages are dropped exactly (and nothing
else), ClientInit is always shared, and a message noVNC never sends is refused."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from airlock.api.rfb import (
    MAX_CLIENT_MESSAGE,
    RfbClientFilter,
    RfbServerFilter,
    RfbViolation,
)

HANDSHAKE = b"RFB 003.008\n" + b"\x01" + b"\x00"  # version, security None, ClientInit exclusive
FORWARDED_HANDSHAKE = b"RFB 003.008\n" + b"\x01" + b"\x01"  # ... always shared

MESSAGES: dict[str, tuple[bytes, bool]] = {  # name: (bytes, is input)
    "set_pixel_format": (b"\x00" + b"\0" * 19, False),
    "set_encodings": (struct.pack(">BxH3i", 2, 3, 0, 7, -223), False),
    "fb_update_request": (struct.pack(">BBHHHH", 3, 1, 0, 0, 1280, 800), False),
    "key": (struct.pack(">BBxxI", 4, 1, 0x61), True),
    "pointer": (struct.pack(">BBHH", 5, 1, 10, 10), True),
    "cut_text": (struct.pack(">BxxxI", 6, 5) + b"hello", True),
    "cut_text_extended": (struct.pack(">Bxxxi", 6, -8) + b"\0" * 8, True),
    "continuous_updates": (struct.pack(">BBHHHH", 150, 1, 0, 0, 1280, 800), False),
    "fence": (struct.pack(">BxxxIB", 248, 0, 3) + b"abc", False),
    "xvp": (struct.pack(">BxBB", 250, 1, 2), True),
    "set_desktop_size": (struct.pack(">BxHHBx", 251, 1024, 768, 1) + b"\0" * 16, True),
    "qemu_key": (struct.pack(">BBHII", 255, 0, 1, 0x61, 30), True),
}


def run(chunks: list[bytes], *, view_only: bool) -> bytes:
    rfb = RfbClientFilter(view_only=view_only)
    return b"".join(rfb.feed(c) for c in chunks)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


@given(
    names=st.lists(st.sampled_from(sorted(MESSAGES)), max_size=30),
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=20),
    view_only=st.booleans(),
)
def test_whole_messages_pass_and_view_only_input_is_dropped(
    names: list[str], cuts: list[int], view_only: bool
) -> None:
    stream = HANDSHAKE + b"".join(MESSAGES[n][0] for n in names)
    expected = FORWARDED_HANDSHAKE + b"".join(
        MESSAGES[n][0] for n in names if not (view_only and MESSAGES[n][1])
    )
    assert run(split(stream, cuts), view_only=view_only) == expected


def test_a_half_message_waits_for_the_rest() -> None:
    rfb = RfbClientFilter(view_only=False)
    assert rfb.feed(HANDSHAKE) == FORWARDED_HANDSHAKE
    key = MESSAGES["key"][0]
    assert rfb.feed(key[:3]) == b""
    assert rfb.feed(key[3:]) == key


def test_rfb_3_3_has_no_security_byte_and_vnc_auth_a_response() -> None:
    assert run([b"RFB 003.003\n\x00"], view_only=True) == b"RFB 003.003\n\x01"
    auth = b"RFB 003.008\n\x02" + b"r" * 16 + b"\x01"
    assert run([auth], view_only=True) == auth


@pytest.mark.parametrize(
    ("stream", "why"),
    [
        (b"HTTP/1.1 200\n", "not an RFB client"),
        (b"RFB 003.008\n\x10", "unsupported security type 16"),
        (HANDSHAKE + b"\x07", "unknown client message type 7"),
        (HANDSHAKE + b"\xff\x01", "unsupported QEMU message subtype 1"),
        (HANDSHAKE + struct.pack(">BxxxI", 6, MAX_CLIENT_MESSAGE + 1), "too long"),
    ],
)
def test_what_novnc_never_sends_is_refused(stream: bytes, why: str) -> None:
    with pytest.raises(RfbViolation, match=why):
        run([stream], view_only=False)


# --- the server's stream, where the clipboard must not reach the browser -------------------
SERVER_HANDSHAKE = (
    b"RFB 003.008\n"
    + b"\x01\x01"  # one security type: None
    + b"\0\0\0\0"  # SecurityResult: ok
    + struct.pack(">HH", 1280, 800)
    + bytes([32, 24, 0, 1, 0, 255, 0, 255, 0, 255, 16, 8, 0, 0, 0, 0])
    + struct.pack(">I", 7)
    + b"airlock"
)
CUT = struct.pack(">BxxxI", 3, 11) + b"device-code"
CUT_EXTENDED = struct.pack(">BxxxiI", 3, -6, (1 << 28) | 1) + b"xy"  # provide: text
NOTIFY = struct.pack(">BxxxiI", 3, -4, (1 << 27) | 1)  # notify: the server has text
CAPS = struct.pack(">BxxxiI", 3, -8, (1 << 24) | (1 << 25) | (1 << 27) | 1) + b"\0\0\x10\0"
REQUEST = struct.pack(">BxxxiI", 3, -4, (1 << 25) | 1)  # the server asks for a paste


def rect(x: int, y: int, w: int, h: int, enc: int, payload: bytes) -> bytes:
    return struct.pack(">HHHHi", x, y, w, h, enc) + payload


UPDATE = (
    struct.pack(">BxH", 0, 6)
    + rect(0, 0, 2, 2, 0, b"\x11" * 16)  # Raw, 32 bpp
    + rect(0, 0, 4, 4, 16, struct.pack(">I", 5) + b"zrle!")
    + rect(1, 1, 2, 2, 1, struct.pack(">HH", 0, 0))  # CopyRect
    + rect(0, 0, 3, 2, -239, b"\x22" * 24 + b"\x80\x80")  # Cursor: pixels + mask
    + rect(0, 0, 800, 600, -308, struct.pack(">Bxxx", 1) + b"\0" * 16)
    + rect(0, 0, 0, 0, -224, b"")  # LastRect
)
SERVER_STREAM = [
    SERVER_HANDSHAKE,
    CAPS,
    UPDATE,
    CUT,
    b"\x02",
    CUT_EXTENDED,
    NOTIFY,
    REQUEST,
    UPDATE,
]
CLIENT_SIDE = HANDSHAKE + struct.pack(">BxH2i", 2, 2, 16, 7)  # ... and SetEncodings


def server_run(chunks: list[bytes]) -> tuple[bytes, RfbClientFilter]:
    client = RfbClientFilter(view_only=False, parseable_encodings=True)
    client.feed(CLIENT_SIDE)
    server = RfbServerFilter(client)
    return b"".join(server.feed(c) for c in chunks), client


@given(st.lists(st.integers(min_value=0), max_size=12))
def test_server_cut_text_is_dropped_and_all_else_passes_however_split(cuts: list[int]) -> None:
    data = b"".join(SERVER_STREAM)
    out, _ = server_run(split(data, cuts))
    # Caps and a request for the client's paste pass; text and its announcements do not.
    assert out == SERVER_HANDSHAKE + CAPS + UPDATE + b"\x02" + REQUEST + UPDATE
    assert b"device-code" not in out and b"xy" not in out


def test_the_client_asks_only_for_encodings_the_server_filter_walks() -> None:
    client = RfbClientFilter(view_only=False, parseable_encodings=True)
    # noVNC's list: Tight, TightPNG, ZRLE, Hextile, CopyRect, Raw, then pseudo-encodings
    # (quality, DesktopSize, LastRect, Cursor, ExtendedClipboard, VMware cursor).
    asked = [7, -260, 16, 5, 1, 0, -26, -223, -224, -239, -1063131698, 0x574D5664]
    out = client.feed(HANDSHAKE + struct.pack(f">BxH{len(asked)}i", 2, len(asked), *asked))
    count = struct.unpack_from(">H", out, 16)[0]
    assert list(struct.unpack_from(f">{count}i", out, 18)) == [
        16,
        1,
        0,
        -26,
        -223,
        -224,
        -239,
        -1063131698,
    ]


def test_an_encoding_that_was_not_asked_for_closes_the_stream() -> None:
    hextile = struct.pack(">BxH", 0, 1) + rect(0, 0, 16, 16, 5, b"\0")
    with pytest.raises(RfbViolation, match="encoding 5"):
        server_run([SERVER_HANDSHAKE, hextile])


def test_a_paste_over_the_cap_is_dropped() -> None:
    client = RfbClientFilter(view_only=False, clipboard_max=4)
    small = struct.pack(">BxxxI", 6, 4) + b"abcd"
    big = struct.pack(">BxxxI", 6, 5) + b"abcde"
    out = client.feed(HANDSHAKE + small + big + MESSAGES["key"][0])
    assert out == FORWARDED_HANDSHAKE + small + MESSAGES["key"][0]
    assert client.dropped == 1
