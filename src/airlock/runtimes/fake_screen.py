"""The fake runtime's screen: an RFB 3.8 server (security None, raw encoding, 32 bits a
pixel) that shows one grey picture and remembers the keys it was sent, so the viewer page
and the VNC proxy work against fake VMs too."""

from __future__ import annotations

import asyncio
import struct
from typing import ClassVar

from airlock.runtimes.fake_agent import FakeVm

GREY = (0x44, 0x44, 0x44)  # the fake screen's one colour
MAX_CUT_TEXT = 1024 * 1024  # the longest paste the fake screen takes


class FakeScreen:
    """A fake VM's VNC server: RFB 3.8 with security None; one grey picture in raw encoding
    at 32 bits a pixel (any channel layout the client asks for); key presses remembered.
    Enough for the viewer page, the VNC proxy and a test that types."""

    # client message type -> bytes after the type byte (ClientCutText's text comes after)
    SIZES: ClassVar[dict[int, int]] = {0: 19, 2: 3, 3: 9, 4: 7, 5: 5, 6: 7}

    def __init__(self, vm: FakeVm) -> None:
        self.vm = vm
        self.pixel = self._pixel(32, False, 255, 255, 255, 16, 8, 0)

    @staticmethod
    def _pixel(
        bpp: int, big: bool, rmax: int, gmax: int, bmax: int, rs: int, gs: int, bs: int
    ) -> bytes:
        r, g, b = GREY
        value = (r * rmax // 255) << rs | (g * gmax // 255) << gs | (b * bmax // 255) << bs
        return value.to_bytes(bpp // 8, "big" if big else "little")

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._session(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass
        except asyncio.CancelledError:
            pass  # the VM was destroyed: its screen goes with it
        finally:
            writer.close()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        width, height = self.vm.screen
        writer.write(b"RFB 003.008\n")
        if not (await reader.readexactly(12)).startswith(b"RFB 003."):
            return
        writer.write(b"\x01\x01")  # one security type: None
        if await reader.readexactly(1) != b"\x01":
            return
        writer.write(struct.pack(">I", 0))  # SecurityResult: OK
        await reader.readexactly(1)  # ClientInit (shared or not: all are)
        name = f"airlock fake VM {self.vm.vm_id}".encode()
        pixel_format = struct.pack(">BBBBHHHBBBxxx", 32, 24, 0, 1, 255, 255, 255, 16, 8, 0)
        writer.write(struct.pack(">HH", width, height) + pixel_format)
        writer.write(struct.pack(">I", len(name)) + name)
        await writer.drain()
        while True:
            kind = (await reader.readexactly(1))[0]
            size = self.SIZES.get(kind)
            if size is None:
                return  # not RFB: hang up, as a VNC server does
            body = await reader.readexactly(size)
            if kind == 0:  # SetPixelFormat
                bpp, _depth, big, true_colour, *rest = struct.unpack(">xxxBBBBHHHBBBxxx", body)
                if bpp != 32 or not true_colour:
                    return  # only what noVNC and the tests ask for
                self.pixel = self._pixel(bpp, bool(big), *rest)
            elif kind == 2:  # SetEncodings: raw is always there
                (count,) = struct.unpack(">xH", body)
                await reader.readexactly(4 * count)
            elif kind == 3:  # FramebufferUpdateRequest: nothing ever changes
                incremental, x, y, w, h = struct.unpack(">BHHHH", body)
                if not incremental:
                    w, h = max(0, min(w, width - x)), max(0, min(h, height - y))
                    header = struct.pack(">BxH", 0, 1) + struct.pack(">HHHHi", x, y, w, h, 0)
                    writer.write(header + self.pixel * (w * h))
                    await writer.drain()
            elif kind == 4:  # KeyEvent
                down, keysym = struct.unpack(">BxxI", body)
                if down:
                    self.vm.keys.append(keysym)
            elif kind == 6:  # ClientCutText
                (length,) = struct.unpack(">xxxI", body)
                if length > MAX_CUT_TEXT:
                    return
                await reader.readexactly(length)
