"""The VNC proxy against websockify, in the same run, on the same Xvnc server.

One Xvnc (1280x800, depth 24) serves RFB on a Unix socket. Three paths reach it: straight
to the socket (the floor), websockify (``--unix-target``), and our controller (a real
``create_app`` served by uvicorn in its own process, with the server settings of ``airlock
serve``, whose runtime's ``open_vnc`` opens that socket; every viewer carries a real
viewer token, counts as presence, and is parsed as the proxy always does).

- throughput: full-frame, non-incremental FramebufferUpdateRequests with Raw encoding
  (4 MB per update, the most bytes a screen can cost), MB/s; target: at least websockify's.
- latency: a 1x1 FramebufferUpdateRequest and its answer, p50 over many round trips;
  target: our added p50 (over the direct path) <= 1 ms.
- memory: the controller's RSS with 200 viewer sockets open (200 sessions, each socket
  through the RFB handshake), against the same process idle.
"""

from __future__ import annotations

import argparse
import asyncio
import builtins
import json
import os
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from tests.rfb import (
    RawWsTransport,
    RfbClient,
    StreamTransport,
    WsTransport,
    start_xvnc,
    wait_until,
)
from websockets.asyncio.client import connect

REPO = Path(__file__).resolve().parent.parent
FRAME = 1280 * 800 * 4
VIEWERS = 200


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


# --- the controller, in its own process ---------------------------------------------------
async def serve(vnc_socket: Path, data_dir: Path, port: int, sessions: int) -> None:
    import uvicorn

    from airlock.api.app import create_app
    from airlock.api.vnc_proxy import SERVER_OPTIONS  # as `airlock serve` runs uvicorn
    from airlock.domain.sessions import SessionStatus
    from airlock.domain.vms import VmRole, VmState
    from airlock.errors import RuntimeFailure
    from airlock.providers.oauth2 import demo_oauth2_provider
    from airlock.runtimes.base import RunningVm, Stream, VmSpec
    from airlock.services.core import Core
    from airlock.settings import Settings
    from airlock.store.tables import AuthSession, Vm

    class OneXvnc:
        """Every VM's screen is the bench's Xvnc; nothing else runs."""

        name = "bench"

        async def create(self, spec: VmSpec) -> RunningVm:
            raise RuntimeFailure("the bench boots no VM")

        async def destroy(self, vm_id: str) -> bool:
            return False

        async def list(self) -> list[RunningVm]:
            return []

        async def open_agent(self, vm_id: str) -> Stream:
            raise RuntimeFailure("the bench boots no VM")

        async def open_vnc(self, vm_id: str) -> Stream:
            return await asyncio.open_unix_connection(vnc_socket)

        async def check(self) -> builtins.list[str]:
            return []

    settings = Settings(
        _env_file=None,
        data_dir=data_dir,
        port=port,
        reconcile_interval_ms=3_600_000,  # the rows below have no VM behind them to list
        log_level="WARNING",
    )
    provider = demo_oauth2_provider(settings.demo_idp_port)
    core = Core(settings, runtime=OneXvnc(), providers={provider.id: provider})
    app = create_app(core=core)
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, **SERVER_OPTIONS)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:  # noqa: ASYNC110 (uvicorn offers no event to wait on)
        await asyncio.sleep(0.05)
    signer = app.state.viewer_signer
    out = []
    now = core.clock.now()
    async with core.db.transaction() as repo:
        for _ in range(sessions):
            vm = Vm(
                id="vm-" + secrets.token_hex(8),
                role=VmRole.BROWSER.value,
                runtime="bench",
                user_id="bench",
                state=VmState.RUNNING.value,
                created_at=now,
                updated_at=now,
                running_at=now,
                destroy_after=now + settings.login_timeout,
                destroy_attempts=0,
                warm=False,
                detail={},
            )
            repo.add_vm(vm)
            await repo.session.flush()
            session = AuthSession(
                id=secrets.token_hex(16),
                user_id="bench",
                provider="oauth2",
                status=SessionStatus.AWAITING_USER.value,
                vm_id=vm.id,
                created_at=now,
                updated_at=now,
                ready_at=now,
            )
            repo.add_session(session)
            out.append((session.id, signer.mint(session.id, vm.id, now=now)))
    print(json.dumps(out), flush=True)
    await task


# --- the measurements ---------------------------------------------------------------------
Opener = Callable[[], Awaitable[RfbClient]]


async def latency_ms(open_client: Opener, rounds: int) -> float:
    rfb = await open_client()
    await rfb.handshake()
    try:
        samples = []
        for i in range(rounds + 50):
            start = time.perf_counter()
            await rfb.request_update(incremental=False, x=0, y=0, w=1, h=1)
            await rfb.read_update()
            if i >= 50:  # warm-up
                samples.append((time.perf_counter() - start) * 1000)
        return statistics.median(samples)
    finally:
        await rfb.close()


def cpu_s(pid: int | None) -> float:
    """CPU seconds of ``pid`` and its reaped children (websockify forks one per connection)."""
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")


async def throughput(open_client: Opener, frames: int, pid: int | None) -> tuple[float, float]:
    """(MB/s, the proxy's CPU seconds per GB) for ``frames`` full-frame updates."""
    cpu_before = cpu_s(pid)
    rfb = await open_client()
    await rfb.handshake()
    total = 0
    try:
        for _ in range(3):
            await rfb.request_update(incremental=False)
            total += await rfb.read_update()
        start = time.perf_counter()
        timed = 0
        for _ in range(frames):
            await rfb.request_update(incremental=False)
            timed += await rfb.read_update()
        mb_s = timed / (time.perf_counter() - start) / 1e6
        total += timed
    finally:
        await rfb.close()
    await asyncio.sleep(0.3)  # websockify's child exits and is reaped: its CPU is counted
    return mb_s, (cpu_s(pid) - cpu_before) / (total / 1e9)


def ws_opener(url: str) -> Opener:
    async def open_client() -> RfbClient:
        return RfbClient(await RawWsTransport.connect(url))

    return open_client


def direct_opener(path: Path) -> Opener:
    async def open_client() -> RfbClient:
        return RfbClient(StreamTransport(*await asyncio.open_unix_connection(path)))

    return open_client


async def measure(
    paths: dict[str, tuple[Opener, int | None]], rounds: int, frames: int, latency_rounds: int
) -> dict[str, dict[str, float]]:
    """Each path ``rounds`` times, interleaved, so a busy machine's drift hits all alike;
    the median of each figure over the rounds."""
    tput: dict[str, list[float]] = {name: [] for name in paths}
    cpu: dict[str, list[float]] = {name: [] for name in paths}
    lat: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(rounds):
        for name, (opener, pid) in paths.items():
            mb_s, cpu_per_gb = await throughput(opener, frames, pid)
            tput[name].append(mb_s)
            cpu[name].append(cpu_per_gb)
            lat[name].append(await latency_ms(opener, latency_rounds))
    return {
        name: {
            "mb_s": statistics.median(tput[name]),
            "cpu_s_per_gb": statistics.median(cpu[name]),
            "p50_ms": statistics.median(lat[name]),
        }
        for name in paths
    }


async def open_viewers(url: str, sessions: list[tuple[str, str]]) -> list[RfbClient]:
    """One socket per session, each through the RFB handshake, all left open."""
    clients = []
    for session_id, token in sessions:
        ws = await connect(f"{url}/api/auth/session/{session_id}/vnc?token={token}")
        rfb = RfbClient(WsTransport(ws))
        await rfb.handshake()
        clients.append(rfb)
    return clients


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Start Xvnc, websockify and the controller, measure, stop them all."""
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="airlock-bench-vnc-") as tmp_name:
        tmp = Path(tmp_name)
        try:
            xvnc, vnc_socket = start_xvnc(tmp)
            procs.append(xvnc)
            wsport, port = free_port(), free_port()
            websockify = str(Path(sys.executable).parent / "websockify")
            websockify_argv = [websockify, f"--unix-target={vnc_socket}", f"127.0.0.1:{wsport}"]
            quiet = subprocess.DEVNULL
            websockify_proc = subprocess.Popen(websockify_argv, stdout=quiet, stderr=quiet)
            procs.append(websockify_proc)
            server_argv = [
                *(sys.executable, "-m", "bench.vnc_proxy", "--serve", str(vnc_socket)),
                *("--data", str(tmp / "data"), "--port", str(port)),
                *("--sessions", str(VIEWERS + 1)),
            ]
            server = subprocess.Popen(server_argv, cwd=REPO, stdout=subprocess.PIPE)
            procs.append(server)
            assert server.stdout is not None
            sessions = [(sid, token) for sid, token in json.loads(server.stdout.readline())]
            wait_until(lambda: port_open(wsport), "websockify")
            return asyncio.run(
                measure_all(
                    args, vnc_socket, wsport, port, server.pid, websockify_proc.pid, sessions
                )
            )
        finally:
            for proc in reversed(procs):
                proc.send_signal(signal.SIGTERM)
            for proc in procs:
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


async def measure_all(
    args: argparse.Namespace,
    vnc_socket: Path,
    wsport: int,
    port: int,
    server_pid: int,
    websockify_pid: int,
    sessions: list[tuple[str, str]],
) -> dict[str, Any]:
    (sid, token), viewers = sessions[0], sessions[1:]
    ours = f"ws://127.0.0.1:{port}/api/auth/session/{sid}/vnc?token={token}"
    paths = {
        "direct": (direct_opener(vnc_socket), None),
        "websockify": (ws_opener(f"ws://127.0.0.1:{wsport}/"), websockify_pid),
        "airlock": (ws_opener(ours), server_pid),
    }
    figures: dict[str, Any] = await measure(paths, args.rounds, args.frames, args.latency_rounds)
    idle = rss_kib(server_pid)
    clients = await open_viewers(f"ws://127.0.0.1:{port}", viewers)
    await asyncio.sleep(1.0)
    loaded = rss_kib(server_pid)
    for client in clients:
        await client.close()
    figures["rss"] = {"idle_kib": idle, "viewers_kib": loaded, "viewers": len(clients)}
    return figures


def report(figures: dict[str, Any]) -> None:
    def ok(good: bool) -> str:
        return "OK" if good else "MISSED"

    direct, wsf, ours = figures["direct"], figures["websockify"], figures["airlock"]
    print("VNC proxy (one Xvnc 1280x800, Raw full-frame updates; same run, same server)")
    print(
        f"  throughput    direct {direct['mb_s']:7.1f} MB/s   websockify {wsf['mb_s']:7.1f} MB/s"
        f"   airlock {ours['mb_s']:7.1f} MB/s   target >= websockify: "
        f"{ok(ours['mb_s'] >= wsf['mb_s'])}"
    )
    print(
        f"  proxy CPU     websockify {wsf['cpu_s_per_gb']:.2f} s/GB   airlock "
        f"{ours['cpu_s_per_gb']:.2f} s/GB   (steadier than MB/s on a busy machine)"
    )
    added_wsf, added = wsf["p50_ms"] - direct["p50_ms"], ours["p50_ms"] - direct["p50_ms"]
    print(
        f"  latency p50   direct {direct['p50_ms']:.3f} ms   websockify {wsf['p50_ms']:.3f} ms "
        f"(+{added_wsf:.3f})   airlock {ours['p50_ms']:.3f} ms (+{added:.3f})   "
        f"target added <= 1 ms: {ok(added <= 1.0)}"
    )
    rss = figures["rss"]
    per = (rss["viewers_kib"] - rss["idle_kib"]) / max(1, rss["viewers"])
    print(
        f"  controller RSS  idle {rss['idle_kib'] / 1024:.1f} MiB   with {rss['viewers']} viewer "
        f"sockets {rss['viewers_kib'] / 1024:.1f} MiB   ({per:.0f} KiB per viewer)"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--frames", type=int, default=30)
    parser.add_argument("--latency-rounds", type=int, default=300)
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--sessions", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        from uvicorn.loops.auto import auto_loop_factory

        # The event loop `airlock serve` runs on (uvloop when installed).
        with asyncio.Runner(loop_factory=auto_loop_factory()) as runner:
            runner.run(serve(args.serve, args.data, args.port, args.sessions))
        return
    os.environ.pop("AIRLOCK_DATA_DIR", None)
    report(run(args))


if __name__ == "__main__":
    main(sys.argv[1:])
