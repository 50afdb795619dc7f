"""The ``sandbox`` runtime for real: bubblewrap, Xvnc and Chromium, no mocks."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from airlock.agent.client import AgentClient, AgentError
from airlock.agent.protocol import EGRESS_PORT, START_PAGE_PORT
from airlock.domain.vms import VmRole
from airlock.errors import RuntimeFailure
from airlock.providers.base import LoginPlan
from airlock.runtimes.base import Runtime, VmSpec
from airlock.runtimes.sandbox import DEFAULT_LIMITS, DEFAULT_UID_BASE, SandboxRuntime
from airlock.runtimes.vmdir import VM_NICE
from tests.lifecycle_helpers import wait_for

pytestmark = [
    pytest.mark.sandbox,
    pytest.mark.skipif(
        not all(shutil.which(b) for b in ("bwrap", "Xvnc")),
        reason="needs bubblewrap and Xvnc: "
        + "apt-get install bubblewrap tigervnc-standalone-server",
    ),
]

HOME = "/home/airlock"


@pytest.fixture
async def runtime(tmp_path: Path) -> AsyncIterator[SandboxRuntime]:
    rt = SandboxRuntime(tmp_path / "vms", boot_timeout_s=15)
    yield rt
    # Whatever a test left running, by any instance: the state dirs say what exists.
    for vm in await SandboxRuntime(tmp_path / "vms").list():
        await rt.destroy(vm.vm_id)
    assert not any((tmp_path / "vms").iterdir())


async def agent(rt: SandboxRuntime, vm_id: str) -> AgentClient:
    reader, writer = await rt.open_agent(vm_id)
    return AgentClient(reader, writer)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def contained(state_dir: Path, pid: int) -> list[Path]:
    """Check that a VM runs contained (a root controller): its state dir a tmpfs owned by a
    uid of its own, its init that uid, in cgroups with the runtime's limits. Returns the
    cgroup dirs (empty when not root: no containment to check)."""
    if os.geteuid() != 0:
        return []
    uid = state_dir.stat().st_uid
    assert uid >= DEFAULT_UID_BASE and os.path.ismount(state_dir)
    assert oct(state_dir.stat().st_mode & 0o777) == "0o700"
    status = Path(f"/proc/{pid}/status").read_text()
    assert re.search(rf"^Uid:\t{uid}\t{uid}\t{uid}\t{uid}$", status, re.M), status
    cgroups = [Path(c) for c in json.loads((state_dir / "meta.json").read_text())["cgroups"]]
    assert cgroups
    for cgroup in cgroups:
        assert str(pid) in (cgroup / "cgroup.procs").read_text().split()
        limits = {
            "memory.max": str(DEFAULT_LIMITS.memory_mb * 2**20),
            "memory.limit_in_bytes": str(DEFAULT_LIMITS.memory_mb * 2**20),
            "pids.max": str(DEFAULT_LIMITS.pids_max),
            "cpu.weight": str(DEFAULT_LIMITS.cpu_weight),
        }
        for name, value in limits.items():
            if (cgroup / name).exists():
                assert (cgroup / name).read_text().strip() == value, name
    return cgroups


def released(state_dir: Path, cgroups: list[Path]) -> bool:
    """Nothing of a destroyed VM's containment is left: no cgroup, no tmpfs mount."""
    return not [c for c in cgroups if c.exists()] and not os.path.ismount(state_dir)


def pid_namespace(pid: int) -> tuple[int, int]:
    st = os.stat(f"/proc/{pid}/ns/pid")
    return st.st_dev, st.st_ino


def processes_in(ns: tuple[int, int]) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if pid_namespace(int(name)) == ns:
                    found.append(int(name))
            except OSError:
                pass
    return found


async def test_is_a_runtime_and_check_finds_nothing_missing(runtime: SandboxRuntime) -> None:
    assert isinstance(runtime, Runtime)
    assert runtime.name == "sandbox"
    assert await runtime.check() == []
    broken = SandboxRuntime(runtime.vms_dir, bwrap="/nonexistent/bwrap", xvnc="/nonexistent/X")
    problems = await broken.check()
    assert any("apt-get install bubblewrap" in p for p in problems)
    assert any("tigervnc-standalone-server" in p for p in problems)


async def test_browser_vm_serves_agent_and_vnc_and_no_devtools(runtime: SandboxRuntime) -> None:
    vm = await runtime.create(VmSpec(vm_id="br1", role=VmRole.BROWSER, user_id="u1"))
    assert vm.role is VmRole.BROWSER and vm.pid is not None and alive(vm.pid)
    assert vm.state_dir == runtime.vms_dir / "br1"
    assert (vm.state_dir.stat().st_mode & 0o777) == 0o700
    assert (vm.state_dir / "agent.secret").stat().st_mode & 0o777 == 0o600
    meta = json.loads((vm.state_dir / "meta.json").read_text())
    assert {k: meta[k] for k in ("vm_id", "role", "user_id", "runtime")} == {
        "vm_id": "br1",
        "role": "browser",
        "user_id": "u1",
        "runtime": "sandbox",
    }
    assert meta["created_at"]
    pid, start = (vm.state_dir / "pid").read_text().split()
    assert int(pid) == vm.pid and int(start) > 0

    async with await agent(runtime, "br1") as client:
        pong = await client.ping()
        assert pong["role"] == "browser" and pong["display"] == ":0" and pong["browser"]
        hostname = await client.run(["hostname"])
        assert hostname.stdout.strip() == "airlock-br1"
        # Loopback only, and nothing listens on TCP but the agent's egress port and start
        # page (no VNC port: VNC is only on the Unix socket; no DevTools port).
        devices = await client.run(["cat", "/proc/net/dev"])
        assert re.findall(r"^\s*(\w+):", devices.stdout, re.M) == ["lo"]
        net = await client.run(["cat", "/proc/net/tcp", "/proc/net/tcp6"])
        listening = {
            int(m, 16)
            for m in re.findall(r"^\s*\d+: [0-9A-F]+:([0-9A-F]{4}) \S+ 0A", net.stdout, re.M)
        }
        assert listening == {EGRESS_PORT, START_PAGE_PORT}
        # Every process in the VM, by its command line: no remote debugging, no automation
        # (Google refuses to sign in such a browser), and Chromium is among them.
        listing = await client.run(
            ["sh", "-c", "for f in /proc/[0-9]*/cmdline; do tr '\\0' ' ' < $f; echo; done"]
        )
        commands = [line for line in listing.stdout.splitlines() if line.strip()]
        assert any("--user-data-dir=" in line for line in commands), commands
        for flag in ("--remote-debugging", "--enable-automation", "--headless", "9222"):
            assert not any(flag in line for line in commands), (flag, commands)

    reader, writer = await runtime.open_vnc("br1")
    banner = await asyncio.wait_for(reader.readexactly(12), 5)
    writer.close()
    assert re.fullmatch(rb"RFB 003\.00\d\n", banner)

    # The whole VM, Xvnc and Chromium included, is one scheduling group below the controller.
    autogroup, groups = scheduling_groups(vm.pid)
    if autogroup:
        assert len(groups) >= 5  # init, shell, agent, Xvnc, Chromium...
        assert len({group for group, _ in groups.values()}) == 1
        assert {nice for _, nice in groups.values()} == {str(VM_NICE)}


def scheduling_groups(init_pid: int) -> tuple[bool, dict[int, tuple[str, str]]]:
    """Whether the kernel schedules by autogroup, and each VM process's group and nice."""
    enabled = Path("/proc/sys/kernel/sched_autogroup_enabled").read_text().strip() == "1"
    groups = {}
    for pid in vm_pids(init_pid):
        with contextlib.suppress(OSError):
            group, _, nice = Path(f"/proc/{pid}/autogroup").read_text().split()
            groups[pid] = (group, nice)
    return enabled, groups


def vm_pids(init_pid: int) -> list[int]:
    """Host pids of every process in the sandbox's pid namespace but Chromium's crash
    handlers (which make sessions of their own, and idle)."""
    ns = os.stat(f"/proc/{init_pid}/ns/pid").st_ino
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if os.stat(f"/proc/{name}/ns/pid").st_ino != ns:
                    continue
                if Path(f"/proc/{name}/comm").read_text().strip() == "chrome_crashpad":
                    continue
                found.append(int(name))
            except OSError:
                continue
    return found


async def test_hello_with_a_wrong_secret_is_refused(runtime: SandboxRuntime) -> None:
    vm = await runtime.create(VmSpec(vm_id="sec1", role=VmRole.CLI, user_id="u1"))
    reader, writer = await asyncio.open_unix_connection(str(vm.state_dir / "agent.sock"))
    with pytest.raises(AgentError) as refused:
        await AgentClient.connect(reader, writer, "guessed-secret")
    assert refused.value.code == "unauthorized"
    assert isinstance(refused.value, RuntimeFailure)


async def test_destroy_kills_every_process_and_is_idempotent(runtime: SandboxRuntime) -> None:
    vm = await runtime.create(VmSpec(vm_id="d1", role=VmRole.BROWSER, user_id="u1"))
    assert vm.pid is not None
    ns = pid_namespace(vm.pid)
    assert len(processes_in(ns)) > 3  # init, agent, Xvnc, Chromium and its helpers
    cgroups = contained(vm.state_dir, vm.pid)

    assert await runtime.destroy("d1") is True
    assert not alive(vm.pid)
    assert processes_in(ns) == []
    assert not vm.state_dir.exists()
    assert released(vm.state_dir, cgroups)  # its cgroups and tmpfs go with it
    assert await runtime.destroy("d1") is False
    assert await runtime.destroy("never-existed") is False
    assert await runtime.destroy("../../etc") is False
    assert await runtime.list() == []


async def test_a_restarted_controller_finds_and_adopts_its_vms(
    runtime: SandboxRuntime, tmp_path: Path
) -> None:
    vm = await runtime.create(VmSpec(vm_id="keep1", role=VmRole.CLI, user_id="u1"))
    del runtime  # the controller "crashes": nothing in memory survives

    restarted = SandboxRuntime(tmp_path / "vms")
    [found] = await restarted.list()
    assert (found.vm_id, found.role, found.pid, found.state_dir) == (
        "keep1",
        VmRole.CLI,
        vm.pid,
        vm.state_dir,
    )
    assert found.detail["user_id"] == "u1"
    async with await agent(restarted, "keep1") as client:
        assert (await client.ping())["role"] == "cli"
    assert vm.pid is not None
    cgroups = contained(vm.state_dir, vm.pid)
    assert await restarted.destroy("keep1") is True
    assert not alive(vm.pid)
    assert released(vm.state_dir, cgroups)


CONTROLLER = """
import asyncio, sys
from pathlib import Path
from airlock.domain.vms import VmRole
from airlock.runtimes.base import VmSpec
from airlock.runtimes.sandbox import SandboxRuntime

async def main():
    rt = SandboxRuntime(Path(sys.argv[1]))
    vm = await rt.create(VmSpec(vm_id="orphan1", role=VmRole.BROWSER, user_id="u1"))
    print(vm.pid, flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


async def test_a_vm_outlives_a_controller_killed_with_sigkill(
    runtime: SandboxRuntime, tmp_path: Path
) -> None:
    controller = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CONTROLLER, str(tmp_path / "vms"), stdout=asyncio.subprocess.PIPE
    )
    assert controller.stdout is not None
    line = await asyncio.wait_for(controller.stdout.readline(), 30)
    pid = int(line)
    controller.kill()  # kill -9: no cleanup code of the controller runs
    await controller.wait()
    await asyncio.sleep(0.2)
    assert alive(pid)
    [found] = await runtime.list()  # a restarted controller finds it ...
    assert (found.vm_id, found.pid, found.role) == ("orphan1", pid, VmRole.BROWSER)
    async with await agent(runtime, "orphan1") as client:  # ... can use it ...
        assert (await client.ping())["display"] == ":0"
    reader, writer = await runtime.open_vnc("orphan1")
    assert (await reader.readexactly(4)) == b"RFB "
    writer.close()
    assert await runtime.destroy("orphan1") is True  # ... and reap it
    assert not alive(pid)


async def test_a_vm_killed_behind_the_runtimes_back_is_not_listed(runtime: SandboxRuntime) -> None:
    vm = await runtime.create(VmSpec(vm_id="gone1", role=VmRole.CLI, user_id="u1"))
    other = await runtime.create(VmSpec(vm_id="stay1", role=VmRole.CLI, user_id="u1"))
    assert vm.pid is not None
    os.kill(vm.pid, signal.SIGKILL)
    await wait_for(lambda: not alive(vm.pid), timeout=10, interval=0.02)
    assert [v.vm_id for v in await runtime.list()] == [other.vm_id]
    assert not vm.state_dir.exists()  # cleaned up: nothing runs there any more
    assert await runtime.destroy("gone1") is False


async def test_a_pid_file_naming_another_process_kills_only_the_sandbox(
    runtime: SandboxRuntime,
) -> None:
    vm = await runtime.create(VmSpec(vm_id="reuse1", role=VmRole.CLI, user_id="u1"))
    assert vm.pid is not None
    # The pid file names a live process that is not the sandbox (pid reuse, or tampering):
    # here the test process itself, with the sandbox's start time.
    _, start = (vm.state_dir / "pid").read_text().split()
    (vm.state_dir / "pid").write_text(f"{os.getpid()} {start}\n")
    [found] = await runtime.list()  # still reported (found by its command line) ...
    assert (found.vm_id, found.pid, found.detail["state"]) == ("reuse1", None, "unrecorded")
    assert await runtime.destroy("reuse1") is True  # ... so it can be destroyed,
    assert not alive(vm.pid)
    assert alive(os.getpid())  # and the process the pid file named lives on


async def test_two_concurrent_browser_creates(runtime: SandboxRuntime) -> None:
    a, b = await asyncio.gather(
        runtime.create(VmSpec(vm_id="c1", role=VmRole.BROWSER, user_id="u1")),
        runtime.create(VmSpec(vm_id="c2", role=VmRole.BROWSER, user_id="u2")),
    )
    assert a.pid != b.pid
    assert sorted(v.vm_id for v in await runtime.list()) == ["c1", "c2"]
    for vm_id in ("c1", "c2"):
        async with await agent(runtime, vm_id) as client:
            assert (await client.ping())["display"] == ":0"


async def test_cli_vm_has_no_screen_and_a_persistent_home(runtime: SandboxRuntime) -> None:
    vm = await runtime.create(VmSpec(vm_id="cli1", role=VmRole.CLI, user_id="u1"))
    async with await agent(runtime, "cli1") as client:
        pong = await client.ping()
        assert pong["role"] == "cli" and "display" not in pong
        ps = await client.run(["ps", "-e", "-o", "comm="])
        assert not {"Xvnc", "chromium"} & set(ps.stdout.split())
        await client.write_files({".tool/creds.json": b'{"t": 1}'})
    assert not (vm.state_dir / "vnc.sock").exists()
    assert (vm.state_dir / "home" / ".tool" / "creds.json").read_bytes() == b'{"t": 1}'
    with pytest.raises(RuntimeFailure):
        await runtime.open_vnc("cli1")


CAPTURE_SCRIPT = """
import json, os, time
time.sleep(0.3)
os.makedirs(os.path.expanduser("~/.demo"), exist_ok=True)
with open(os.path.expanduser("~/.demo/credentials.json"), "w") as f:
    json.dump({"access_token": "at-123", "refresh_token": "rt-456"}, f)
time.sleep(30)
"""


async def test_login_capture_then_ack_wipes_the_files(runtime: SandboxRuntime) -> None:
    await runtime.create(VmSpec(vm_id="cap1", role=VmRole.BROWSER, user_id="u1"))
    plan = LoginPlan(
        provider="demo", argv=["{python}", "-c", CAPTURE_SCRIPT], watch=[".demo/credentials.json"]
    )
    async with await agent(runtime, "cap1") as client:
        await client.start_login(plan)
        result = await client.capture(timeout_s=10)
        assert result["captured"] is True
        files = await client.capture_files(0)
        assert files is not None
        assert json.loads(files[".demo/credentials.json"]) == {
            "access_token": "at-123",
            "refresh_token": "rt-456",
        }
        assert await client.ack_capture() == [".demo/credentials.json"]
        check = await client.run(["ls", "-A", f"{HOME}/.demo"])
        assert check.exit_code == 0 and check.stdout == ""
        assert (await client.login_status())["captured"] is False


async def test_write_files_is_atomic_with_mode_0600(runtime: SandboxRuntime) -> None:
    vm = await runtime.create(VmSpec(vm_id="wf1", role=VmRole.CLI, user_id="u1"))
    vm_uid = vm.state_dir.stat().st_uid  # the VM's own host uid, which owns its state dir
    async with await agent(runtime, "wf1") as client:
        for n in range(3):  # overwrite in place, never a partial file or a leftover temp file
            written = await client.write_files({".claude/.credentials.json": b'{"n": %d}' % n})
            assert written == [".claude/.credentials.json"]
        stat = await client.run(
            ["stat", "-c", "%a %u %n", f"{HOME}/.claude", f"{HOME}/.claude/.credentials.json"]
        )
        assert stat.stdout.splitlines() == [
            f"700 {vm_uid} {HOME}/.claude",
            f"600 {vm_uid} {HOME}/.claude/.credentials.json",
        ]
        listing = await client.run(["ls", "-A", f"{HOME}/.claude"])
        assert listing.stdout.split() == [".credentials.json"]
        cat = await client.run(["cat", f"{HOME}/.claude/.credentials.json"])
        assert cat.stdout == '{"n": 2}'


async def test_the_data_dir_and_controller_env_are_not_visible_inside(
    runtime: SandboxRuntime, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret_key = tmp_path / "secret.key"  # next to vms_dir, as in a real data dir
    secret_key.write_bytes(b"top secret key material")
    (tmp_path / "airlock.db").write_bytes(b"SQLite format 3\0")
    monkeypatch.setenv("AIRLOCK_DATABASE_URL", "postgresql://airlock:hunter2@db/airlock")
    vm = await runtime.create(VmSpec(vm_id="iso1", role=VmRole.CLI, user_id="u1"))
    async with await agent(runtime, "iso1") as client:
        cat = await client.run(["cat", str(secret_key)])
        assert cat.exit_code != 0 and "top secret" not in cat.stdout
        ls = await client.run(["ls", str(tmp_path)])
        assert ls.exit_code != 0
        env = await client.run(["env"])
        assert "hunter2" not in env.stdout and "AIRLOCK_DATABASE_URL" not in env.stdout
        # The controller's files in the state dir are read-only from inside.
        tamper = await client.run(["sh", "-c", "echo 1 1 > /run/airlock/pid"])
        assert tamper.exit_code != 0
        shadow = await client.run(["cat", "/etc/shadow"])
        assert shadow.stdout == ""
    assert (vm.state_dir / "pid").read_text().split()[0] == str(vm.pid)


async def echo_server(path: Path, vm_uid: int) -> asyncio.Server:
    """A stand-in for the egress proxy, whose socket, like the proxy's, the VM's uid may
    connect to (a VM runs as its own unprivileged uid)."""

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read(100)
        writer.write(b"echo:" + data)
        await writer.drain()
        writer.close()

    server = await asyncio.start_unix_server(echo, path=str(path))
    os.chown(path, vm_uid, vm_uid)
    return server


CONNECT_3128 = """
import socket
s = socket.create_connection(("127.0.0.1", 3128), timeout=5)
s.sendall(b"hello egress")
print(s.recv(100).decode() or "<closed>")
"""


async def test_egress_forwarder_pipes_to_the_hosts_socket(runtime: SandboxRuntime) -> None:
    vm = await runtime.create(VmSpec(vm_id="eg1", role=VmRole.BROWSER, user_id="u1"))
    async with await agent(runtime, "eg1") as client:
        # No proxy for this VM yet: the forwarder accepts and closes, it does not hang.
        before = await client.run([sys.executable, "-c", CONNECT_3128])
        assert before.stdout.strip() == "<closed>", before.stderr
        server = await echo_server(vm.state_dir / "egress.sock", vm.state_dir.stat().st_uid)
        try:
            after = await client.run([sys.executable, "-c", CONNECT_3128])
        finally:
            server.close()
            await server.wait_closed()
    assert after.stdout.strip() == "echo:hello egress", after.stderr


async def test_egress_socket_elsewhere_is_carried_in(
    runtime: SandboxRuntime, tmp_path: Path
) -> None:
    egress_dir = tmp_path / "eg"
    egress_dir.mkdir(mode=0o700)
    socket_path = egress_dir / "vm.sock"
    spec = VmSpec(vm_id="eg2", role=VmRole.CLI, user_id="u1", egress_socket=socket_path)
    vm = await runtime.create(spec)
    os.chown(egress_dir, vm.state_dir.stat().st_uid, -1)  # the VM's uid must reach the socket
    # The proxy may start (and restart, with a new socket inode) after the VM boots.
    for attempt in range(2):
        server = await echo_server(socket_path, vm.state_dir.stat().st_uid)
        try:
            async with await agent(runtime, "eg2") as client:
                result = await client.run([sys.executable, "-c", CONNECT_3128])
        finally:
            server.close()
            await server.wait_closed()
        assert result.stdout.strip() == "echo:hello egress", (attempt, result.stderr)


async def test_a_failed_boot_leaves_nothing_behind(tmp_path: Path) -> None:
    rt = SandboxRuntime(tmp_path / "vms", chromium="/bin/false", boot_timeout_s=3)
    started = time.monotonic()
    with pytest.raises(RuntimeFailure) as failed:
        await rt.create(VmSpec(vm_id="bad1", role=VmRole.BROWSER, user_id="u1"))
    assert time.monotonic() - started < 10
    assert "did not boot" in failed.value.message
    assert "chromium exited" in failed.value.message  # the tail of agent.log
    assert not (tmp_path / "vms" / "bad1").exists()
    assert await rt.list() == []
    assert not [
        p for p in os.listdir("/proc") if p.isdigit() and _cmdline_has(int(p), b"/vms/bad1\0")
    ]


def _cmdline_has(pid: int, needle: bytes) -> bool:
    try:
        return needle in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


async def test_create_refuses_an_existing_vm_id(runtime: SandboxRuntime) -> None:
    await runtime.create(VmSpec(vm_id="dup1", role=VmRole.CLI, user_id="u1"))
    with pytest.raises(RuntimeFailure) as dup:
        await runtime.create(VmSpec(vm_id="dup1", role=VmRole.CLI, user_id="u1"))
    assert dup.value.code == "vm_exists"
    async with await agent(runtime, "dup1") as client:  # the first one is untouched
        assert (await client.ping())["role"] == "cli"


async def test_list_raises_when_vms_dir_cannot_be_read(tmp_path: Path) -> None:
    rt = SandboxRuntime(tmp_path / "vms")
    (tmp_path / "vms").rmdir()
    (tmp_path / "vms").write_text("not a directory")
    with pytest.raises(RuntimeFailure):
        await rt.list()


async def test_browser_create_latency(runtime: SandboxRuntime) -> None:
    """Boot time of a browser VM until agent, VNC and Chromium (its start page) answer (< 1.5 s
    on 2 cores). Asserted loosely here; the report quotes the measured median."""
    times = []
    for n in range(3):
        started = time.monotonic()
        await runtime.create(VmSpec(vm_id=f"lat{n}", role=VmRole.BROWSER, user_id="u1"))
        times.append(time.monotonic() - started)
        await runtime.destroy(f"lat{n}")
    median = sorted(times)[1]
    print(f"browser VM create: median {median * 1000:.0f} ms of {[round(t, 3) for t in times]}")
    assert median < 5


async def test_a_cancelled_create_leaves_nothing_behind(tmp_path: Path) -> None:
    rt = SandboxRuntime(tmp_path / "vms")
    task = asyncio.create_task(rt.create(VmSpec(vm_id="cx1", role=VmRole.BROWSER, user_id="u")))
    # Until mid-boot: the agent is up, Chromium is not yet.
    await wait_for((tmp_path / "vms" / "cx1" / "agent.sock").exists, timeout=5, interval=0.01)
    pid = int((tmp_path / "vms" / "cx1" / "pid").read_text().split()[0])
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not alive(pid)
    assert not (tmp_path / "vms" / "cx1").exists()


async def test_state_dirs_deeper_than_a_unix_socket_path_allows(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    rt = SandboxRuntime(deep / "vms")
    vm = await rt.create(VmSpec(vm_id="deep1", role=VmRole.CLI, user_id="u1"))
    try:
        assert len(str(vm.state_dir / "agent.sock")) > 108
        async with await agent(rt, "deep1") as client:
            assert (await client.ping())["role"] == "cli"
    finally:
        assert await rt.destroy("deep1") is True


async def test_when_the_agent_dies_the_whole_vm_goes(runtime: SandboxRuntime) -> None:
    vm = await runtime.create(VmSpec(vm_id="ag1", role=VmRole.BROWSER, user_id="u1"))
    assert vm.pid is not None
    ns = pid_namespace(vm.pid)
    [agent_pid] = [
        p
        for p in processes_in(ns)
        if _cmdline_has(p, b"airlock.agent.server\0") and not _cmdline_has(p, b"/bin/sh\0")
    ]
    os.kill(agent_pid, signal.SIGKILL)
    await wait_for(lambda: not processes_in(ns), timeout=10, interval=0.02)
    assert processes_in(ns) == []  # Xvnc and Chromium did not outlive it
    assert await runtime.list() == []


async def test_the_vm_cannot_point_the_controller_at_a_host_socket(
    runtime: SandboxRuntime, tmp_path: Path
) -> None:
    vm = await runtime.create(VmSpec(vm_id="sym1", role=VmRole.BROWSER, user_id="u1"))
    connections: list[str] = []

    def counter(name: str) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], None]:
        def count(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            connections.append(name)
            writer.close()

        return count

    host_socket = tmp_path / "host.sock"  # some socket of the host the VM would like to reach
    server = await asyncio.start_unix_server(counter("host"), path=str(host_socket))
    try:
        async with await agent(runtime, "sym1") as client:
            swap = await client.run(
                [
                    "sh",
                    "-c",
                    f"rm /run/airlock/vnc.sock && ln -s {host_socket} /run/airlock/vnc.sock",
                ]
            )
            assert swap.exit_code == 0, swap.stderr
        with pytest.raises(RuntimeFailure):
            await runtime.open_vnc("sym1")
        # Even a real socket there (a swap racing our check) must be served from inside the VM.
        (vm.state_dir / "vnc.sock").unlink()
        impostor = await asyncio.start_unix_server(
            counter("impostor"), path=str(vm.state_dir / "vnc.sock")
        )
        try:
            with pytest.raises(RuntimeFailure):
                await runtime.open_vnc("sym1")
        finally:
            impostor.close()
    finally:
        server.close()
    assert "host" not in connections  # the symlink was never followed
