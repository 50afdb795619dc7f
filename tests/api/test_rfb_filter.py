"""The VNC proxy's parser of the client's RFB stream: message boundaries hold whatever the
WebSocket framing, a view-only viewer's input messages are dropped exactly (and nothing
else), ClientInit is always shared, and a message noVNC never sends is refused."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from airlock.api.vnc_proxy import MAX_CLIENT_MESSAGE, RfbClientFilter, RfbViolation

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
