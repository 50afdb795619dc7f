"""200 login sessions, 10 at a time, through the real sandbox runtime.

Prints start -> ``awaiting_user`` latency (p50/p95, from the rows' ``created_at`` and
``ready_at``) and destroy lag (``destroyed_at - destroy_after``, p50/p99), against the
targets of the control-plane issue: start p50 <= 1.5 s cold, destroy lag p99 <= 250 ms.
Each session really boots a sandbox with Xvnc and Chromium, completes a capture through
the guest agent, drains for the grace period and is destroyed by the scheduler.

Two loads, both ten sessions in flight at every moment. ``product``: the product's grace
period (30 s), the ten slots' first sessions spread over one session's length, as people
arrive. ``stress``: a 1 s grace and all ten slots starting at once, so there are always
several cold boots competing: it measures what the host sustains (sessions per second),
and by Little's law its start latency is 10 / that rate minus the time after the start.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from tests.lifecycle_helpers import finish_login

from airlock.domain.sessions import SessionStatus
from airlock.domain.vms import VmState
from airlock.logs import setup_logging
from airlock.services.core import Core
from airlock.settings import Settings


def busy_cpu_seconds() -> float:
    """CPU time the whole host has spent busy so far (``/proc/stat``): the sandboxes'
    processes are not this one's children, so rusage would miss them."""
    with open("/proc/stat") as fh:
        fields = [int(v) for v in fh.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


CPUACCT = Path("/sys/fs/cgroup/cpuacct")  # cgroup v1's CPU accounting, where mounted


class OwnCpu:
    """CPU time of this process and everything it starts (the controller and its VMs, which
    keep their cpuacct cgroup: containment moves them only in memory, pids and cpu), so the
    figure holds on a host that is busy with other work. Needs root and cgroup v1's cpuacct
    hierarchy; elsewhere ``seconds()`` is None and only the host-wide figure is printed."""

    def __init__(self) -> None:
        self.dir: Path | None = None
        if os.geteuid() != 0 or not (CPUACCT / "cgroup.procs").exists():
            return
        try:
            own = next(
                line.split(":", 2)[2]
                for line in Path("/proc/self/cgroup").read_text().splitlines()
                if "cpuacct" in line.split(":", 2)[1].split(",")
            )
            self.parent = CPUACCT / own.lstrip("/")
            self.dir = self.parent / f"airlock-bench-{os.getpid()}"
            self.dir.mkdir()
            (self.dir / "cgroup.procs").write_text(str(os.getpid()))
        except (OSError, StopIteration):
            self.dir = None

    def seconds(self) -> float | None:
        if self.dir is None:
            return None
        return int((self.dir / "cpuacct.usage").read_text()) / 1e9

    def close(self) -> None:
        if self.dir is not None:
            (self.parent / "cgroup.procs").write_text(str(os.getpid()))
            self.dir.rmdir()  # fails (and says so) if a VM of this run were still alive
            self.dir = None


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


async def until(core: Core, session_id: str, reached: Callable[[str, str], bool]) -> None:
    """Wait on the controller's change notifications (not a tight poll, which would load
    the very event loop being measured) until ``reached(session status, vm state)``."""
    while True:
        seen = core.bus.version(session_id)  # before the read: no change slips between
        row, vm = await core.sessions.get(session_id, None)
        if row.status == SessionStatus.FAILED.value:
            raise RuntimeError(f"session failed: {row.failure_reason}")
        if reached(row.status, vm.state if vm else ""):
            return
        await core.bus.wait(session_id, seen, 2.0)


async def one_session(core: Core, user: str) -> tuple[float, float]:
    session, vm = await core.sessions.start(user_id=user, provider_id="oauth2", actor="bench")
    await until(core, session.id, lambda s, _: s == SessionStatus.AWAITING_USER.value)
    await finish_login(core.runtime, vm.id)
    await until(core, session.id, lambda _, v: v == VmState.DESTROYED.value)
    row, vm_row = await core.sessions.get(session.id, None)
    assert row.ready_at is not None and vm_row is not None
    assert vm_row.destroyed_at is not None and vm_row.destroy_after is not None
    ready = (row.ready_at - row.created_at).total_seconds()
    lag = (vm_row.destroyed_at - vm_row.destroy_after).total_seconds()
    return ready, lag


async def run(
    sessions: int, concurrency: int, data_dir: Path, grace_ms: int = 1000, spread_s: float = 0.0
) -> dict[str, float]:
    """``concurrency`` slots run sessions back to back until ``sessions`` have run; slot k
    starts its first one ``k * spread_s / concurrency`` seconds in (0: all at once)."""
    settings = Settings(
        _env_file=None,
        data_dir=data_dir,
        grace_success_ms=grace_ms,
        demo_idp_port=4998,
        reconcile_interval_ms=5000,
    )
    core = Core(settings, demo=True)
    await core.start()
    ready: list[float] = []
    lags: list[float] = []
    numbers = iter(range(sessions))

    async def slot(k: int) -> None:
        await asyncio.sleep(k * spread_s / concurrency)
        for i in numbers:
            r, lag = await one_session(core, f"user{i % 20}")
            ready.append(r)
            lags.append(lag)

    started, cpu_before = time.monotonic(), busy_cpu_seconds()
    own = OwnCpu()
    own_before = own.seconds()
    try:
        async with asyncio.TaskGroup() as group:  # one failure cancels the rest
            for k in range(concurrency):
                group.create_task(slot(k))
    finally:
        await core.close()
        for vm in await core.runtime.list():  # VMs outlive a controller: leave none behind
            await core.runtime.destroy(vm.vm_id)
    wall, cpu = time.monotonic() - started, busy_cpu_seconds() - cpu_before
    own_after = own.seconds()
    own.close()
    own_cpu = (own_after - own_before) if own_after is not None and own_before is not None else 0
    return {
        "own_cpu_per_session": own_cpu / sessions,
        "sessions": sessions,
        "wall_s": wall,
        "ready_p50": pct(ready, 50),
        "ready_p95": pct(ready, 95),
        "lag_p50_ms": pct(lags, 50) * 1000,
        "lag_p99_ms": pct(lags, 99) * 1000,
        "lag_max_ms": max(lags) * 1000,
        "ready_mean": statistics.fmean(ready),
        "cpu_per_session": cpu / sessions,
    }


# The two loads ``make bench`` runs: (grace ms, first starts spread over s, what it shows).
LOADS = {
    "product": (30_000, 32.0, "the product's grace; people arrive apart, not all at once"),
    "stress": (1_000, 0.0, "ten cold boots at once, back to back: what two cores sustain"),
}


def report(r: dict[str, float], concurrency: int, grace_ms: int, spread_s: float) -> None:
    print(
        f"\nlifecycle: {int(r['sessions'])} sessions, {concurrency} at a time, "
        f"sandbox runtime, SQLite, grace {grace_ms} ms, first starts spread over "
        f"{spread_s:g} s; {r['wall_s']:.1f} s wall, "
        f"{r['sessions'] / r['wall_s']:.2f} sessions/s"
    )
    print(
        f"  host CPU per session {r['cpu_per_session']:.2f} CPU-s on {os.cpu_count()} cores: "
        f"at most {(os.cpu_count() or 1) / r['cpu_per_session']:.2f} sessions/s"
    )
    if r["own_cpu_per_session"]:
        print(
            f"  own CPU per session {r['own_cpu_per_session']:.3f} CPU-s (this process, its "
            "controller and VMs, by their cpuacct cgroup: not the rest of the host)"
        )
    print(
        f"  start -> awaiting_user  p50 {r['ready_p50']:.3f} s  p95 {r['ready_p95']:.3f} s"
        f"   (target p50 <= 1.5 s cold)  {'OK' if r['ready_p50'] <= 1.5 else 'MISSED'}"
    )
    print(
        f"  destroy lag            p50 {r['lag_p50_ms']:.1f} ms  p99 {r['lag_p99_ms']:.1f} ms"
        f"  max {r['lag_max_ms']:.1f} ms   (target p99 <= 250 ms)  "
        f"{'OK' if r['lag_p99_ms'] <= 250 else 'MISSED'}",
        flush=True,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sessions", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument(
        "--load",
        choices=[*LOADS, "both"],
        default="both",
        help="; ".join(f"{name}: {why}" for name, (_, _, why) in LOADS.items()),
    )
    parser.add_argument("--grace-ms", type=int, help="instead of the load's grace period")
    parser.add_argument(
        "--spread-s",
        type=float,
        help="instead of the load's: start the slots' first sessions spread over this many "
        "seconds, as people arrive, rather than all at once",
    )
    args = parser.parse_args(argv)
    setup_logging("WARNING")
    # Chromium's own background requests (update checks, Google account probes) are denied
    # by the egress allowlist, rightly, with a warning each: not what this bench is about.
    logging.getLogger("airlock.egress").setLevel(logging.ERROR)
    for name, (grace_ms, spread_s, why) in LOADS.items():
        if args.load not in (name, "both"):
            continue
        grace_ms = args.grace_ms if args.grace_ms is not None else grace_ms
        spread_s = args.spread_s if args.spread_s is not None else spread_s
        print(f"\nlifecycle, {name} load: {why}", flush=True)
        with tempfile.TemporaryDirectory(prefix="airlock-bench-") as tmp:
            r = asyncio.run(run(args.sessions, args.concurrency, Path(tmp), grace_ms, spread_s))
        report(r, args.concurrency, grace_ms, spread_s)


if __name__ == "__main__":
    main()
