"""The host side of a Firecracker microVM, as the ``firecracker`` runtime drives it: the API
requests of a boot, a snapshot and a restore and the client that sends them over the API
socket, the vsock handshake, the VM's network namespace, the jailer and the KVM check. The
runtime (``firecracker``) decides when; this module only speaks to Firecracker and the host.

Boot (``boot_calls``): ``PUT /machine-config``, ``/boot-source`` (the image's uncompressed
``vmlinux``, its initrd and command line), ``/drives/rootfs`` (the VM's own copy of the root
filesystem), ``/drives/config`` (a small read-only disk: JSON with the agent's secret, role
and screen, as ``images`` documents it), ``/network-interfaces/eth0`` (a tap inside a
network namespace of the VM's own, with no route anywhere), ``/vsock``, ``/entropy``
(virtio-rng), then ``PUT /actions {InstanceStart}``.

Streams: the agent and the VNC server are reached over vsock, host-initiated: connect to the
VM's vsock Unix socket, send ``CONNECT <port>\\n``, read ``OK <host port>\\n``, then bytes flow
(Firecracker closes the connection when nothing listens on that guest port). The egress
proxy is reached from the guest the other way: Firecracker forwards a guest connection to
host port ``EGRESS_PORT`` to ``{vsock socket}_{EGRESS_PORT}``, a relative symlink to the
``egress.sock`` the controller serves in the state dir.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from airlock.errors import RuntimeFailure
from airlock.runtimes.base import Stream
from airlock.runtimes.host_checks import HostCheck, binary
from airlock.runtimes.kvm_probe import kvm_problem
from airlock.runtimes.vmdir import UNIX_PATH_MAX
from airlock.runtimes.vmdir import open_unix as _open_unix

API_SOCK = "api.sock"
GUEST_CID = 3  # per-VM vsock device: the same CID in every VM does not collide
TAP = "tap0"  # one per network namespace, so every VM has its own
GUEST_MAC = "06:00:ac:10:00:02"
HANDSHAKE_TIMEOUT_S = 5.0


@dataclass(frozen=True, slots=True)
class GuestImage:
    """The files of a guest image (``airlock.images``): uncompressed kernel, initrd, root
    filesystem, and the kernel command line from its manifest."""

    kernel: Path
    rootfs: Path
    initrd: Path | None = None
    boot_args: str = "console=ttyS0 root=/dev/vda rw quiet panic=-1 random.trust_cpu=on"

    @classmethod
    def from_dir(cls, path: Path) -> GuestImage:
        manifest: dict[str, Any] = {}
        with contextlib.suppress(OSError, ValueError):
            manifest = json.loads((path / "manifest.json").read_text())
        initrd = path / "initrd.img"
        image = cls(
            kernel=path / "vmlinux",
            rootfs=path / "rootfs.ext4",
            initrd=initrd if initrd.exists() else None,
        )
        if isinstance(manifest.get("cmdline"), str):
            image = cls(image.kernel, image.rootfs, image.initrd, manifest["cmdline"])
        return image

    def missing(self) -> list[str]:
        return [str(p) for p in (self.kernel, self.rootfs) if not p.is_file()]


class FirecrackerApiError(RuntimeFailure):
    """Firecracker refused a request (its ``fault_message`` is the message)."""

    def __init__(self, method: str, path: str, status: int, fault: str) -> None:
        super().__init__(f"{method} {path}: {status} {fault}", code="firecracker_api")
        self.status = status
        self.fault = fault


# --- the requests ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ApiCall:
    method: str
    path: str
    body: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class BootPlan:
    """Paths as Firecracker sees them (inside the chroot when jailed)."""

    kernel: str
    rootfs: str
    config_disk: str
    vsock_uds: str
    boot_args: str
    initrd: str | None = None
    vcpus: int = 2
    mem_mib: int = 1024
    tap: str = TAP
    guest_mac: str = GUEST_MAC


def boot_calls(plan: BootPlan) -> list[ApiCall]:
    """The whole cold boot, in order."""
    boot_source: dict[str, Any] = {"kernel_image_path": plan.kernel, "boot_args": plan.boot_args}
    if plan.initrd is not None:
        boot_source["initrd_path"] = plan.initrd
    return [
        ApiCall(
            "PUT",
            "/machine-config",
            {"vcpu_count": plan.vcpus, "mem_size_mib": plan.mem_mib, "smt": False},
        ),
        ApiCall("PUT", "/boot-source", boot_source),
        ApiCall(
            "PUT",
            "/drives/rootfs",
            {
                "drive_id": "rootfs",
                "path_on_host": plan.rootfs,
                "is_root_device": True,
                "is_read_only": False,
            },
        ),
        ApiCall(
            "PUT",
            "/drives/config",
            {
                "drive_id": "config",
                "path_on_host": plan.config_disk,
                "is_root_device": False,
                "is_read_only": True,
            },
        ),
        ApiCall(
            "PUT",
            "/network-interfaces/eth0",
            {"iface_id": "eth0", "host_dev_name": plan.tap, "guest_mac": plan.guest_mac},
        ),
        ApiCall("PUT", "/vsock", {"guest_cid": GUEST_CID, "uds_path": plan.vsock_uds}),
        ApiCall("PUT", "/entropy", {}),
        ApiCall("PUT", "/actions", {"action_type": "InstanceStart"}),
    ]


def snapshot_calls(snapshot_path: str, mem_path: str) -> list[ApiCall]:
    """Pause, then a full snapshot. The template is destroyed afterwards, never resumed."""
    return [
        ApiCall("PATCH", "/vm", {"state": "Paused"}),
        ApiCall(
            "PUT",
            "/snapshot/create",
            {"snapshot_type": "Full", "snapshot_path": snapshot_path, "mem_file_path": mem_path},
        ),
    ]


def restore_calls(snapshot_path: str, mem_path: str, *, tap: str, vsock_uds: str) -> list[ApiCall]:
    """Load a snapshot into a fresh Firecracker with this clone's own tap and vsock socket,
    with the guest clock advanced to now, then resume."""
    return [
        ApiCall(
            "PUT",
            "/snapshot/load",
            {
                "snapshot_path": snapshot_path,
                "mem_backend": {"backend_type": "File", "backend_path": mem_path},
                "network_overrides": [{"iface_id": "eth0", "host_dev_name": tap}],
                "vsock_override": {"uds_path": vsock_uds},
                "clock_realtime": True,
                "resume_vm": False,
            },
        ),
        ApiCall("PATCH", "/vm", {"state": "Resumed"}),
    ]


# --- the API client ----------------------------------------------------------------------


class FirecrackerApi:
    """HTTP/1.1 over the API Unix socket."""

    def __init__(self, socket_path: Path, *, timeout_s: float = 10.0) -> None:
        self.socket_path = socket_path
        self._dir_fd: int | None = None
        uds = str(socket_path)
        if len(os.fsencode(uds)) > UNIX_PATH_MAX:  # a deep data dir: go through its fd
            self._dir_fd = os.open(socket_path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            uds = f"/proc/self/fd/{self._dir_fd}/{socket_path.name}"
        self._client = httpx.AsyncClient(
            transport=httpx.AsyncHTTPTransport(uds=uds),
            base_url="http://localhost",
            timeout=timeout_s,
        )

    async def __aenter__(self) -> FirecrackerApi:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._client.aclose()
        if self._dir_fd is not None:
            os.close(self._dir_fd)
            self._dir_fd = None

    async def call(self, call: ApiCall) -> Any:
        try:
            response = await self._client.request(call.method, call.path, json=call.body)
        except httpx.HTTPError as exc:
            raise RuntimeFailure(f"Firecracker API {call.method} {call.path}: {exc}") from None
        if response.status_code >= 300:
            try:
                fault = str(response.json().get("fault_message", response.text))
            except ValueError:
                fault = response.text
            raise FirecrackerApiError(call.method, call.path, response.status_code, fault[:500])
        return response.json() if response.content else None

    async def run(self, calls: Sequence[ApiCall]) -> None:
        for call in calls:
            await self.call(call)


# --- vsock -------------------------------------------------------------------------------


async def vsock_connect(
    uds_path: Path, port: int, *, timeout_s: float = HANDSHAKE_TIMEOUT_S, limit: int = 2**16
) -> Stream:
    """Firecracker's host-initiated vsock handshake: ``CONNECT <port>\\n`` -> ``OK <n>\\n``.
    Raises ConnectionError when the guest does not accept (Firecracker closes the stream)."""
    reader, writer = await _open_unix(uds_path, limit=limit)
    try:
        writer.write(f"CONNECT {port}\n".encode())
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), timeout_s)
    except BaseException:
        writer.close()
        raise
    if not line.endswith(b"\n") or not re.fullmatch(rb"OK \d+\n", line):
        writer.close()
        if not line:
            raise ConnectionError(f"nothing listens on guest vsock port {port}")
        raise ConnectionError(f"vsock handshake for port {port} failed: {line[:80]!r}")
    return reader, writer


# --- processes ---------------------------------------------------------------------------


def _run(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=20, check=False)


# --- the per-VM network namespace ----------------------------------------------------------


def netns_name(vm_id: str) -> str:
    return f"airlock-{vm_id}"[:48]


def netns_exists(name: str) -> bool:
    return Path("/var/run/netns", name).exists()


def create_netns(name: str, tap: str = TAP) -> None:
    """A namespace with loopback up and one tap, no address and no route: the VM's NIC
    leads nowhere (egress goes through the proxy over vsock)."""
    steps = [
        ["ip", "netns", "add", name],
        ["ip", "-n", name, "link", "set", "lo", "up"],
        ["ip", "-n", name, "tuntap", "add", "dev", tap, "mode", "tap"],
        ["ip", "-n", name, "link", "set", tap, "up"],
    ]
    for i, step in enumerate(steps):
        done = _run(step)
        if done.returncode != 0:
            if i > 0:
                delete_netns(name)
            raise RuntimeFailure(f"{' '.join(step)} failed: {done.stderr.strip()}")


def delete_netns(name: str) -> bool:
    """Remove the namespace (its tap goes with it). Idempotent."""
    if not netns_exists(name):
        return False
    done = _run(["ip", "netns", "delete", name])
    if done.returncode != 0 and netns_exists(name):
        raise RuntimeFailure(f"ip netns delete {name} failed: {done.stderr.strip()}")
    return True


def netns_links(name: str) -> list[str]:
    done = _run(["ip", "-n", name, "-o", "link", "show"])
    if done.returncode != 0:
        return []
    return [line.split(":")[1].strip().split("@")[0] for line in done.stdout.splitlines()]


# --- the jailer --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Jail:
    """How the jailer runs Firecracker, and what it leaves behind for us to clean."""

    jailer: str
    exec_file: str
    uid: int
    gid: int
    chroot_base: Path = Path("/srv/jailer")
    cgroup_version: int = field(default_factory=lambda: cgroup_version())
    cgroup_root: Path = Path("/sys/fs/cgroup")

    @property
    def exec_name(self) -> str:
        return Path(self.exec_file).name

    def root(self, vm_id: str) -> Path:
        """The chroot: ``{chroot base}/{exec file name}/{id}/root``."""
        return self.chroot_base / self.exec_name / vm_id / "root"

    def argv(self, vm_id: str, netns: str | None) -> list[str]:
        argv = [
            self.jailer,
            "--id",
            vm_id,
            "--exec-file",
            self.exec_file,
            "--uid",
            str(self.uid),
            "--gid",
            str(self.gid),
            "--chroot-base-dir",
            str(self.chroot_base),
            "--cgroup-version",
            str(self.cgroup_version),
        ]
        if netns is not None:
            argv += ["--netns", f"/var/run/netns/{netns}"]
        # Everything after "--" goes to Firecracker; paths are inside the chroot.
        return [*argv, "--", "--api-sock", f"/{API_SOCK}", "--id", vm_id]

    def cgroup_dirs(self, vm_id: str) -> list[Path]:
        """Where the jailer puts the VM's cgroups: ``{root}/{exec name}/{id}`` on v2, and
        the same under every controller's hierarchy on v1."""
        if self.cgroup_version == 2:
            return [self.cgroup_root / self.exec_name / vm_id]
        try:
            controllers = sorted(p for p in self.cgroup_root.iterdir() if p.is_dir())
        except OSError:
            return []
        return [c / self.exec_name / vm_id for c in controllers]

    def cleanup(self, vm_id: str) -> list[str]:
        """Remove the chroot and the cgroups of one VM (the jailer does not). Returns what
        it removed; idempotent."""
        removed: list[str] = []
        for cgroup in self.cgroup_dirs(vm_id):
            if cgroup.is_dir():
                for attempt in range(50):  # a cgroup empties a moment after its last task
                    try:
                        cgroup.rmdir()
                        removed.append(str(cgroup))
                        break
                    except FileNotFoundError:
                        break
                    except OSError:
                        if attempt == 49:
                            raise
                        time.sleep(0.02)
        instance = self.root(vm_id).parent
        if instance.exists():
            shutil.rmtree(instance, ignore_errors=False)
            removed.append(str(instance))
        return removed


def cgroup_version(root: Path = Path("/sys/fs/cgroup")) -> int:
    """2 on a unified hierarchy (it has ``cgroup.controllers``), else 1."""
    return 2 if (root / "cgroup.controllers").exists() else 1


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard link where the file system allows (read-only inputs), else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def copy_rootfs(src: Path, dst: Path) -> None:
    """Each VM writes its own root filesystem: a reflink where the file system can, else a
    sparse copy."""
    done = _run(["cp", "--reflink=auto", "--sparse=always", str(src), str(dst)])
    if done.returncode != 0:
        raise RuntimeFailure(f"cannot copy the root filesystem: {done.stderr.strip()}")


def host_checks() -> list[HostCheck]:
    """The firecracker runtime's rows for ``airlock doctor``: its binary, and KVM that runs a
    stock kernel (``kvm_probe.kvm_problem``; Firecracker has no fallback)."""
    problem = kvm_problem()
    return [
        binary(
            "firecracker",
            ("firecracker",),
            "firecracker (from its GitHub releases; not in Debian)",
            needed=True,
            why="the firecracker runtime",
        ),
        HostCheck(
            "kvm",
            problem is None,
            True,
            "usable for Firecracker" if problem is None else f"{problem}: firecracker cannot run",
            None
            if problem is None
            else "run on a host with KVM for stock kernels (bare metal, or nested virtualisation)",
        ),
    ]
