"""A minimal RFB (VNC) client for tests and benchmarks: the handshake with security None,
raw-encoded framebuffer updates, key and pointer events. It speaks over a WebSocket
(``websockets``, as noVNC does through our proxy or websockify) or a plain stream (straight
to Xvnc), so the same code measures every path."""

from __future__ import annotations

import asyncio
import base64
import os
import shutil
import struct
import subprocess
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

from websockets.asyncio.client import ClientConnection

from tests.lifecycle_helpers import wait_for_blocking


class Transport(Protocol):
    async def send(self, data: bytes) -> None: ...
    async def recv(self) -> bytes: ...
    async def close(self) -> None: ...


class WsTransport:
    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws

    async def send(self, data: bytes) -> None:
        await self.ws.send(data)

    async def recv(self) -> bytes:
        data = await self.ws.recv()
        assert isinstance(data, bytes), f"expected binary frames, got {data!r}"
        return data

    async def close(self) -> None:
        await self.ws.close()


class StreamTransport:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def recv(self) -> bytes:
        data = await self.reader.read(256 * 1024)
        if not data:
            raise EOFError("the VNC server closed the connection")
        return data

    async def close(self) -> None:
        self.writer.close()


class RawWsTransport:
    """A bare WebSocket client for benchmarks: unmasked server frames are read straight
    off the stream, payload pieces handed on as they arrive (no reassembly, no copies),
    so the client costs as little as possible and the proxies are what is measured."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self._left = 0  # payload bytes of the current frame not yet read

    @classmethod
    async def connect(cls, url: str) -> RawWsTransport:
        parts = urlsplit(url)
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        key = base64.b64encode(os.urandom(16)).decode()
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        writer.write(
            f"GET {path or '/'} HTTP/1.1\r\nHost: {parts.netloc}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: binary\r\n\r\n".encode()
        )
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 101"):
            raise ConnectionError(head.split(b"\r\n")[0].decode())
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        mask = os.urandom(4)
        n = len(data)
        head = struct.pack(">BB", 0x82, 0x80 | n) if n < 126 else struct.pack(">BBH", 0x82, 0xFE, n)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
        self.writer.write(head + mask + masked)
        await self.writer.drain()

    async def recv(self) -> bytes:
        while self._left == 0:
            b0, b1 = await self.reader.readexactly(2)
            n = b1 & 0x7F
            if n == 126:
                (n,) = struct.unpack(">H", await self.reader.readexactly(2))
            elif n == 127:
                (n,) = struct.unpack(">Q", await self.reader.readexactly(8))
            if b0 & 0x0F == 0x8:
                raise EOFError("the server closed the WebSocket")
            if b0 & 0x0F in (0x9, 0xA):  # ping/pong: not ours to answer in a benchmark
                await self.reader.readexactly(n)
                continue
            self._left = n
        data = await self.reader.read(min(self._left, 1 << 20))
        if not data:
            raise EOFError("connection closed")
        self._left -= len(data)
        return data

    async def close(self) -> None:
        self.writer.close()


@dataclass
class ServerInit:
    width: int
    height: int
    bpp: int
    name: str


@dataclass
class Screenshot:
    """A framebuffer in B, G, R, X bytes per pixel (``RfbClient.true_colour``)."""

    width: int
    height: int
    bgrx: bytes

    def share(self, rgb: tuple[int, int, int], tolerance: int = 6, step: int = 3) -> float:
        """The fraction of pixels within ``tolerance`` (per channel) of colour ``rgb``, over
        every ``step``-th pixel (a sample: pure Python is slow over a million pixels)."""
        r, g, b = rgb
        data = self.bgrx
        hits = 0
        for i in range(0, len(data), 4 * step):
            if (
                abs(data[i + 2] - r) <= tolerance
                and abs(data[i + 1] - g) <= tolerance
                and abs(data[i] - b) <= tolerance
            ):
                hits += 1
        return hits / len(range(0, len(data), 4 * step))

    def difference(self, other: Screenshot, step: int = 3) -> float:
        """Mean absolute difference per colour channel (0-255) of two same-size pictures,
        over every ``step``-th pixel."""
        assert (self.width, self.height) == (other.width, other.height)
        a, b = self.bgrx, other.bgrx
        picked = range(0, len(a), 4 * step)
        total = sum(
            abs(a[i] - b[i]) + abs(a[i + 1] - b[i + 1]) + abs(a[i + 2] - b[i + 2]) for i in picked
        )
        return total / (len(picked) * 3)

    def png(self) -> bytes:
        """The picture as a PNG file (RGB, no filter), for test-artifacts/."""
        rows = bytearray()
        for y in range(self.height):
            rows.append(0)
            line = self.bgrx[y * self.width * 4 : (y + 1) * self.width * 4]
            for i in range(0, len(line), 4):
                rows += bytes((line[i + 2], line[i + 1], line[i]))

        def chunk(kind: bytes, body: bytes) -> bytes:
            crc = zlib.crc32(kind + body) & 0xFFFFFFFF
            return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

        header = struct.pack(">IIBBBBB", self.width, self.height, 8, 2, 0, 0, 0)
        return (
            b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(bytes(rows), 6))
            + chunk(b"IEND", b"")
        )


class RfbClient:
    def __init__(self, transport: Transport) -> None:
        self.t = transport
        self._buf = bytearray()
        self.init: ServerInit | None = None

    async def read(self, n: int) -> bytes:
        while len(self._buf) < n:
            self._buf += await self.t.recv()
        data = bytes(self._buf[:n])
        del self._buf[:n]
        return data

    async def skip(self, n: int) -> None:
        """Consume ``n`` bytes without keeping them (pixel data: cheap for benchmarks)."""
        have = min(n, len(self._buf))
        del self._buf[:have]
        n -= have
        while n > 0:
            data = await self.t.recv()
            if len(data) > n:
                self._buf += data[n:]
            n -= len(data)

    async def handshake(self) -> ServerInit:
        version = await self.read(12)
        assert version == b"RFB 003.008\n", version
        await self.t.send(b"RFB 003.008\n")
        count = (await self.read(1))[0]
        types = await self.read(count)
        assert 1 in types, f"security None not offered: {list(types)}"
        await self.t.send(b"\x01")
        assert await self.read(4) == b"\0\0\0\0", "security result: failed"
        await self.t.send(b"\x01")  # ClientInit: shared
        w, h = struct.unpack(">HH", await self.read(4))
        pixel_format = await self.read(16)
        (name_len,) = struct.unpack(">I", await self.read(4))
        name = (await self.read(name_len)).decode()
        self.init = ServerInit(w, h, pixel_format[0], name)
        await self.t.send(struct.pack(">BxHi", 2, 1, 0))  # SetEncodings: Raw only
        return self.init

    async def request_update(
        self,
        *,
        incremental: bool,
        x: int = 0,
        y: int = 0,
        w: int | None = None,
        h: int | None = None,
    ) -> None:
        assert self.init is not None
        await self.t.send(
            struct.pack(
                ">BBHHHH",
                3,
                int(incremental),
                x,
                y,
                self.init.width if w is None else w,
                self.init.height if h is None else h,
            )
        )

    async def _skip_to_update(self) -> None:
        """Read server messages up to the type byte of a framebuffer update."""
        while True:
            kind = (await self.read(1))[0]
            if kind == 0:
                return
            if kind == 2:  # Bell
                continue
            if kind == 3:  # ServerCutText
                _, length = struct.unpack(">3sI", await self.read(7))
                await self.read(length)
                continue
            raise AssertionError(f"unexpected server message {kind}")

    async def read_update(self) -> int:
        """Read server messages until a framebuffer update; return its pixel bytes."""
        assert self.init is not None
        await self._skip_to_update()
        (rects,) = struct.unpack(">xH", await self.read(3))
        total = 0
        for _ in range(rects):
            _x, _y, w, h, enc = struct.unpack(">HHHHi", await self.read(12))
            assert enc == 0, f"encoding {enc} (only Raw was asked for)"
            size = w * h * self.init.bpp // 8
            await self.skip(size)
            total += size
        return total

    async def true_colour(self) -> None:
        """SetPixelFormat: 32 bpp, depth 24, little-endian, red/green/blue at bits
        16/8/0, so a pixel's bytes are B, G, R, X (``screenshot`` relies on it)."""
        assert self.init is not None
        fmt = struct.pack(">BBBBHHHBBBxxx", 32, 24, 0, 1, 255, 255, 255, 16, 8, 0)
        await self.t.send(struct.pack(">Bxxx", 0) + fmt)
        self.init.bpp = 32

    async def screenshot(self) -> Screenshot:
        """The whole screen as the VNC server has it now: one full (non-incremental)
        update, its raw rectangles painted into one picture. Call ``true_colour`` first."""
        assert self.init is not None and self.init.bpp == 32  # Xvnc's default, or true_colour
        w, h = self.init.width, self.init.height
        pixels = bytearray(w * h * 4)
        await self.request_update(incremental=False)
        await self._skip_to_update()
        (rects,) = struct.unpack(">xH", await self.read(3))
        for _ in range(rects):
            x, y, rw, rh, enc = struct.unpack(">HHHHi", await self.read(12))
            if enc == -223:  # DesktopSize pseudo-rectangle: the screen changed size
                raise AssertionError("the screen changed size during a screenshot")
            assert enc == 0, f"encoding {enc} (only Raw was asked for)"
            data = await self.read(rw * rh * 4)
            for row in range(rh):
                start = ((y + row) * w + x) * 4
                pixels[start : start + rw * 4] = data[row * rw * 4 : (row + 1) * rw * 4]
        return Screenshot(w, h, bytes(pixels))

    async def read_frame(self) -> bytes:
        """A whole screen as the person sees it, as B, G, R, X bytes (``screenshot``)."""
        return (await self.screenshot()).bgrx

    def pixel(self, frame: bytes, x: int, y: int) -> tuple[int, int, int]:
        """(r, g, b) at ``x, y`` of a ``read_frame``."""
        assert self.init is not None
        i = (y * self.init.width + x) * 4
        return frame[i + 2], frame[i + 1], frame[i]

    async def key(self, keysym: int) -> None:
        await self.t.send(struct.pack(">BBxxI", 4, 1, keysym) + struct.pack(">BBxxI", 4, 0, keysym))

    async def pointer(self, x: int, y: int, buttons: int = 0) -> None:
        await self.t.send(struct.pack(">BBHH", 5, buttons, x, y))

    async def close(self) -> None:
        await self.t.close()


def start_xvnc(tmp: Path) -> tuple[subprocess.Popen[bytes], Path]:
    xvnc = shutil.which("Xvnc")
    if xvnc is None:
        raise SystemExit("Xvnc is missing: apt-get install tigervnc-standalone-server")
    display = next(n for n in range(60, 100) if not Path(f"/tmp/.X11-unix/X{n}").exists())
    path = tmp / "vnc.sock"
    argv = [xvnc, f":{display}", "-geometry", "1280x800", "-depth", "24"]
    argv += ["-rfbunixpath", str(path), "-rfbunixmode", "0600", "-rfbport", "-1"]
    argv += ["-SecurityTypes", "None", "-nolisten", "tcp"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_blocking(path.exists, timeout=20, what="Xvnc's socket comes up")
    return proc, path


def wait_until(check: Callable[[], bool], what: str, timeout: float = 20) -> None:
    """For bench/: ``wait_for_blocking`` under the name it imports."""
    wait_for_blocking(check, timeout=timeout, what=f"{what} comes up")
