"""The guest's vsock bridge (``agent.vsock``). This machine has no vsock loopback, so the
listening sockets and the host connection are Unix sockets standing in for vsock; the
joining of streams in both directions is what is tested, and a real AF_VSOCK listener is
bound once to show the address form works."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

from airlock.agent.vsock import AGENT_PORT, EGRESS_PORT, VNC_PORT, serve, vsock_listener


async def test_bridge_joins_guest_ports_and_egress(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()

    def server(
        tag: bytes,
    ) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            w.write(tag + await r.readline())
            await w.drain()
            w.close()

        return handle

    agent = await asyncio.start_unix_server(server(b"agent:"), path=str(state / "agent.sock"))
    host = await asyncio.start_unix_server(server(b"proxy:"), path=str(tmp_path / "host.sock"))

    def listen(port: int) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(tmp_path / f"vsock-{port}"))
        sock.listen()
        return sock

    async def to_host(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        assert port == EGRESS_PORT
        return await asyncio.open_unix_connection(str(tmp_path / "host.sock"))

    servers = await serve(state, listen=listen, host=to_host)
    try:
        r, w = await asyncio.open_unix_connection(str(tmp_path / f"vsock-{AGENT_PORT}"))
        w.write(b"ping\n")
        assert await r.readline() == b"agent:ping\n"
        w.close()
        r, w = await asyncio.open_unix_connection(str(state / "egress.sock"))
        w.write(b"CONNECT example:443\n")
        assert await r.readline() == b"proxy:CONNECT example:443\n"
        w.close()
        # Nothing serves VNC (a CLI VM): the connection is closed, not left hanging.
        r, w = await asyncio.open_unix_connection(str(tmp_path / f"vsock-{VNC_PORT}"))
        assert await asyncio.wait_for(r.read(), 5) == b""
        w.close()
    finally:
        for s in (*servers, agent, host):
            s.close()


def test_a_real_vsock_listener_binds() -> None:
    sock = vsock_listener(47_000 + AGENT_PORT % 1000)
    try:
        assert sock.family == socket.AF_VSOCK
        assert sock.getsockname()[1] == 47_000 + AGENT_PORT % 1000
    finally:
        sock.close()
