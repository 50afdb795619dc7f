"""Many byte streams over one serial line: how the ``qemu`` runtime reaches a VM's agent,
VNC server and egress proxy through a single virtio-serial port, with no network device.

The controller opens several agent connections at once (a capture watch while it writes
files), so one bare serial stream is not enough. Both ends run this module: each side
*listens* on Unix sockets (a connection there opens a channel to a named target on the
other side) and *serves* targets (a channel opened by the other side connects to a local
Unix socket). In a ``qemu`` VM the host side listens on ``agent.sock``/``vnc.sock`` in the
VM's state dir and serves ``egress``; the guest side serves ``agent``/``vnc`` (the agent's
own sockets) and listens on the socket the agent takes for the egress proxy.

Frames: ``type:u8 channel:u32 length:u32`` then ``length`` bytes. A side that (re)starts
sends SYNC and skips input up to the peer's SYNC or SYNC_ACK, so a restarted host or guest
never reads the tail of an older conversation; a SYNC from the peer drops every channel.
The host opens even channel numbers, the guest odd ones. Standard library only.

    python -m airlock.agent.mux (--connect SOCK | --device PATH | --port-name NAME)
        [--listen NAME=SOCK ...] [--target NAME=SOCK ...]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import logging
import os
import struct
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

log = logging.getLogger("airlock.agent.mux")

OPEN, DATA, CLOSE, SYNC, SYNC_ACK = 1, 2, 3, 4, 5
HEADER = struct.Struct(">BII")
MAGIC = b"AIRLKMUX"
MAX_PAYLOAD = 64 * 1024
CONNECT_TIMEOUT_S = 30.0  # host side: QEMU makes the socket at once; give up after this
MAX_QUEUED = 256  # frames waiting for one slow local socket before its channel is dropped
SYNC_FRAME = HEADER.pack(SYNC, 0, len(MAGIC)) + MAGIC
ACK_FRAME = HEADER.pack(SYNC_ACK, 0, len(MAGIC)) + MAGIC

Send = Callable[[bytes], Awaitable[None]]


class _Channel:
    """One stream: frames from the peer go through ``queue`` to the local socket."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.tasks: list[asyncio.Task[None]] = []


class Mux:
    """One side of the line. ``run`` serves one serial session; call it again after the line
    drops (channels do not survive it)."""

    def __init__(self, *, targets: dict[str, str], host_side: bool) -> None:
        self.targets = targets
        self._ids = itertools.count(2 if host_side else 1, 2)
        self._channels: dict[int, _Channel] = {}
        self._send: Send | None = None
        self._lock = asyncio.Lock()

    # -- the serial side ------------------------------------------------------------------
    async def run(self, reader: asyncio.StreamReader, send: Send) -> None:
        self._send = send
        try:
            await self._frame(SYNC_FRAME)
            await self._skip_to_sync(reader)
            while True:
                header = await reader.readexactly(HEADER.size)
                kind, chan, length = HEADER.unpack(header)
                if kind not in (OPEN, DATA, CLOSE, SYNC, SYNC_ACK) or length > MAX_PAYLOAD:
                    log.warning("garbage on the line: resynchronising")
                    self._drop_all()
                    await self._frame(SYNC_FRAME)
                    await self._skip_to_sync(reader)
                    continue
                payload = await reader.readexactly(length)
                await self._on_frame(kind, chan, payload)
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        finally:
            self._send = None
            self._drop_all()

    async def _skip_to_sync(self, reader: asyncio.StreamReader) -> None:
        window = b""
        while True:
            window = (window + await reader.readexactly(1))[-len(SYNC_FRAME) :]
            if window == SYNC_FRAME:
                self._drop_all()
                await self._frame(ACK_FRAME)
                return
            if window == ACK_FRAME:
                return

    async def _frame(self, data: bytes) -> None:
        if self._send is None:
            raise ConnectionError("line down")
        async with self._lock:
            await self._send(data)

    async def _on_frame(self, kind: int, chan: int, payload: bytes) -> None:
        if kind == SYNC:
            self._drop_all()
            await self._frame(ACK_FRAME)
        elif kind == OPEN:
            name = payload.decode(errors="replace")
            if chan in self._channels or name not in self.targets:
                await self._frame(HEADER.pack(CLOSE, chan, 0))
                return
            new = self._add(chan)
            self._spawn(new, self._serve_target(chan, new, self.targets[name]))
        elif kind == DATA:
            found = self._channels.get(chan)
            if found is None:
                return
            if found.queue.qsize() >= MAX_QUEUED:
                log.warning("channel %d: local side too slow, dropping it", chan)
                await self._close(chan)
                return
            found.queue.put_nowait(payload)
        elif kind == CLOSE:
            closing = self._channels.get(chan)
            if closing is not None:
                closing.queue.put_nowait(None)

    # -- channels -------------------------------------------------------------------------
    def _add(self, chan: int) -> _Channel:
        channel = _Channel()
        self._channels[chan] = channel
        return channel

    def _spawn(self, channel: _Channel, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        channel.tasks.append(task)

    def _drop_all(self) -> None:
        for channel in self._channels.values():
            for task in channel.tasks:
                task.cancel()
        self._channels.clear()

    async def _close(self, chan: int) -> None:
        channel = self._channels.pop(chan, None)
        if channel is None:
            return
        current = asyncio.current_task()
        for task in channel.tasks:
            if task is not current:
                task.cancel()
        with contextlib.suppress(ConnectionError):
            await self._frame(HEADER.pack(CLOSE, chan, 0))

    async def _serve_target(self, chan: int, channel: _Channel, path: str) -> None:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(path), 10)
        except (OSError, TimeoutError):
            log.warning("channel %d: cannot reach %s", chan, path)
            await self._close(chan)
            return
        await self._pump(chan, channel, reader, writer)

    async def accept(
        self, target: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """A local connection on a listening socket: a channel to ``target`` over there."""
        if self._send is None:
            writer.close()
            return
        chan = next(self._ids)
        channel = self._add(chan)
        try:
            await self._frame(HEADER.pack(OPEN, chan, len(target)) + target.encode())
        except ConnectionError:
            writer.close()
            return
        task = asyncio.current_task()
        assert task is not None
        channel.tasks.append(task)
        await self._pump(chan, channel, reader, writer)

    async def _pump(
        self,
        chan: int,
        channel: _Channel,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        async def outbound() -> None:
            while data := await reader.read(MAX_PAYLOAD):
                await self._frame(HEADER.pack(DATA, chan, len(data)) + data)

        async def inbound() -> None:
            while (data := await channel.queue.get()) is not None:
                writer.write(data)
                await writer.drain()

        out = asyncio.ensure_future(outbound())
        inn = asyncio.ensure_future(inbound())
        try:
            await asyncio.wait([out, inn], return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            pass
        finally:
            for t in (out, inn):
                t.cancel()
            with contextlib.suppress(Exception):
                await asyncio.gather(out, inn, return_exceptions=True)
            writer.close()
            if self._channels.get(chan) is channel:
                await self._close(chan)


# -- the two kinds of line ----------------------------------------------------------------
async def _line_socket(path: str) -> tuple[asyncio.StreamReader, Send, Callable[[], None]]:
    """Host side: QEMU's chardev socket for the port."""
    reader, writer = await asyncio.open_unix_connection(path)

    async def send(data: bytes) -> None:
        writer.write(data)
        await writer.drain()

    return reader, send, writer.close


async def _line_device(path: str) -> tuple[asyncio.StreamReader, Send, Callable[[], None]]:
    """Guest side: the virtio-serial port's character device. Reading 0 bytes means the host
    end is not connected (the caller reopens after a pause)."""
    loop = asyncio.get_running_loop()
    fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    reader = asyncio.StreamReader(limit=2 * MAX_PAYLOAD)

    def readable() -> None:
        try:
            data = os.read(fd, MAX_PAYLOAD)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            reader.feed_data(data)
        else:
            loop.remove_reader(fd)
            reader.feed_eof()

    loop.add_reader(fd, readable)

    async def send(data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                n = os.write(fd, view)
            except BlockingIOError:
                ready = loop.create_future()
                loop.add_writer(fd, ready.set_result, None)
                try:
                    await asyncio.wait_for(ready, 5)
                finally:
                    loop.remove_writer(fd)
                continue
            view = view[n:]

    def close() -> None:
        loop.remove_reader(fd)
        os.close(fd)

    return reader, send, close


def find_port(name: str) -> str | None:
    """``/dev/vportNpM`` of the virtio-serial port called ``name`` (no udev in the guest)."""
    for entry in Path("/sys/class/virtio-ports").glob("*"):
        with contextlib.suppress(OSError):
            if (entry / "name").read_text().strip() == name:
                return f"/dev/{entry.name}"
    return None


async def serve(
    *,
    listen: dict[str, str],
    targets: dict[str, str],
    connect: str | None = None,
    device: str | None = None,
) -> None:
    """Run one side. The guest side reopens its port whenever the host end drops; the host
    side returns when its line closes (QEMU exited), so it never outlives its VM."""
    host_side = connect is not None
    mux = Mux(targets=targets, host_side=host_side)
    servers = []
    for name, path in listen.items():
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

        async def on_conn(
            r: asyncio.StreamReader, w: asyncio.StreamWriter, name: str = name
        ) -> None:
            await mux.accept(name, r, w)

        servers.append(await asyncio.start_unix_server(on_conn, path))
        os.chmod(path, 0o600)
    loop = asyncio.get_running_loop()
    started = loop.time()
    while True:
        try:
            if connect is not None:
                reader, send, close = await _line_socket(connect)
            else:
                assert device is not None
                reader, send, close = await _line_device(device)
        except OSError as exc:
            if host_side and loop.time() - started > CONNECT_TIMEOUT_S:
                log.error("no line at %s after %g s: giving up", connect, CONNECT_TIMEOUT_S)
                return
            log.debug("line not ready: %s", exc)
            await asyncio.sleep(0.1)
            continue
        try:
            await mux.run(reader, send)
        finally:
            with contextlib.suppress(OSError):
                close()
        if host_side:  # QEMU closed its end: the VM is gone, and so is this side's job
            log.info("line closed: exiting")
            return
        await asyncio.sleep(0.2)


def _pairs(values: list[str]) -> dict[str, str]:
    out = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"expected NAME=PATH, got {value!r}")
        out[name] = path
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="airlock.agent.mux", description=__doc__)
    line = parser.add_mutually_exclusive_group(required=True)
    line.add_argument("--connect", help="host: QEMU's chardev Unix socket")
    line.add_argument("--device", help="guest: the port's character device")
    line.add_argument("--port-name", help="guest: find the virtio-serial port by name")
    parser.add_argument("--listen", action="append", default=[], metavar="NAME=SOCK")
    parser.add_argument("--target", action="append", default=[], metavar="NAME=SOCK")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s mux %(levelname)s %(message)s"
    )
    device = args.device
    if args.port_name:
        device = find_port(args.port_name)
        if device is None:
            raise SystemExit(f"no virtio-serial port named {args.port_name}")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(
            serve(
                listen=_pairs(args.listen),
                targets=_pairs(args.target),
                connect=args.connect,
                device=device,
            )
        )


if __name__ == "__main__":
    main()
