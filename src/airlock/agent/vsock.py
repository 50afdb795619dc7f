"""The guest side of a Firecracker VM's streams, over vsock. Standard library only.

Firecracker has no virtio-serial port for the multiplexer (``agent.mux``); its channel to the
host is vsock. This bridge listens on the guest vsock ports the controller connects to
(after Firecracker's ``CONNECT <port>`` handshake on the host) and joins each connection to
the agent's or Xvnc's Unix socket; the other way, it listens on the agent's egress socket and
joins each connection to the host (CID 2) on ``EGRESS_PORT``, which Firecracker hands to the
controller's egress proxy.

    python -m airlock.agent.vsock --state-dir /run/airlock
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

from airlock.agent.streams import Stream, splice

log = logging.getLogger("airlock.agent.vsock")

AGENT_PORT = 1024  # guest ports the host connects to
VNC_PORT = 5900
EGRESS_PORT = 3128  # host port the guest connects to
HOST_CID = 2
GUEST_TARGETS = {AGENT_PORT: "agent.sock", VNC_PORT: "vnc.sock"}

Listen = Callable[[int], socket.socket]
ConnectHost = Callable[[int], Awaitable[Stream]]


def vsock_listener(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    sock.bind((socket.VMADDR_CID_ANY, port))
    sock.listen(64)
    sock.setblocking(False)
    return sock


async def connect_host(port: int) -> Stream:
    sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(sock, (HOST_CID, port))
    except BaseException:
        sock.close()
        raise
    return await asyncio.open_connection(sock=sock)


async def _join(a: Stream, connect: Callable[[], Awaitable[Stream]]) -> None:
    try:
        b = await connect()
    except OSError as exc:
        log.warning("cannot reach the other end: %s", exc)
        a[1].close()
        return
    await splice(a, b)


async def serve(
    state_dir: Path,
    *,
    listen: Listen = vsock_listener,
    host: ConnectHost = connect_host,
) -> list[asyncio.Server]:
    """Start every listener; the caller keeps the servers (and closes them)."""
    servers = []
    for port, name in GUEST_TARGETS.items():
        target = state_dir / name

        async def inbound(
            r: asyncio.StreamReader, w: asyncio.StreamWriter, t: Path = target
        ) -> None:
            await _join((r, w), lambda: asyncio.open_unix_connection(str(t)))

        servers.append(await asyncio.start_server(inbound, sock=listen(port)))

    async def outbound(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await _join((r, w), lambda: host(EGRESS_PORT))

    egress = state_dir / "egress.sock"
    with contextlib.suppress(FileNotFoundError):
        egress.unlink()
    servers.append(await asyncio.start_unix_server(outbound, path=str(egress)))
    return servers


async def _main(state_dir: Path) -> None:
    servers = await serve(state_dir)
    log.info("vsock bridge up: ports %s in, %d out", sorted(GUEST_TARGETS), EGRESS_PORT)
    try:
        await asyncio.gather(*(s.serve_forever() for s in servers))
    finally:
        for s in servers:
            s.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="airlock.agent.vsock", description=__doc__)
    parser.add_argument("--state-dir", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s vsock %(levelname)s %(message)s")
    asyncio.run(_main(args.state_dir))


if __name__ == "__main__":
    main()
