"""The serial-line multiplexer of qemu VMs: what one busy stream does to the others.

Both sides of ``airlock.agent.mux`` in one process over a socket pair (the serial line),
real Unix sockets at both ends, as in a qemu VM minus QEMU:

- throughput: one channel carrying ``--megabytes`` to a local reader that keeps up, MB/s,
  and the CPU it costs (both sides and both ends: this process), CPU-s per GB;
- agent latency: a 200-byte round trip on a second channel (the agent's size of message)
  while that bulk channel streams (the VNC stream of a busy screen), p50 and p99.

``--module PATH`` loads another version of the module (e.g. ``git show
main:src/airlock/agent/mux.py > /tmp/old_mux.py``), for before and after on one machine.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

CHUNK = 64 * 1024


def load(path: Path | None) -> ModuleType:
    if path is None:
        from airlock.agent import mux

        return mux
    spec = importlib.util.spec_from_file_location("mux_under_test", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def _line(mux: ModuleType, tmp: Path) -> list[asyncio.Task[None]]:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
        writer.close()

    async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.read(CHUNK):
            pass
        writer.close()

    await asyncio.start_unix_server(echo, str(tmp / "echo.sock"))
    await asyncio.start_unix_server(sink, str(tmp / "sink.sock"))
    host = mux.Mux(targets={}, host_side=True)
    guest = mux.Mux(
        targets={"echo": str(tmp / "echo.sock"), "sink": str(tmp / "sink.sock")},
        host_side=False,
    )
    a, b = socket.socketpair()
    tasks = []
    for side, sock in ((host, a), (guest, b)):
        reader, writer = await asyncio.open_connection(sock=sock)

        async def send(data: bytes, writer: asyncio.StreamWriter = writer) -> None:
            writer.write(data)
            await writer.drain()

        tasks.append(asyncio.create_task(side.run(reader, send)))
    for name in ("echo", "sink"):

        async def accept(
            r: asyncio.StreamReader, w: asyncio.StreamWriter, name: str = name
        ) -> None:
            await host.accept(name, r, w)

        await asyncio.start_unix_server(accept, str(tmp / f"host-{name}.sock"))
    return tasks


async def _bulk(tmp: Path, total: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) to push ``total`` bytes through."""
    _reader, writer = await asyncio.open_unix_connection(str(tmp / "host-sink.sock"))
    block = b"v" * CHUNK
    started, cpu = time.perf_counter(), time.process_time()
    for _ in range(total // CHUNK):
        writer.write(block)
        await writer.drain()
    writer.close()
    return time.perf_counter() - started, time.process_time() - cpu


async def _round_trips(tmp: Path, count: int, stop: asyncio.Event | None) -> list[float]:
    reader, writer = await asyncio.open_unix_connection(str(tmp / "host-echo.sock"))
    message = b"m" * 200
    times = []
    for _ in range(count):
        if stop is not None and stop.is_set():
            break
        started = time.perf_counter()
        writer.write(message)
        await writer.drain()
        await reader.readexactly(len(message))
        times.append(time.perf_counter() - started)
    writer.close()
    return times


def _quiet_cancelled(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """At the end the servers' handler tasks are cancelled, which 3.11 reports as errors."""
    if not isinstance(context.get("exception"), asyncio.CancelledError):
        loop.default_exception_handler(context)


async def run(mux: ModuleType, megabytes: int) -> dict[str, Any]:
    asyncio.get_running_loop().set_exception_handler(_quiet_cancelled)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        tasks = await _line(mux, tmp)
        idle = await _round_trips(tmp, 300, None)
        seconds, cpu = await _bulk(tmp, megabytes * 1024 * 1024)
        done = asyncio.Event()
        bulk = asyncio.create_task(_bulk(tmp, megabytes * 1024 * 1024))
        bulk.add_done_callback(lambda _: done.set())
        await asyncio.sleep(0.05)  # the bulk stream is under way
        busy = await _round_trips(tmp, 100_000, done)
        await bulk
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return {
        "throughput_mb_s": megabytes / seconds,
        "cpu_s_per_gb": cpu / megabytes * 1024,
        "idle_p50_ms": statistics.median(idle) * 1000,
        "busy_p50_ms": statistics.median(busy) * 1000,
        "busy_p99_ms": statistics.quantiles(busy, n=100)[98] * 1000,
        "busy_round_trips": len(busy),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--module", type=Path, help="another version of agent/mux.py")
    parser.add_argument("--megabytes", type=int, default=256)
    args = parser.parse_args(argv)
    figures = asyncio.run(run(load(args.module), args.megabytes))
    print(f"mux ({args.module or 'this tree'}):")
    print(
        f"  one channel, {args.megabytes} MB: {figures['throughput_mb_s']:.0f} MB/s, "
        f"{figures['cpu_s_per_gb']:.2f} CPU-s per GB"
    )
    print(
        f"  agent round trip: idle p50 {figures['idle_p50_ms']:.3f} ms; beside the bulk "
        f"stream p50 {figures['busy_p50_ms']:.3f} ms, p99 {figures['busy_p99_ms']:.3f} ms "
        f"({figures['busy_round_trips']} round trips)"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
