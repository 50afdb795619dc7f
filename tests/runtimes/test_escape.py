"""The escape suite: a program inside a real browser VM tries every way out it can think of
(``escape_probe.py``, shipped into the VM as a file and run through the agent, as the VM runs
anything) and the test fails on any success. It prints what was tried and what came back."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from airlock.domain.vms import VmRole
from airlock.runtimes.base import VmSpec
from airlock.runtimes.confine import Limits
from airlock.runtimes.sandbox import SandboxRuntime

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("bwrap") or not shutil.which("setpriv"),
    reason="the contained sandbox needs a root controller, bwrap and setpriv",
)

PROBE = Path(__file__).with_name("escape_probe.py")
HOME = "/home/airlock"
LIMITS = Limits(memory_mb=768, pids_max=256, cpu_weight=100)
DISK_MB = 64


@pytest.fixture
async def runtime(tmp_path: Path) -> AsyncIterator[SandboxRuntime]:
    rt = SandboxRuntime(tmp_path / "vms", limits=LIMITS, disk_mb=DISK_MB, boot_timeout_s=60)
    try:
        yield rt
    finally:
        for vm in await rt.list():
            await rt.destroy(vm.vm_id)


def host_addresses() -> list[str]:
    """This host's own non-loopback IPv4 addresses: the VM must reach none of them."""
    ip = shutil.which("ip")
    if ip is None:
        return []
    out = subprocess.run([ip, "-o", "-4", "addr"], capture_output=True, text=True).stdout
    found = [line.split()[3].split("/")[0] for line in out.splitlines() if " inet " in line]
    return [a for a in found if not a.startswith("127.")]


def table(rows: list[dict[str, object]]) -> str:
    lines = [f"{'probe':<16} {'escaped':<8} {'ms':>6}  tried -> got"]
    for r in rows:
        mark = "YES" if r["escaped"] else "no"
        lines.append(f"{r['probe']!s:<16} {mark:<8} {r['ms']!s:>6}  {r['tried']} -> {r['got']}")
    return "\n".join(lines)


def host_sysctls() -> tuple[str, str]:
    return (
        Path("/proc/sys/kernel/printk").read_text(),
        Path("/proc/sys/kernel/core_pattern").read_text(),
    )


def as_vm_uid(uid: int, target: Path) -> list[dict[str, object]]:
    """The other-vm probe on the host, as a VM's uid (what a process of that VM that got out
    of its namespaces would be), against another VM's state dir."""
    drop = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--"]
    probe = [sys.executable, "-I", str(PROBE), "--only", "other-vm", "--other-vm", str(target)]
    done = subprocess.run([*drop, *probe], capture_output=True, text=True, timeout=60, cwd="/")
    assert done.returncode == 0, done.stderr
    rows = parse(done.stdout)
    for row in rows:
        row["probe"] = f"{row['probe']} (host)"
        row["got"] = f"{target}: {row['got']}"
    return rows


def parse(stdout: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


async def test_nothing_gets_out_of_a_browser_vm(runtime: SandboxRuntime) -> None:
    sysctls = await asyncio.to_thread(host_sysctls)
    # A root-only file in a host directory every sandbox sees (the Python's prefix).
    secret_file = Path(sys.prefix) / f".escape-{secrets.token_hex(4)}"
    secret_file.write_bytes(b"host secret\n")
    secret_file.chmod(0o600)
    try:
        vm = await runtime.create(VmSpec(vm_id="esc1", role=VmRole.BROWSER, user_id="u1"))
        other = await runtime.create(VmSpec(vm_id="esc2", role=VmRole.CLI, user_id="u2"))
        client = await runtime.agent_client("esc1")
        async with client:
            await client.write_files({"escape_probe.py": PROBE.read_bytes()})
            argv = [sys.executable, f"{HOME}/escape_probe.py", "--host-pid", str(os.getpid())]
            argv += ["--root-file", str(secret_file), "--other-vm", str(other.state_dir)]
            argv += ["--pids-max", str(LIMITS.pids_max), "--memory-mb", str(LIMITS.memory_mb)]
            argv += ["--disk-mb", str(DISK_MB)]
            for address in host_addresses():
                argv += ["--address", address]
            inside = await client.run(
                [*argv, *[a for p in PROBES_INSIDE for a in ("--only", p)]], timeout_s=240
            )
            assert inside.exit_code == 0, inside.stderr
            # The VM survived its own attacks: the agent answers, the browser came back.
            assert (await client.ping())["role"] == "browser"
        # Another VM's uid, on the host: VM esc1's uid against esc2's state dir, by its path
        # and through /proc (its init's root).
        uid = vm.state_dir.stat().st_uid
        assert uid != 0 and uid != other.state_dir.stat().st_uid
        host_rows = []
        assert other.pid is not None
        for target in (other.state_dir, Path(f"/proc/{other.pid}/root/run/airlock")):
            host_rows += await asyncio.to_thread(as_vm_uid, uid, target)
    finally:
        secret_file.unlink()
    rows = parse(inside.stdout) + host_rows
    print("\n" + table(rows))
    assert sorted({str(r["probe"]) for r in parse(inside.stdout)}) == sorted(PROBES_INSIDE)
    assert not [r for r in rows if str(r["got"]).startswith("probe failed")], table(rows)
    assert not [r for r in rows if r["escaped"]], table(rows)
    assert await asyncio.to_thread(host_sysctls) == sysctls
    # The host and the controller are unaffected: this process forks, the other VM answers.
    assert (await asyncio.to_thread(subprocess.run, ["true"])).returncode == 0
    async with await runtime.agent_client("esc2") as client:
        assert (await client.ping())["role"] == "cli"


PROBES_INSIDE = [
    "identity",
    "proc-sys",
    "mount",
    "unshare",
    "ptrace",
    "kernel-module",
    "raw-socket",
    "root-file",
    "network",
    "fork-bomb",
    "memory-hog",
    "fill-disk",
    "other-vm",
]
