"""The ``firecracker`` runtime.

Firecracker cannot run on the build machines (their /dev/kvm is kvm-pvm), so most of these
drive ``airlock.runtimes.firecracker_api_double``, a first-class test double of the VMM whose
guest is a real agent process; every request the runtime sends is checked against
Firecracker's OpenAPI spec. The network namespaces, taps, chroots and cgroups are real. The
real-boot test runs where a ``firecracker`` binary and a usable KVM exist.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import select
import shutil
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import jsonschema
import pytest

from airlock.agent.client import AgentClient, AgentError
from airlock.domain.vms import VmRole
from airlock.errors import RuntimeFailure
from airlock.runtimes.base import VmSpec
from airlock.runtimes.firecracker import AGENT_PORT, FirecrackerRuntime
from airlock.runtimes.firecracker_api_double import VsockMuxer
from airlock.runtimes.firecracker_vmm import (
    ApiCall,
    BootPlan,
    GuestImage,
    Jail,
    boot_calls,
    cgroup_version,
    create_netns,
    delete_netns,
    netns_exists,
    netns_links,
    netns_name,
    restore_calls,
    snapshot_calls,
    vsock_connect,
)
from airlock.runtimes.kvm_probe import kvm_problem
from tests.runtimes.firecracker_spec import validate

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None, reason="network namespaces need root and ip"
)
DOUBLE = [sys.executable, "-m", "airlock.runtimes.firecracker_api_double"]
# Network namespaces and cgroups are host-wide: names unique to this run, so two test runs
# on one machine never touch each other's.
RUN = secrets.token_hex(3)


def plan() -> BootPlan:
    return BootPlan(
        kernel="vmlinux",
        initrd="initrd.img",
        rootfs="rootfs.ext4",
        config_disk="config.img",
        vsock_uds="v.sock",
        boot_args="console=ttyS0 root=/dev/vda rw",
    )


# --- the requests against the spec ----------------------------------------------------------


def test_boot_snapshot_and_restore_requests_match_the_spec() -> None:
    calls = [
        *boot_calls(plan()),
        *snapshot_calls("vm.snap", "vm.mem"),
        *restore_calls("vm.snap", "vm.mem", tap="tap0", vsock_uds="v.sock"),
    ]
    for call in calls:
        validate(call.method, call.path, call.body)
    assert [(c.method, c.path) for c in boot_calls(plan())] == [
        ("PUT", "/machine-config"),
        ("PUT", "/boot-source"),
        ("PUT", "/drives/rootfs"),
        ("PUT", "/drives/config"),
        ("PUT", "/network-interfaces/eth0"),
        ("PUT", "/vsock"),
        ("PUT", "/entropy"),
        ("PUT", "/actions"),
    ]


@pytest.mark.parametrize(
    "call",
    [
        ApiCall("PATCH", "/vm", {"state": "Stopped"}),  # not in the enum
        ApiCall("PUT", "/actions", {"action_type": "Start"}),
        ApiCall("PUT", "/drives/rootfs", {"drive_id": "rootfs"}),  # is_root_device missing
        ApiCall("PUT", "/snapshot/create", {"snapshot_path": "s"}),  # mem_file_path missing
        ApiCall("PUT", "/vsock", {"guest_cid": 2, "uds_path": "v.sock"}),  # cid below 3
        ApiCall("PUT", "/machine-config", {"vcpu_count": 64, "mem_size_mib": 128}),
        ApiCall("POST", "/actions", {"action_type": "InstanceStart"}),  # no such method
        ApiCall("PUT", "/nowhere", {}),
    ],
)
def test_the_validator_rejects_what_the_spec_forbids(call: ApiCall) -> None:
    with pytest.raises((AssertionError, jsonschema.ValidationError)):
        validate(call.method, call.path, call.body)


# --- vsock ---------------------------------------------------------------------------------


async def test_vsock_handshake_as_firecracker_documents_it(tmp_path: Path) -> None:
    """Host connects to the vsock socket, writes ``CONNECT 1024\\n``, reads ``OK <port>\\n``,
    then bytes flow; a guest port nobody listens on gets the connection closed."""

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(1024):
            writer.write(data.upper())
            await writer.drain()
        writer.close()

    guest = await asyncio.start_unix_server(echo, path=str(tmp_path / "guest-1024.sock"))
    muxer = VsockMuxer(tmp_path / "v.sock", {AGENT_PORT: tmp_path / "guest-1024.sock"})
    await muxer.start()
    try:
        reader, writer = await vsock_connect(tmp_path / "v.sock", AGENT_PORT)
        writer.write(b"hello\n")
        assert await reader.readline() == b"HELLO\n"  # nothing of "OK ..." left over
        writer.close()

        raw_reader, raw_writer = await asyncio.open_unix_connection(str(tmp_path / "v.sock"))
        raw_writer.write(b"CONNECT 1024\n")
        line = await raw_reader.readline()
        assert line.startswith(b"OK ") and line[3:-1].isdigit()
        raw_writer.close()

        with pytest.raises(ConnectionError, match="nothing listens on guest vsock port 5900"):
            await vsock_connect(tmp_path / "v.sock", 5900)
    finally:
        await muxer.close()
        guest.close()


# --- the runtime through the double ----------------------------------------------------------


@pytest.fixture
def image(tmp_path: Path) -> GuestImage:
    d = tmp_path / "image"
    d.mkdir()
    (d / "vmlinux").write_bytes(b"\x7fELF kernel stand-in")
    (d / "initrd.img").write_bytes(b"initrd stand-in")
    with open(d / "rootfs.ext4", "wb") as f:
        f.truncate(8 << 20)  # sparse
    (d / "manifest.json").write_text(json.dumps({"cmdline": "console=ttyS0 root=/dev/vda rw"}))
    return GuestImage.from_dir(d)


@pytest.fixture
async def runtime(tmp_path: Path, image: GuestImage) -> AsyncIterator[FirecrackerRuntime]:
    record = tmp_path / "requests.jsonl"
    rt = FirecrackerRuntime(
        tmp_path / "vms", image=image, firecracker=[*DOUBLE, "--record", str(record)]
    )
    rt.boot_timeout_s = 20
    yield rt
    for vm in await rt.list():
        await rt.destroy(vm.vm_id)
    assert await rt.list() == []


def recorded(tmp_path: Path) -> list[dict[str, object]]:
    lines = (tmp_path / "requests.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


async def agent_secret_works(rt: FirecrackerRuntime, vm_id: str, secret: str) -> bool:
    reader, writer = await vsock_connect(rt.vms_dir / vm_id / "v.sock", AGENT_PORT)
    try:
        client = await AgentClient.connect(reader, writer, secret, timeout_s=5)
    except AgentError as exc:
        assert exc.code == "unauthorized"
        return False
    await client.close()
    return True


@needs_root
async def test_boot_snapshot_restore_and_destroy(
    runtime: FirecrackerRuntime, tmp_path: Path
) -> None:
    spec = VmSpec(vm_id=f"vm-tmpl-{RUN}", role=VmRole.CLI, user_id="alice")
    vm = await runtime.create(spec)
    state_dir = runtime.vms_dir / f"vm-tmpl-{RUN}"
    assert vm.state_dir == state_dir and vm.pid is not None
    assert netns_exists(netns_name(f"vm-tmpl-{RUN}")) and "tap0" in netns_links(
        netns_name(f"vm-tmpl-{RUN}")
    )
    assert os.readlink(state_dir / "v.sock_3128") == "egress.sock"  # guest -> egress proxy
    assert (state_dir / "config.img").stat().st_size == 4096
    agent = await runtime.agent_client(f"vm-tmpl-{RUN}")  # over the vsock handshake
    assert (await agent.ping())["role"] == "cli"
    await agent.close()
    assert [v.vm_id for v in await runtime.list()] == [f"vm-tmpl-{RUN}"]
    template_secret = (state_dir / "agent.secret").read_text().strip()

    template = await runtime.snapshot(f"vm-tmpl-{RUN}", tmp_path / "template")
    assert not state_dir.exists() and not netns_exists(
        netns_name(f"vm-tmpl-{RUN}")
    )  # never resumed

    clones = [
        await runtime.restore(
            VmSpec(vm_id=f"vm-clone{i}-{RUN}", role=VmRole.CLI, user_id="bob"), template
        )
        for i in (1, 2)
    ]
    secrets_ = {(c.state_dir / "agent.secret").read_text().strip() for c in clones}
    assert len(secrets_) == 2 and template_secret not in secrets_  # a fresh one each
    for clone in clones:
        assert not await agent_secret_works(runtime, clone.vm_id, template_secret)
        assert netns_exists(netns_name(clone.vm_id))
        reader, writer = await runtime.open_agent(clone.vm_id)
        assert (await AgentClient(reader, writer).ping())["role"] == "cli"
        writer.close()

    requests = recorded(tmp_path)
    for r in requests:
        validate(str(r["method"]), str(r["path"]), r["body"])
    sequence = [f"{r['method']} {r['path']}" for r in requests]
    assert sequence[:8] == [f"{c.method} {c.path}" for c in boot_calls(plan())]
    assert sequence[8:10] == ["PATCH /vm", "PUT /snapshot/create"]
    assert sequence[10:] == ["PUT /snapshot/load", "PATCH /vm"] * 2
    loads = [r["body"] for r in requests if r["path"] == "/snapshot/load"]
    assert all(b["vsock_override"] and b["network_overrides"] for b in loads)  # type: ignore[index]

    assert await runtime.destroy(f"vm-clone1-{RUN}") is True
    assert await runtime.destroy(f"vm-clone1-{RUN}") is False  # idempotent
    assert not netns_exists(netns_name(f"vm-clone1-{RUN}"))
    assert not (runtime.vms_dir / f"vm-clone1-{RUN}").exists()


@needs_root
async def test_a_failed_boot_leaves_nothing(runtime: FirecrackerRuntime, image: GuestImage) -> None:
    os.unlink(image.kernel)  # Firecracker refuses the boot source
    runtime.image = GuestImage(image.kernel, image.rootfs, image.initrd, image.boot_args)
    (runtime.vms_dir).mkdir(exist_ok=True)
    with pytest.raises(RuntimeFailure, match="no guest image"):
        await runtime.create(VmSpec(vm_id=f"vm-bad-{RUN}", role=VmRole.CLI, user_id="a"))
    image.kernel.write_bytes(b"kernel")
    runtime.firecracker = [sys.executable, "-c", "import sys; sys.exit(3)"]
    with pytest.raises(RuntimeFailure, match="exited with 3"):
        await runtime.create(VmSpec(vm_id=f"vm-bad-{RUN}", role=VmRole.CLI, user_id="a"))
    assert not (runtime.vms_dir / f"vm-bad-{RUN}").exists()
    assert not netns_exists(netns_name(f"vm-bad-{RUN}"))


@needs_root
async def test_list_after_a_restart_and_a_vmm_killed_behind_its_back(
    runtime: FirecrackerRuntime, image: GuestImage, tmp_path: Path
) -> None:
    vm = await runtime.create(VmSpec(vm_id=f"vm-adopt-{RUN}", role=VmRole.CLI, user_id="a"))
    fresh = FirecrackerRuntime(runtime.vms_dir, image=image, firecracker=DOUBLE)
    assert [(v.vm_id, v.pid) for v in await fresh.list()] == [(f"vm-adopt-{RUN}", vm.pid)]
    assert (await (await fresh.agent_client(f"vm-adopt-{RUN}")).ping())["role"] == "cli"
    assert vm.pid is not None
    os.kill(vm.pid, 9)
    await asyncio.sleep(0.2)
    assert await fresh.list() == []  # gone: its netns and files are cleaned up too
    assert not netns_exists(netns_name(f"vm-adopt-{RUN}"))
    assert not (runtime.vms_dir / f"vm-adopt-{RUN}").exists()


@needs_root
async def test_warm_starts_restore_a_template_made_once(tmp_path: Path, image: GuestImage) -> None:
    record = tmp_path / "requests.jsonl"
    rt = FirecrackerRuntime(
        tmp_path / "vms",
        image=image,
        firecracker=[*DOUBLE, "--record", str(record)],
        templates_dir=tmp_path / "templates",
        boot_timeout_s=20,
    )
    boot = [f"{c.method} {c.path}" for c in boot_calls(plan())]
    restore = ["PUT /snapshot/load", "PATCH /vm"]
    try:
        a = await rt.create(VmSpec(vm_id=f"vm-a-{RUN}", role=VmRole.CLI, user_id="u"))
        b = await rt.create(VmSpec(vm_id=f"vm-b-{RUN}", role=VmRole.CLI, user_id="u"))
        sequence = [f"{r['method']} {r['path']}" for r in recorded(tmp_path)]
        # One boot of the template, its snapshot, then each VM is a restore.
        assert sequence == [*boot, "PATCH /vm", "PUT /snapshot/create", *restore, *restore]
        assert sorted(v.vm_id for v in await rt.list()) == [
            f"vm-a-{RUN}",
            f"vm-b-{RUN}",
        ]  # no template VM
        secrets_ = {(v.state_dir / "agent.secret").read_text() for v in (a, b)}
        template_secret = (tmp_path / "templates/cli/agent.secret").read_text()
        assert len(secrets_) == 2 and template_secret not in secrets_
        async with await rt.agent_client(f"vm-b-{RUN}") as agent:
            assert (await agent.ping())["role"] == "cli"

        os.utime(image.rootfs, ns=(1, 1))  # a rebuilt image: the template is remade
        await rt.create(VmSpec(vm_id=f"vm-c-{RUN}", role=VmRole.CLI, user_id="u"))
        sequence = [f"{r['method']} {r['path']}" for r in recorded(tmp_path)]
        assert sequence[-12:] == [*boot, "PATCH /vm", "PUT /snapshot/create", *restore]
        for r in recorded(tmp_path):
            validate(str(r["method"]), str(r["path"]), r["body"])
    finally:
        for vm in await rt.list():
            await rt.destroy(vm.vm_id)
    assert not any(
        netns_exists(netns_name(v)) for v in (f"vm-a-{RUN}", f"vm-b-{RUN}", f"vm-c-{RUN}")
    )


# --- the jailer -------------------------------------------------------------------------------


def test_jailer_argv() -> None:
    jail = Jail(
        jailer="/usr/bin/jailer",
        exec_file="/usr/bin/firecracker",
        uid=123,
        gid=100,
        chroot_base=Path("/srv/jailer"),
        cgroup_version=2,
    )
    assert jail.argv("vm-1", "airlock-vm-1") == [
        "/usr/bin/jailer",
        "--id",
        "vm-1",
        "--exec-file",
        "/usr/bin/firecracker",
        "--uid",
        "123",
        "--gid",
        "100",
        "--chroot-base-dir",
        "/srv/jailer",
        "--cgroup-version",
        "2",
        "--netns",
        "/var/run/netns/airlock-vm-1",
        "--",
        "--api-sock",
        "/api.sock",
        "--id",
        "vm-1",
    ]
    assert jail.root("vm-1") == Path("/srv/jailer/firecracker/vm-1/root")
    assert jail.cgroup_dirs("vm-1") == [Path("/sys/fs/cgroup/firecracker/vm-1")]


@needs_root
async def test_jailed_vm_state_and_the_clean_up_the_jailer_leaves(
    tmp_path: Path, image: GuestImage
) -> None:
    """What a jailed create makes (chroot with the kernel hard-linked and the root filesystem
    copied, owned by the jail's uid; netns and tap), plus the cgroups the jailer would
    create, all really; ``destroy`` removes every piece."""
    jail = Jail(
        jailer="/usr/bin/jailer",
        exec_file="/usr/bin/firecracker",
        uid=4242,
        gid=4242,
        chroot_base=tmp_path / "jail",
    )
    rt = FirecrackerRuntime(tmp_path / "vms", image=image, firecracker=DOUBLE, jail=jail)
    spec = VmSpec(vm_id=f"vm-jailed-{RUN}", role=VmRole.CLI, user_id="a")
    plan_ = await rt._begin(spec)
    await asyncio.to_thread(rt._stage_boot, spec, plan_, image)
    rt._creating.discard(spec.vm_id)
    root = jail.root(f"vm-jailed-{RUN}")
    state_dir = tmp_path / "vms" / f"vm-jailed-{RUN}"
    assert state_dir.resolve() == root.resolve()
    assert os.stat(root / "vmlinux").st_ino == os.stat(image.kernel).st_ino  # hard link
    assert os.stat(root / "rootfs.ext4").st_ino != os.stat(image.rootfs).st_ino  # own copy
    assert os.stat(root / "rootfs.ext4").st_uid == 4242 and os.stat(root).st_uid == 4242
    assert "tap0" in netns_links(netns_name(f"vm-jailed-{RUN}"))
    cgroups = jail.cgroup_dirs(f"vm-jailed-{RUN}")
    made = []
    for cg in cgroups[:3]:  # stand in for the jailer, which makes them at start
        if cg.parent.parent.is_dir():
            cg.mkdir(parents=True)
            made.append(cg)
    assert made, f"no cgroup hierarchy to test with (v{cgroup_version()})"
    assert [v.vm_id for v in await rt.list()] == [f"vm-jailed-{RUN}"]  # young, not yet booted

    assert await rt.destroy(f"vm-jailed-{RUN}") is False  # nothing was running, all is cleaned
    assert not any(cg.exists() for cg in made)
    assert not root.parent.exists() and not state_dir.is_symlink()
    assert not netns_exists(netns_name(f"vm-jailed-{RUN}"))
    for cg in made:
        if cg.parent.is_dir() and not any(cg.parent.iterdir()):
            cg.parent.rmdir()


@needs_root
def test_netns_create_and_delete_are_real_and_idempotent() -> None:
    name = f"airlock-test-{RUN}"
    delete_netns(name)
    create_netns(name)
    try:
        assert netns_exists(name) and set(netns_links(name)) >= {"lo", "tap0"}
        with pytest.raises(RuntimeFailure):
            create_netns(name)  # exists already
    finally:
        assert delete_netns(name) is True
    assert delete_netns(name) is False
    assert not netns_exists(name)


# --- a real Firecracker -----------------------------------------------------------------------


def _real_boot_skip() -> str | None:
    """Every reason a real boot cannot run here (on the build machines: no binary, and
    /dev/kvm is kvm-pvm, which runs only special guest kernels)."""
    reasons = []
    if shutil.which("firecracker") is None:
        reasons.append("no firecracker binary on PATH")
    if (problem := kvm_problem()) is not None:
        reasons.append(f"KVM unusable for Firecracker: {problem}")
    if not os.environ.get("AIRLOCK_FIRECRACKER_IMAGE"):
        reasons.append("AIRLOCK_FIRECRACKER_IMAGE (a built guest image dir) is not set")
    return "; ".join(reasons) or None


@pytest.mark.skipif(_real_boot_skip() is not None, reason=str(_real_boot_skip()))
async def test_real_firecracker_boots_the_minimal_image(tmp_path: Path) -> None:
    image = GuestImage.from_dir(Path(os.environ["AIRLOCK_FIRECRACKER_IMAGE"]))
    rt = FirecrackerRuntime(tmp_path / "vms", image=image, boot_timeout_s=60)
    try:
        await rt.create(VmSpec(vm_id=f"vm-real-{RUN}", role=VmRole.CLI, user_id="a"))
        async with await rt.agent_client(f"vm-real-{RUN}") as agent:
            assert (await agent.ping())["role"] == "cli"
    finally:
        await rt.destroy(f"vm-real-{RUN}")


@needs_root
async def test_a_vm_whose_lease_runs_out_ends_and_its_vmm_with_it(
    runtime: FirecrackerRuntime,
) -> None:
    """The boot lease travels on the config disk; when it runs out unrenewed the guest
    reboots and Firecracker (here its double) exits: the VM is gone from list()."""
    spec = VmSpec(
        vm_id=f"vm-lease-{RUN}", role=VmRole.CLI, user_id="a", lease_ms=1500, lease_margin_ms=500
    )
    vm = await runtime.create(spec)
    assert vm.pid is not None
    async with await runtime.agent_client(spec.vm_id) as agent:
        assert 0 < (await agent.ping())["lease_ends_in_ms"] <= 2000
    pidfd = os.pidfd_open(vm.pid)
    try:
        exited = await asyncio.to_thread(select.select, [pidfd], [], [], 30)
        assert exited[0], "the VMM still runs long after the lease ran out"
    finally:
        os.close(pidfd)
    assert await runtime.list() == []
