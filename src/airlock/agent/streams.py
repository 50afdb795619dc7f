"""Byte streams for the guest and its bridges: one message line, one pipe, one splice.
Standard library and ``agent.protocol`` only (it runs inside the VM).

The agent, the vsock bridge, the controller's agent client and the Firecracker double all
read lines of the agent protocol and join two streams; they share these so that a fix (a
buffer limit, a half-close) lands everywhere at once.
"""

from __future__ import annotations

import asyncio
import contextlib

from airlock.agent import protocol

PIPE_CHUNK = 64 * 1024

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
