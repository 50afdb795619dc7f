"""The stream multiplexer both ends of a qemu VM's virtio-serial port run: two real
``Mux`` sides over a real socket pair (the serial line), real Unix sockets at both ends."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from airlock.agent import mux as mux_mod
from airlock.agent.mux import HEADER, Mux


async def _echo_server(path: Path) -> asyncio.Server:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    return await asyncio.start_unix_server(echo, str(path))


class Line:
    """Both sides of the mux over one socket pair; the host listens on ``host.sock``."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.host = Mux(targets={}, host_side=True)
        self.guest = Mux(targets={"echo": str(tmp / "echo.sock")}, host_side=False)
        self.tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        self.before = asyncio.all_tasks()
        a, b = socket.socketpair()
        ha = await asyncio.open_connection(sock=a)
        hb = await asyncio.open_connection(sock=b)
        for side, (reader, writer) in ((self.host, ha), (self.guest, hb)):

            async def send(data: bytes, writer: asyncio.StreamWriter = writer) -> None:
                writer.write(data)
                await writer.drain()

            self.tasks.append(asyncio.create_task(side.run(reader, send), name="mux-side"))
        self.writers = (ha[1], hb[1])

        async def on_conn(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await self.host.accept("echo", r, w)

        self.listener = await asyncio.start_unix_server(on_conn, str(self.tmp / "host.sock"))

    async def close(self) -> None:
        self.listener.close()
        for w in self.writers:
            w.close()
        for t in self.tasks:
            t.cancel()
        for t in self.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        # The line is down: every channel task ends, closing its sockets, and so do the
        # echo server's handlers once they read EOF. Anything still running fails the test.
        rest = asyncio.all_tasks() - self.before - {asyncio.current_task()}
        if rest:
            await asyncio.wait(rest, timeout=5)


@pytest.fixture
async def line(tmp_path: Path) -> AsyncIterator[Line]:
    echo = await _echo_server(tmp_path / "echo.sock")
    ln = Line(tmp_path)
    await ln.start()
    yield ln
    await ln.close()
    echo.close()
    await echo.wait_closed()


async def _roundtrip(path: Path, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_unix_connection(str(path))
    writer.write(payload)
    await writer.drain()
    got = await asyncio.wait_for(reader.readexactly(len(payload)), 10)
    writer.close()
    return got


async def test_many_concurrent_channels_each_get_their_own_bytes(line: Line) -> None:
    payloads = [bytes([i]) * (1000 + i * 40_000) for i in range(8)]  # up to 280 kB each
    got = await asyncio.gather(*(_roundtrip(line.tmp / "host.sock", p) for p in payloads))
    assert got == payloads


async def test_unknown_target_closes_only_that_channel(line: Line) -> None:
    line.guest.targets.clear()
    reader, writer = await asyncio.open_unix_connection(str(line.tmp / "host.sock"))
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed, no bytes
    writer.close()
    line.guest.targets["echo"] = str(line.tmp / "echo.sock")
    assert await _roundtrip(line.tmp / "host.sock", b"still works") == b"still works"


async def test_garbage_on_the_line_resynchronises(line: Line) -> None:
    assert await _roundtrip(line.tmp / "host.sock", b"before") == b"before"
    # A frame with an impossible type and length, as a restarted peer's stale tail would be.
    line.writers[0].write(HEADER.pack(99, 7, 2**31) + b"junk")
    await line.writers[0].drain()
    for _ in range(50):
        try:
            assert await _roundtrip(line.tmp / "host.sock", b"after") == b"after"
            return
        except (AssertionError, TimeoutError, asyncio.IncompleteReadError):
            await asyncio.sleep(0.1)
    raise AssertionError("the line never recovered")


def test_pairs_are_checked() -> None:
    assert mux_mod._pairs(["a=/x", "b=/y=z"]) == {"a": "/x", "b": "/y=z"}
    with pytest.raises(SystemExit):
        mux_mod._pairs(["nonsense"])
