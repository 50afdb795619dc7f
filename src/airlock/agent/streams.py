"""Byte streams for the guest and its bridges: one message line, one pipe, one splice, and
Unix sockets at any path length.
Standard library and ``agent.protocol`` only (it runs inside the VM).

The agent, the vsock bridge, the controller's agent client and the Firecracker double all
read lines of the agent protocol and join two streams; they share these so that a fix (a
buffer limit, a half-close) lands everywhere at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Iterator

from airlock.agent import protocol

PIPE_CHUNK = 64 * 1024
UNIX_PATH_MAX = 107  # sun_path's bytes, without its terminating NUL

Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class TruncatedMessage(protocol.ProtocolError):
    """The stream ended inside a message (after some of its bytes, before its newline)."""


async def read_line(
    reader: asyncio.StreamReader, limit: int = protocol.MAX_MESSAGE
) -> bytes | None:
    """One line of at most ``limit`` bytes, whatever the reader's own buffer limit (a runtime
    may hand over a reader with asyncio's 64 KiB default); None at a clean EOF. Raises
    ``TruncatedMessage`` at an EOF inside a line, ``protocol.ProtocolError`` past ``limit``."""
    buf = bytearray()
    while True:
        try:
            buf += await reader.readuntil(b"\n")
        except asyncio.LimitOverrunError as exc:
            buf += await reader.readexactly(exc.consumed)
        except asyncio.IncompleteReadError as exc:
            if exc.partial or buf:
                raise TruncatedMessage("stream ended inside a message") from None
            return None
        else:
            if len(buf) > limit:
                raise protocol.ProtocolError("message too large")
            return bytes(buf)
        if len(buf) > limit:
            raise protocol.ProtocolError("message too large")


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy bytes until EOF, then half-close so the other direction can finish. A read or
    write error propagates (``splice`` ends both directions on it)."""
    while data := await reader.read(PIPE_CHUNK):
        writer.write(data)
        await writer.drain()
    if writer.can_write_eof():
        with contextlib.suppress(OSError):
            writer.write_eof()


async def splice(a: Stream, b: Stream) -> None:
    """Pipe two streams into each other until both directions end (or one breaks), then
    close both."""
    forward = asyncio.ensure_future(pipe(a[0], b[1]))
    backward = asyncio.ensure_future(pipe(b[0], a[1]))
    try:
        pending: set[asyncio.Future[None]] = {forward, backward}
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            if any(not t.cancelled() and t.exception() is not None for t in done):
                break  # a reset on one side: the other direction cannot be useful any more
    finally:
        for t in (forward, backward):
            t.cancel()
        await asyncio.gather(forward, backward, return_exceptions=True)
        for _, w in (a, b):
            w.close()


@contextlib.contextmanager
def unix_path(path: str | os.PathLike[str]) -> Iterator[str]:
    """A name to bind or connect the Unix socket at ``path`` by, valid inside the block: the
    path itself, or when it is longer than sun_path allows (a deep data dir), the same place
    through ``/proc/self/fd`` of its directory."""
    raw = os.fspath(path)
    if len(os.fsencode(raw)) <= UNIX_PATH_MAX:
        yield raw
        return
    directory, name = os.path.split(raw)
    fd = os.open(directory or ".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{name}"
    finally:
        os.close(fd)


async def open_unix(path: str | os.PathLike[str], *, limit: int = 2**16) -> Stream:
    """Connect to the Unix socket at ``path``, however long the path."""
    with unix_path(path) as name:
        return await asyncio.open_unix_connection(name, limit=limit)
