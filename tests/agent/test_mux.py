"""The stream multiplexer both ends of a qemu VM's virtio-serial port run: two real
``Mux`` sides over a real socket pair (the serial line), real Unix sockets at both ends."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from airlock.agent import mux as mux_mod
from airlock.agent.mux import CREDIT, DATA, HEADER, OPEN, WINDOW, WINDOW_UPDATE, Mux
from tests.lifecycle_helpers import wait_for


async def _echo_server(path: Path) -> asyncio.Server:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    return await asyncio.start_unix_server(echo, str(path))


class Line:
    """Both sides of the mux over one socket pair; the host listens on ``host.sock`` (a
    channel to the guest's ``echo``) and ``sink.sock`` (to the guest's ``sink``)."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.host = Mux(targets={}, host_side=True)
        self.guest = Mux(
            targets={"echo": str(tmp / "echo.sock"), "sink": str(tmp / "sink.sock")},
            host_side=False,
        )
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

        async def on_sink(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await self.host.accept("sink", r, w)

        self.sink_listener = await asyncio.start_unix_server(
            on_sink, str(self.tmp / "sink.sock-host")
        )

    async def close(self) -> None:
        self.sink_listener.close()
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

    async def recovered() -> bool:
        try:
            return await _roundtrip(line.tmp / "host.sock", b"after") == b"after"
        except (TimeoutError, asyncio.IncompleteReadError):
            return False

    await wait_for(recovered, timeout=5, interval=0.1, what="the line recovers")


def test_pairs_are_checked() -> None:
    assert mux_mod._pairs(["a=/x", "b=/y=z"]) == {"a": "/x", "b": "/y=z"}
    with pytest.raises(SystemExit):
        mux_mod._pairs(["nonsense"])


class Sink:
    """A local socket that takes a stream but reads nothing until told to: a viewer whose
    connection stalls. It hashes what it then reads."""

    def __init__(self) -> None:
        self.go = asyncio.Event()
        self.done: asyncio.Future[tuple[int, str]] = asyncio.get_running_loop().create_future()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self.go.wait()
        digest, total = hashlib.sha256(), 0
        while data := await reader.read(65536):
            digest.update(data)
            total += len(data)
        self.done.set_result((total, digest.hexdigest()))
        writer.close()


async def test_a_stalled_reader_loses_no_byte_and_stalls_only_its_own_channel(
    line: Line,
) -> None:
    sink = Sink()
    server = await asyncio.start_unix_server(sink.handle, str(line.tmp / "sink.sock"))
    payload = os.urandom(3 * 1024 * 1024)  # twelve windows' worth
    _reader, writer = await asyncio.open_unix_connection(str(line.tmp / "sink.sock-host"))
    sender = asyncio.create_task(_send_all(writer, payload))
    try:
        # The sender spends its window and is then held back, not dropped...
        async def window_spent() -> bool:
            return [c.credit for c in line.host._channels.values()] == [0]

        await wait_for(window_spent, timeout=20)
        assert not sender.done()
        # ...and the guest side holds no more than one window for the stalled socket.
        [stalled] = line.guest._channels.values()
        assert 0 < stalled.queued <= WINDOW
        # Meanwhile every other channel still flows, promptly.
        for _ in range(5):
            got = await asyncio.wait_for(_roundtrip(line.tmp / "host.sock", b"agent op"), 2)
            assert got == b"agent op"
        assert 0 < stalled.queued <= WINDOW and not sender.done()
        sink.go.set()
        await asyncio.wait_for(sender, 30)
        total, digest = await asyncio.wait_for(sink.done, 30)
        assert (total, digest) == (len(payload), hashlib.sha256(payload).hexdigest())
    finally:
        sender.cancel()
        writer.close()
        server.close()


async def _send_all(writer: asyncio.StreamWriter, payload: bytes) -> None:
    writer.write(payload)
    await writer.drain()
    writer.write_eof()


async def test_a_peer_that_sends_past_its_window_loses_only_that_channel(line: Line) -> None:
    """The other side breaking the rule (a compromised guest flooding the host): the
    channel is closed, nothing queues past the window, the line and other channels go on."""
    sink = Sink()  # never told to read
    server = await asyncio.start_unix_server(sink.handle, str(line.tmp / "sink.sock"))
    try:
        # Open a host -> guest channel by hand on the host's end of the line, then flood it.
        raw = line.writers[0]
        chan = 1000  # even: a host channel number nobody else uses
        raw.write(HEADER.pack(OPEN, chan, 4) + b"sink")
        chunk = b"x" * 16384
        for _ in range(WINDOW // len(chunk) + 4):
            raw.write(HEADER.pack(DATA, chan, len(chunk)) + chunk)
        await raw.drain()

        async def closed() -> bool:
            return chan not in line.guest._channels

        await wait_for(closed, timeout=20)
        assert all(c.queued <= WINDOW for c in line.guest._channels.values())
        assert await _roundtrip(line.tmp / "host.sock", b"still fine") == b"still fine"
        # A bogus grant (wrong size, unknown channel) is ignored, not fatal.
        raw.write(HEADER.pack(WINDOW_UPDATE, 12345, CREDIT.size) + CREDIT.pack(2**31))
        raw.write(HEADER.pack(WINDOW_UPDATE, 2, 1) + b"?")
        await raw.drain()
        assert await _roundtrip(line.tmp / "host.sock", b"and still") == b"and still"
        sink.go.set()  # the guest's socket to the sink was closed: it reads to that end
        total, _digest = await asyncio.wait_for(sink.done, 10)
        assert total <= WINDOW
    finally:
        server.close()
