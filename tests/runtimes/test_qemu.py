"""The ``qemu`` runtime for real: the minimal guest image booted by QEMU (TCG on machines
where KVM cannot run a stock kernel), its agent reached over the virtio-serial multiplexer.

Each boot takes seconds under TCG, so one VM serves several checks."""

from __future__ import annotations

import asyncio
import json
import os
import select
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from airlock.agent.client import FileWrite
from airlock.domain.vms import VmRole
from airlock.errors import RuntimeFailure
from airlock.runtimes.base import VmSpec
from airlock.runtimes.qemu import QemuRuntime, kvm_openable, probe_kvm
from airlock.runtimes.vmdir import UNIX_PATH_MAX, unix_path
from tests.qemu_image import image_dir, minimal_image

# A test may build the image first (make test builds it before pytest; plain pytest may not).
pytestmark = [pytest.mark.qemu, pytest.mark.timeout(900)]

MINIMAL = {VmRole.BROWSER: "minimal", VmRole.CLI: "minimal"}


# The VMs live this deep, so every socket path in a state dir is longer than sun_path's 107
# bytes, as under an operator's deep data dir (QEMU could not bind them: it failed to start).
DEEP = "a-data-dir-deep-enough-that-its-socket-paths-pass-sun-path-107-bytes"


@pytest.fixture
async def runtime(tmp_path: Path) -> AsyncIterator[QemuRuntime]:
    minimal_image()
    vms = tmp_path / DEEP / "vms"
    rt = QemuRuntime(vms, image_dir(), flavors=MINIMAL, boot_timeout_s=90)
    yield rt
    for vm in await QemuRuntime(vms, image_dir(), flavors=MINIMAL).list():
        await rt.destroy(vm.vm_id)
    assert not vms.exists() or not any(vms.iterdir())


def qemu_pids(state_dir: Path) -> list[int]:
    from airlock.runtimes.qemu import _find_qemu

    return _find_qemu(state_dir)


async def test_boot_agent_lifecycle_and_adoption(runtime: QemuRuntime, tmp_path: Path) -> None:
    vm = await runtime.create(VmSpec(vm_id="q1", role=VmRole.CLI, user_id="alice"))
    usable, _why = probe_kvm(runtime.qemu or "", minimal_image(), image_dir())
    assert vm.detail["accel"] == ("kvm" if usable else "tcg")
    assert vm.pid is not None and qemu_pids(vm.state_dir) == [vm.pid]
    meta = json.loads((vm.state_dir / "meta.json").read_text())
    assert meta["accel"] == vm.detail["accel"]
    # QEMU runs unprivileged: the VM's own uid (the owner of its state dir's uid file), no
    # capabilities, under its seccomp filter (-sandbox on).
    status_text = await asyncio.to_thread(Path(f"/proc/{vm.pid}/status").read_text)
    status = dict(line.split(":", 1) for line in status_text.splitlines())
    if os.geteuid() == 0:
        uid = os.stat(vm.state_dir / "uid").st_uid
        assert uid != 0 and status["Uid"].split() == [str(uid)] * 4
    assert int(status["CapEff"], 16) == 0 and status["Seccomp"].strip() == "2"
    # No network device: the guest has loopback only.
    async with await runtime.agent_client("q1") as agent:
        assert (await agent.ping()) is not None
        links = await agent.run(["busybox", "ip", "-o", "link"], timeout_s=20)
        assert links.exit_code == 0
        assert [ln.split(":")[1].strip() for ln in links.stdout.splitlines()] == ["lo"]
        # write_files then read back through run, on a second channel at the same time.
        await agent.write_files([FileWrite(".airlock/t/hello.txt", b"hi from the host")])
        async with await runtime.agent_client("q1") as other:
            cat = await other.run(["cat", "/root/.airlock/t/hello.txt"], timeout_s=20)
            mode = await other.run(["stat", "-c", "%a", "/root/.airlock/t/hello.txt"])
        assert cat.exit_code == 0 and cat.stdout == "hi from the host"
        assert mode.stdout.strip() == "600"

    # The guest reaches the controller's egress proxy socket (here a stand-in that greets)
    # through the agent's 127.0.0.1:3128 and the multiplexer: its only way out.
    async def greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"egress-ok " + await reader.readexactly(4))
        await writer.drain()
        writer.close()

    assert len(os.fsencode(vm.state_dir / "agent.sock")) > UNIX_PATH_MAX
    with unix_path(vm.state_dir / "egress.sock") as egress_name:
        proxy = await asyncio.start_unix_server(greet, egress_name)
    probe = (
        "import socket; s = socket.create_connection(('127.0.0.1', 3128), 10); "
        "s.sendall(b'ping'); print(s.recv(100).decode())"
    )
    try:
        async with await runtime.agent_client("q1") as agent:
            out = await agent.run(["python3", "-c", probe], timeout_s=30)
    finally:
        proxy.close()
    assert out.stdout.strip() == "egress-ok ping", out
    # The secret is not on QEMU's command line (any host user can read that).
    secret = (vm.state_dir / "agent.secret").read_text().strip()
    cmdline = await asyncio.to_thread(Path(f"/proc/{vm.pid}/cmdline").read_bytes)
    assert secret.encode() not in cmdline

    # A restarted controller (a new runtime object) finds the VM and talks to it.
    adopted = QemuRuntime(tmp_path / DEEP / "vms", image_dir(), flavors=MINIMAL)
    [found] = await adopted.list()
    assert (found.vm_id, found.pid, found.role) == ("q1", vm.pid, VmRole.CLI)
    assert found.detail["accel"] == vm.detail["accel"]
    async with await adopted.agent_client("q1") as agent:
        result = await agent.run(["echo", "adopted"], timeout_s=20)
    assert result.stdout.strip() == "adopted"

    # Destroy: QMP quit, then every process and file is gone; again is a no-op.
    mux = int((vm.state_dir / "mux.pid").read_text().split()[0])
    assert await adopted.destroy("q1") is True
    assert not vm.state_dir.exists() and qemu_pids(vm.state_dir) == []
    assert _zombie(mux)  # gone (or a zombie its parent, this test process, has yet to reap)
    assert await adopted.destroy("q1") is False
    assert await runtime.list() == []


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


async def test_vm_killed_behind_its_back_is_gone_from_list(runtime: QemuRuntime) -> None:
    vm = await runtime.create(VmSpec(vm_id="q2", role=VmRole.BROWSER, user_id="bob"))
    assert vm.pid is not None
    # Wait on a pidfd, not on /proc/<pid>/cmdline: the command line empties while the process
    # is still exiting, before it is a zombie, and list() rightly counts it until then.
    pidfd = os.pidfd_open(vm.pid)
    try:
        os.kill(vm.pid, signal.SIGKILL)
        assert select.select([pidfd], [], [], 10)[0], "QEMU did not exit after SIGKILL"
    finally:
        os.close(pidfd)
    assert await runtime.list() == []
    assert not vm.state_dir.exists()  # list() cleaned up the dead VM's files
    with pytest.raises(RuntimeFailure):
        await runtime.open_agent("q2")


async def test_bad_input_changes_nothing(runtime: QemuRuntime, tmp_path: Path) -> None:
    with pytest.raises(RuntimeFailure) as bad:
        await runtime.create(VmSpec(vm_id="../x", role=VmRole.CLI, user_id="a"))
    assert bad.value.code == "bad_vm_id"
    no_images = QemuRuntime(tmp_path / "vms", tmp_path / "no-images")
    with pytest.raises(RuntimeFailure) as missing:
        await no_images.create(VmSpec(vm_id="q3", role=VmRole.CLI, user_id="a"))
    assert missing.value.code == "image_missing"
    assert "airlock image build --flavor cli" in str(missing.value)  # a CLI VM's default
    assert any("airlock image build" in p for p in await no_images.check())
    assert not (tmp_path / "vms" / "q3").exists()


async def test_check_says_whether_qemu_can_run_sandboxed(tmp_path: Path) -> None:
    here = QemuRuntime(tmp_path / "vms", tmp_path / "no-images")
    assert not [p for p in await here.check() if "-sandbox" in p]  # Debian's QEMU has seccomp
    # A QEMU that refuses the option (as one built without seccomp does) is named as such.
    refusing = QemuRuntime(tmp_path / "vms", tmp_path / "no-images", qemu="/bin/false")
    assert [p for p in await refusing.check() if "cannot run with -sandbox" in p]


def test_kvm_probe_is_cached(tmp_path: Path) -> None:
    image = minimal_image()
    if kvm_openable() is not None:
        pytest.skip(f"no usable /dev/kvm here ({kvm_openable()}): the probe never runs")
    first = probe_kvm("qemu-system-x86_64", image, tmp_path)
    cache = json.loads((tmp_path / "kvm-probe.json").read_text())
    [entry] = cache.values()
    assert (entry["usable"], entry["why"]) == first
    # A cached answer is returned without booting (a missing binary would fail a real probe).
    assert probe_kvm("/nonexistent/qemu", image, tmp_path) == first


async def test_a_browser_vm_whose_lease_runs_out_powers_itself_off(
    runtime: QemuRuntime,
) -> None:
    """No controller renews it: the guest agent's lease runs out, the guest init reboots the
    guest, and QEMU (``-no-reboot``) exits. The minimal image has no screen, so its browser
    VM's agent runs headless as "cli": leased all the same."""
    spec = VmSpec(
        vm_id="q3", role=VmRole.BROWSER, user_id="bob", lease_ms=4000, lease_margin_ms=1000
    )
    vm = await runtime.create(spec)
    assert vm.pid is not None
    async with await runtime.agent_client("q3") as agent:
        ends_in = (await agent.ping())["lease_ends_in_ms"]
    assert 0 < ends_in <= 5000
    pidfd = os.pidfd_open(vm.pid)
    try:
        exited = await asyncio.to_thread(select.select, [pidfd], [], [], 60)
        assert exited[0], "QEMU still runs a minute after the lease ran out"
    finally:
        os.close(pidfd)
    assert await runtime.list() == []
