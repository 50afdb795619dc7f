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

Flow control is per channel, with credits as in SSH and HTTP/2: a side may send at most
``WINDOW`` bytes of a channel's data that the other side has not yet written to its local
socket; a WINDOW frame (payload: ``u32`` bytes) grants more as they are written. So a local
reader that stops (a slow viewer) stalls only its own channel, never the line or the
agent's channel, and no byte is ever dropped; the line's reader never waits on a socket.
Senders take turns on the line one frame (at most ``CHUNK`` bytes) at a time.

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
import select
import struct
import sys
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

from airlock.agent.streams import open_unix, unix_path

log = logging.getLogger("airlock.agent.mux")

OPEN, DATA, CLOSE, SYNC, SYNC_ACK, WINDOW_UPDATE = 1, 2, 3, 4, 5, 6
KINDS = (OPEN, DATA, CLOSE, SYNC, SYNC_ACK, WINDOW_UPDATE)
HEADER = struct.Struct(">BII")
CREDIT = struct.Struct(">I")
MAGIC = b"AIRLKMUX"
MAX_PAYLOAD = 64 * 1024  # the largest frame a side accepts
CHUNK = 64 * 1024  # the largest DATA frame a side sends (16 KiB: a third less throughput)
WINDOW = 256 * 1024  # a channel's unacknowledged bytes in flight, each way
CONNECT_TIMEOUT_S = 30.0  # host side: QEMU makes the socket at once; give up after this
HOST_POLL_MAX_S = 0.25  # guest side: how often, at most, it looks for the host end to connect
SYNC_FRAME = HEADER.pack(SYNC, 0, len(MAGIC)) + MAGIC
ACK_FRAME = HEADER.pack(SYNC_ACK, 0, len(MAGIC)) + MAGIC

Send = Callable[[bytes], Awaitable[None]]


class _Channel:
    """One stream: frames from the peer go through ``queue`` to the local socket.

    ``credit`` is how much this side may still send; ``queued`` how much the peer sent that
    is not yet written locally (never more than ``WINDOW`` from a peer that keeps the rule).
    """

    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.tasks: list[asyncio.Task[None]] = []
        self.credit = WINDOW
        self.credit_granted = asyncio.Event()
        self.queued = 0


class Mux:
    """One side of the line. ``run`` serves one serial session; call it again after the line
    drops (channels do not survive it)."""

    def __init__(self, *, targets: dict[str, str], host_side: bool) -> None:
        self.targets = targets
        self._ids = itertools.count(2 if host_side else 1, 2)
        self._channels: dict[int, _Channel] = {}
        self._send: Send | None = None
        self._lock = asyncio.Lock()
        self._replies: set[asyncio.Task[None]] = set()  # control frames the reader sends

    # -- the serial side ------------------------------------------------------------------
    async def run(self, reader: asyncio.StreamReader, send: Send) -> None:
        self._send = send
        try:
            await self._frame(SYNC_FRAME)
            await self._skip_to_sync(reader)
            while True:
                header = await reader.readexactly(HEADER.size)
                kind, chan, length = HEADER.unpack(header)
                if kind not in KINDS or length > MAX_PAYLOAD:
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

    def _reply(self, coro: Coroutine[Any, Any, None]) -> None:
        """Send from the line's reader without waiting: a reader that waited to send could
        deadlock with a peer whose reader waits to send too (both lines full)."""
        task = asyncio.ensure_future(coro)
        self._replies.add(task)
        task.add_done_callback(self._replies.discard)

    async def _on_frame(self, kind: int, chan: int, payload: bytes) -> None:
        if kind == SYNC:
            self._drop_all()
            self._reply(self._frame_if_up(ACK_FRAME))
        elif kind == OPEN:
            name = payload.decode(errors="replace")
            if chan in self._channels or name not in self.targets:
                self._reply(self._frame_if_up(HEADER.pack(CLOSE, chan, 0)))
                return
            new = self._add(chan)
            self._spawn(new, self._serve_target(chan, new, self.targets[name]))
        elif kind == DATA:
            found = self._channels.get(chan)
            if found is None:
                return
            if found.queued + len(payload) > WINDOW:
                log.warning("channel %d: the peer sent past its window; closing it", chan)
                if self._forget(chan):
                    self._reply(self._frame_if_up(HEADER.pack(CLOSE, chan, 0)))
                return
            found.queued += len(payload)
            found.queue.put_nowait(payload)
        elif kind == WINDOW_UPDATE:
            granted = self._channels.get(chan)
            if granted is not None and len(payload) == CREDIT.size:
                granted.credit += CREDIT.unpack(payload)[0]
                granted.credit_granted.set()
        elif kind == CLOSE:
            closing = self._channels.get(chan)
            if closing is not None:
                closing.queue.put_nowait(None)

    async def _frame_if_up(self, data: bytes) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            await self._frame(data)

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
        for reply in self._replies:
            reply.cancel()

    def _forget(self, chan: int) -> bool:
        """Drop a channel and stop its tasks (but the one calling); False if it was gone."""
        channel = self._channels.pop(chan, None)
        if channel is None:
            return False
        current = asyncio.current_task()
        for task in channel.tasks:
            if task is not current:
                task.cancel()
        return True

    async def _close(self, chan: int) -> None:
        if self._forget(chan):
            with contextlib.suppress(ConnectionError):
                await self._frame(HEADER.pack(CLOSE, chan, 0))

    async def _serve_target(self, chan: int, channel: _Channel, path: str) -> None:
        try:
            reader, writer = await asyncio.wait_for(open_unix(path), 10)
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
            while True:
                while channel.credit <= 0:
                    channel.credit_granted.clear()
                    await channel.credit_granted.wait()
                data = await reader.read(min(CHUNK, channel.credit))
                if not data:
                    return
                channel.credit -= len(data)
                await self._frame(HEADER.pack(DATA, chan, len(data)) + data)

        async def inbound() -> None:
            written = 0  # since the last grant: granted in batches, not per frame
            while (data := await channel.queue.get()) is not None:
                writer.write(data)
                await writer.drain()
                channel.queued -= len(data)
                written += len(data)
                if written >= WINDOW // 4:  # in batches: an idle round trip costs no grant
                    grant = HEADER.pack(WINDOW_UPDATE, chan, CREDIT.size) + CREDIT.pack(written)
                    await self._frame(grant)
                    written = 0

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
    reader, writer = await open_unix(path)

    async def send(data: bytes) -> None:
        writer.write(data)
        await writer.drain()

    return reader, send, writer.close


async def _line_device(path: str) -> tuple[asyncio.StreamReader, Send, Callable[[], None]]:
    """Guest side: the virtio-serial port's character device.

    While the host end is not connected the port polls as hung up (POLLHUP, which epoll
    reports to every reader and writer), reads give 0 bytes and writes would block. So this
    first waits, with a back-off and no busy loop, until the host end is there; then a read
    of 0 bytes means the host went away (the caller reopens), and a write that would block
    waits for room, or ends the line if the host went away meanwhile.
    """
    loop = asyncio.get_running_loop()
    fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        await _host_end_connected(fd)
    except BaseException:
        os.close(fd)
        raise
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
                if _hung_up(fd):
                    raise ConnectionError("the host end of the port went away") from None
                await _writable(loop, fd)
                continue
            view = view[n:]

    def close() -> None:
        loop.remove_reader(fd)
        loop.remove_writer(fd)
        os.close(fd)

    return reader, send, close


def _hung_up(fd: int) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return any(events & select.POLLHUP for _, events in poller.poll(0))


async def _host_end_connected(fd: int) -> None:
    pause = 0.01
    while _hung_up(fd):
        await asyncio.sleep(pause)
        pause = min(pause * 2, HOST_POLL_MAX_S)


async def _writable(loop: asyncio.AbstractEventLoop, fd: int) -> None:
    """Until ``fd`` polls writable (or hung up). The callback may run again before this
    coroutine resumes: it sets the future once, and the writer is removed on the way out."""
    ready = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_writer(fd, wake)
    try:
        await ready
    finally:
        loop.remove_writer(fd)


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

        with unix_path(path) as bind_name:
            servers.append(await asyncio.start_unix_server(on_conn, bind_name))
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
