"""The ``firecracker`` runtime: every VM is a Firecracker microVM driven over its API socket.

The API requests, the vsock handshake, the network namespace and the jailer are in
``firecracker_vmm``; this module decides what to run and when.

Warm starts (``snapshot`` / ``restore``; automatic with ``templates_dir``: the first create
of a role makes its template, later ones restore it): a template VM is booted until its
agent answers, paused and snapshotted, then destroyed without ever resuming (Firecracker's
"secure usage" of a snapshot; no login URL has been opened in it yet); each clone is
loaded into a fresh Firecracker with its own tap and vsock socket (``network_overrides``,
``vsock_override``) and resumed. Clones share the template's memory, so their uniqueness is
restored: Firecracker always attaches a VMGenID device and changes its id on restore, and
Linux >= 5.18 (Debian bookworm's 6.1) reseeds its CRNG from it; identifiers and our own
secret are not covered by that, so the controller sends the agent ``restored`` with fresh
host entropy and a new secret (the agent mixes the entropy in with ``RNDADDENTROPY`` and
``RNDRESEEDCRNG``, writes a new ``/etc/machine-id``, and refuses the snapshot's secret from
then on). See Firecracker's ``docs/snapshotting/snapshot-support.md`` ("Snapshot security
and uniqueness", "Vsock device limitation") and ``random-for-clones.md``.

Jailer (optional): ``jailer --id --exec-file --uid --gid --chroot-base-dir --netns`` with
the kernel hard-linked (or copied) and the root filesystem copied into the chroot, which is
also the VM's state dir (``{vms_dir}/{vm_id}`` is a symlink to it), so the sockets are where
both sides see them. The jailer leaves clean-up to its caller; ``destroy`` removes the
chroot, the cgroups it made (v1 and v2 layouts), the network namespace and with it the tap.

Like a sandbox, a microVM outlives the controller: its state dir holds ``meta.json`` and
``pid`` (pid and start time of the Firecracker process), and ``list`` finds it again.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import json
import logging
import os
import re
import secrets
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from airlock.agent.client import AgentClient, AgentError
from airlock.agent.protocol import MAX_MESSAGE
from airlock.agent.vsock import AGENT_PORT, EGRESS_PORT, VNC_PORT  # the guest's bridge
from airlock.domain.vms import VmRole
from airlock.errors import RuntimeFailure
from airlock.runtimes.base import RunningVm, Stream, VmSpec
from airlock.runtimes.firecracker_vmm import (
    API_SOCK,
    TAP,
    BootPlan,
    FirecrackerApi,
    GuestImage,
    Jail,
    boot_calls,
    copy_rootfs,
    create_netns,
    delete_netns,
    link_or_copy,
    netns_name,
    restore_calls,
    snapshot_calls,
    vsock_connect,
)
from airlock.runtimes.kvm_probe import kvm_problem
from airlock.runtimes.skeleton import (
    Creation,
    VmDirRuntime,
    VmState,
    kill,
    lease_config,
    record_pid,
    write_meta,
    write_private,
)
from airlock.runtimes.vmdir import PidRecord, read_json, read_meta
from airlock.runtimes.vmdir import read_pid as _read_pid

log = logging.getLogger(__name__)

VM_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,63}$")  # the jailer allows [A-Za-z0-9-]
VSOCK = "v.sock"
CONFIG_DISK_BYTES = 4096
CREATING_GRACE_S = 120.0
TEMPLATE_PREFIX = "tmpl-"


# --- the runtime -------------------------------------------------------------------------


@dataclass
class _Vm:
    """What a create or restore is building, for its clean-up on failure."""

    vm_id: str
    state_dir: Path
    netns: str
    record: PidRecord | None = None
    proc: subprocess.Popen[bytes] | None = None
    extra: dict[str, str] = field(default_factory=dict)


class FirecrackerRuntime(VmDirRuntime):
    """VMs as Firecracker microVMs; see the module docstring."""

    name = "firecracker"
    label = "firecracker VM"
    vm_id_pattern = VM_ID
    creating_grace_s = CREATING_GRACE_S

    def __init__(
        self,
        vms_dir: Path,
        *,
        image: GuestImage | Callable[[VmRole], GuestImage | None] | None = None,
        firecracker: str | Sequence[str] | None = None,
        jail: Jail | None = None,
        vcpus: int = 2,
        mem_mib: int = 1024,
        boot_timeout_s: float = 60.0,
        templates_dir: Path | None = None,
        browser_single_process: bool = True,
    ) -> None:
        super().__init__(vms_dir)
        # Warm starts: with a templates dir, a create restores a snapshot of a booted VM of
        # its role (made on first use, remade when the image changes) instead of booting.
        self.templates_dir = templates_dir
        self._templating: set[str] = set()
        self._template_locks: dict[VmRole, asyncio.Lock] = {}
        self.image = image
        if isinstance(firecracker, str):
            firecracker = [firecracker]
        found = shutil.which("firecracker")
        self.firecracker: list[str] | None = list(firecracker) if firecracker else None
        if self.firecracker is None and found:
            self.firecracker = [found]
        self.jail = jail
        self.vcpus = vcpus
        self.mem_mib = mem_mib
        self.boot_timeout_s = boot_timeout_s
        self.browser_processes = "single" if browser_single_process else "multi"
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        with contextlib.suppress(OSError):
            self.vms_dir.mkdir(mode=0o700, parents=True, exist_ok=True)

    # -- paths ------------------------------------------------------------------------------

    def _fc_path(self, name: str) -> str:
        """A state-dir file as Firecracker names it: in the chroot's root when jailed, else
        relative to its working directory (the state dir). Either way a snapshot names no
        particular VM's files, so its clones open their own."""
        return f"/{name}" if self.jail is not None else name

    # -- create -----------------------------------------------------------------------------

    def image_for(self, role: VmRole) -> GuestImage | None:
        """The image to boot: one for every role, or one per role (a browser image has
        Xvnc and Chromium, a CLI image the vendor CLIs)."""
        if self.image is None or isinstance(self.image, GuestImage):
            return self.image
        return self.image(role)

    async def create(self, spec: VmSpec) -> RunningVm:
        image = self.image_for(spec.role)
        if image is None or image.missing():
            raise RuntimeFailure(
                "no guest image for Firecracker: build one with `airlock image build --flavor "
                f"{'browser' if spec.role is VmRole.BROWSER else 'cli'}`"
            )
        if self.templates_dir is not None and not spec.vm_id.startswith(TEMPLATE_PREFIX):
            template = await self._template(spec.role, image)
            if template is not None:
                try:
                    return await self.restore(spec, template)
                except RuntimeFailure as exc:
                    log.warning("restore failed, booting cold; template dropped: %s", exc.message)
                    await asyncio.to_thread(shutil.rmtree, template, True)
        return await self._cold(spec, image)

    async def _template(self, role: VmRole, image: GuestImage) -> Path | None:
        """The snapshot clones of ``role`` start from: a VM booted once and snapshotted
        after its agent answered (Firecracker: snapshot only a fully booted guest), never
        resumed. None when one cannot be made (the create then boots cold)."""
        assert self.templates_dir is not None
        dest = self.templates_dir / role.value
        identity = _image_identity(image)
        async with self._template_locks.setdefault(role, asyncio.Lock()):
            if (await asyncio.to_thread(read_json, dest / "template.json")).get(
                "image"
            ) == identity:
                return dest
            await asyncio.to_thread(shutil.rmtree, dest, True)
            vm_id = f"{TEMPLATE_PREFIX}{role.value}-{secrets.token_hex(4)}"
            staging = self.templates_dir / f".{vm_id}"
            self._templating.add(vm_id)
            try:
                await asyncio.to_thread(self.templates_dir.mkdir, 0o700, True, True)
                await self._cold(VmSpec(vm_id=vm_id, role=role, user_id=""), image)
                await self.snapshot(vm_id, staging)
                await asyncio.to_thread(_finish_template, staging, dest, identity)
            except RuntimeFailure as exc:
                log.warning("no %s template, booting cold: %s", role.value, exc.message)
                await asyncio.to_thread(shutil.rmtree, staging, True)
                return None
            finally:
                self._templating.discard(vm_id)
        log.info("firecracker %s template ready", role.value)
        return dest

    async def _cold(self, spec: VmSpec, image: GuestImage) -> RunningVm:
        plan = await self._begin(spec)
        async with self._starting(plan) as creation:
            creation.push(lambda: self._teardown(plan.vm_id, plan.state_dir))
            secret = await asyncio.to_thread(self._stage_boot, spec, plan, image)
            await self._launch(plan)
            async with FirecrackerApi(plan.state_dir / API_SOCK) as api:
                await api.run(
                    boot_calls(
                        BootPlan(
                            kernel=self._fc_path("vmlinux"),
                            initrd=self._fc_path("initrd.img") if image.initrd else None,
                            rootfs=self._fc_path("rootfs.ext4"),
                            config_disk=self._fc_path("config.img"),
                            vsock_uds=self._fc_path(VSOCK),
                            boot_args=image.boot_args,
                            vcpus=self.vcpus,
                            mem_mib=self.mem_mib,
                        )
                    )
                )
            await self._wait_ready(spec.role, plan, secret)
        return self._running(spec.role, plan)

    async def _begin(self, spec: VmSpec) -> _Vm:
        state_dir = self._state_dir(spec.vm_id)
        if not self.firecracker:
            raise RuntimeFailure("firecracker not found: install it (and the jailer) on PATH")
        if spec.vm_id in self._creating or await asyncio.to_thread(os.path.lexists, state_dir):
            raise RuntimeFailure(f"VM {spec.vm_id} already exists", code="vm_exists")
        return _Vm(spec.vm_id, state_dir, netns_name(spec.vm_id), extra={"started": "0"})

    def _make_state_dir(self, spec: VmSpec, plan: _Vm, *, kind: str) -> None:
        """The state dir (the chroot when jailed, with a symlink at the usual place), its
        meta, and the VM's network namespace."""
        self.vms_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self.jail is not None:
            root = self.jail.root(spec.vm_id)
            root.mkdir(mode=0o700, parents=True)
            os.chown(root, self.jail.uid, self.jail.gid)
            plan.state_dir.symlink_to(root)
        else:
            plan.state_dir.mkdir(mode=0o700)
        write_meta(
            plan.state_dir,
            spec,
            self.name,
            start=kind,
            netns=plan.netns,
            jailed=self.jail is not None,
            labels=spec.labels,
        )
        create_netns(plan.netns)
        # Guest connections to host port EGRESS_PORT land here: the controller's proxy.
        (plan.state_dir / f"{VSOCK}_{EGRESS_PORT}").symlink_to("egress.sock")

    def _stage_boot(self, spec: VmSpec, plan: _Vm, image: GuestImage) -> str:
        self._make_state_dir(spec, plan, kind="cold")
        secret = secrets.token_urlsafe(32)
        write_private(plan.state_dir / "agent.secret", secret.encode() + b"\n")
        config = json.dumps(
            {
                "secret": secret,
                "role": spec.role.value,
                "screen": f"{spec.screen[0]}x{spec.screen[1]}",
                "browser_processes": self.browser_processes,
                **lease_config(spec),
            }
        ).encode()
        if len(config) > CONFIG_DISK_BYTES:
            raise RuntimeFailure("the VM's config does not fit its config disk")
        write_private(plan.state_dir / "config.img", config.ljust(CONFIG_DISK_BYTES, b"\0"))
        link_or_copy(image.kernel, plan.state_dir / "vmlinux")
        if image.initrd is not None:
            link_or_copy(image.initrd, plan.state_dir / "initrd.img")
        copy_rootfs(image.rootfs, plan.state_dir / "rootfs.ext4")
        if self.jail is not None:
            for name in ("config.img", "rootfs.ext4"):
                os.chown(plan.state_dir / name, self.jail.uid, self.jail.gid)
        return secret

    def _argv(self, plan: _Vm) -> list[str]:
        assert self.firecracker is not None
        if self.jail is not None:
            return self.jail.argv(plan.vm_id, plan.netns)
        return [
            "ip",
            "netns",
            "exec",
            plan.netns,
            *self.firecracker,
            "--api-sock",
            API_SOCK,  # relative to its working directory, the state dir: always short
            "--id",
            plan.vm_id,
        ]

    async def _launch(self, plan: _Vm) -> None:
        log_fd = os.open(
            plan.state_dir / "firecracker.log",
            os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC,
            0o600,
        )
        try:
            proc = await asyncio.to_thread(
                subprocess.Popen,
                self._argv(plan),
                stdin=subprocess.DEVNULL,
                stdout=log_fd,
                stderr=log_fd,
                start_new_session=True,  # outlives the controller, like a sandbox
                cwd=plan.state_dir,
                env={"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"},
            )
        except OSError as exc:
            raise RuntimeFailure(f"cannot start Firecracker: {exc}") from None
        finally:
            os.close(log_fd)
        self._procs[plan.vm_id] = proc
        plan.proc = proc
        # `ip netns exec` and the jailer exec Firecracker in place: this pid is the VMM.
        try:
            plan.record = record_pid(plan.state_dir / "pid", proc.pid, what="Firecracker")
        except RuntimeFailure:  # gone before its pid was recorded: say with what, as below
            raise RuntimeFailure(f"Firecracker exited with {proc.wait(timeout=5)}") from None
        api = plan.state_dir / API_SOCK
        deadline = time.monotonic() + min(self.boot_timeout_s, 10.0)
        while not api.exists():
            if proc.poll() is not None:
                raise RuntimeFailure(f"Firecracker exited with {proc.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeFailure("Firecracker did not open its API socket")
            await asyncio.sleep(0.01)

    async def _wait_ready(self, role: VmRole, plan: _Vm, secret: str) -> None:
        """Until the agent answers over vsock; a browser VM also until VNC speaks RFB."""
        deadline = time.monotonic() + self.boot_timeout_s
        last: Exception | None = None
        uds = plan.state_dir / VSOCK
        while True:
            if plan.proc is not None and plan.proc.poll() is not None:
                raise RuntimeFailure(f"Firecracker exited with {plan.proc.returncode}")
            try:
                reader, writer = await vsock_connect(uds, AGENT_PORT, limit=MAX_MESSAGE + 1)
                async with await AgentClient.connect(reader, writer, secret, timeout_s=10) as c:
                    await c.ping()
                if role is VmRole.BROWSER:
                    reader, writer = await vsock_connect(uds, VNC_PORT)
                    try:
                        banner = await asyncio.wait_for(reader.readexactly(12), 5)
                    finally:
                        writer.close()
                    if not banner.startswith(b"RFB "):
                        raise ValueError(f"not an RFB server: {banner!r}")
                return
            except AgentError as exc:
                if exc.code == "unauthorized":
                    raise
                last = exc
            except (OSError, TimeoutError, ValueError, asyncio.IncompleteReadError) as exc:
                last = exc
            if time.monotonic() > deadline:
                raise RuntimeFailure(f"the VM did not come up in {self.boot_timeout_s:g} s: {last}")
            await asyncio.sleep(0.05)

    def _starting(self, plan: _Vm) -> contextlib.AbstractAsyncContextManager[Creation]:
        """A create or restore: on failure it leaves nothing behind and raises with the
        log's useful part."""
        log_path = plan.state_dir / "firecracker.log"
        return self._creating_vm(plan.vm_id, log_path, heading="log", verb="start")

    def _running(self, role: VmRole, plan: _Vm) -> RunningVm:
        return RunningVm(
            vm_id=plan.vm_id,
            role=role,
            pid=plan.record.pid if plan.record else None,
            state_dir=plan.state_dir,
            detail={"netns": plan.netns, "jailed": str(self.jail is not None).lower()},
        )

    # -- snapshots --------------------------------------------------------------------------

    async def snapshot(self, vm_id: str, dest: Path) -> Path:
        """Pause ``vm_id``, write a full snapshot into ``dest``, then destroy the VM: it must
        never run again once clones may start from its state. Returns ``dest``."""
        state_dir = self._existing(vm_id)
        await asyncio.to_thread(dest.mkdir, mode=0o700, parents=True, exist_ok=False)
        try:
            async with FirecrackerApi(state_dir / API_SOCK) as api:
                await api.run(snapshot_calls(self._fc_path("vm.snap"), self._fc_path("vm.mem")))
            await asyncio.to_thread(self._keep_template, vm_id, state_dir, dest)
        except BaseException:
            await asyncio.to_thread(shutil.rmtree, dest, True)
            raise
        finally:
            await self.destroy(vm_id)
        return dest

    def _keep_template(self, vm_id: str, state_dir: Path, dest: Path) -> None:
        for name in ("vm.snap", "vm.mem"):
            os.replace(state_dir / name, dest / name)
        meta = read_meta(state_dir)
        for name in ("agent.secret", "config.img"):  # the snapshot's drive and secret
            shutil.copyfile(state_dir / name, dest / name)
            os.chmod(dest / name, 0o600)
        # The template's root filesystem: its clones continue from this disk state.
        copy_rootfs(state_dir / "rootfs.ext4", dest / "rootfs.ext4")
        template = {"vm_id": vm_id, "role": meta.get("role"), "jailed": self.jail is not None}
        write_private(dest / "template.json", json.dumps(template).encode())

    async def restore(self, spec: VmSpec, template: Path) -> RunningVm:
        """A new VM from a snapshot (``snapshot``): its own Firecracker, tap and vsock
        socket, then fresh entropy, machine id and secret in the guest (``restored``)."""
        for name in ("vm.snap", "vm.mem", "agent.secret", "config.img", "rootfs.ext4"):
            if not (template / name).is_file():
                raise RuntimeFailure(f"not a snapshot: {template / name} is missing")
        old_secret = (template / "agent.secret").read_text().strip()
        plan = await self._begin(spec)
        async with self._starting(plan) as creation:
            creation.push(lambda: self._teardown(plan.vm_id, plan.state_dir))
            await asyncio.to_thread(self._stage_restore, spec, plan, template)
            await self._launch(plan)
            async with FirecrackerApi(plan.state_dir / API_SOCK) as api:
                await api.run(
                    restore_calls(
                        self._fc_path("vm.snap"),
                        self._fc_path("vm.mem"),
                        tap=TAP,
                        vsock_uds=self._fc_path(VSOCK),
                    )
                )
            new_secret = secrets.token_urlsafe(32)
            await self._refresh_identity(plan, old_secret, new_secret, spec.boot_lease)
            await self._wait_ready(spec.role, plan, new_secret)
        return self._running(spec.role, plan)

    def _stage_restore(self, spec: VmSpec, plan: _Vm, template: Path) -> None:
        self._make_state_dir(spec, plan, kind="restored")
        # Firecracker reopens the snapshot's drives by the names it booted with (relative or
        # chroot paths, see _fc_path): the clone's own copies.
        for name in ("vm.snap", "vm.mem", "config.img"):
            link_or_copy(template / name, plan.state_dir / name)
        copy_rootfs(template / "rootfs.ext4", plan.state_dir / "rootfs.ext4")
        if self.jail is not None:
            for name in ("vm.mem", "config.img", "rootfs.ext4"):
                os.chown(plan.state_dir / name, self.jail.uid, self.jail.gid)

    async def _refresh_identity(
        self, plan: _Vm, old_secret: str, new_secret: str, lease: dict[str, int] | None
    ) -> None:
        """The clone runs the template's agent with the template's secret: swap in fresh
        entropy and a new secret before anything else talks to it. Templates boot without a
        lease (one would run out in the snapshot); a clone gets its own boot lease here."""
        deadline = time.monotonic() + self.boot_timeout_s
        uds = plan.state_dir / VSOCK
        while True:
            try:
                reader, writer = await vsock_connect(uds, AGENT_PORT, limit=MAX_MESSAGE + 1)
                async with await AgentClient.connect(reader, writer, old_secret) as client:
                    result = await client.restored(new_secret, secrets.token_bytes(64))
                    if lease is not None:
                        await client.request("lease", lease)
                break
            except (OSError, TimeoutError, AgentError) as exc:
                if isinstance(exc, AgentError) and exc.code != "protocol":
                    raise RuntimeFailure(f"the restored agent refused: {exc}") from None
                if time.monotonic() > deadline:
                    raise RuntimeFailure(f"the restored agent did not answer: {exc}") from None
                await asyncio.sleep(0.05)
        write_private(plan.state_dir / "agent.secret", new_secret.encode() + b"\n", replace=True)
        plan.extra.update({k: str(v) for k, v in result.items()})
        log.info("VM %s restored from a snapshot: %s", plan.vm_id, result)

    # -- destroy ----------------------------------------------------------------------------

    def _teardown(self, vm_id: str, state_dir: Path) -> bool:
        killed = False
        record = _read_pid(state_dir)
        if record is not None:
            killed = kill(record, what="Firecracker")
        proc = self._procs.pop(vm_id, None)
        if proc is not None:
            if proc.poll() is None:
                proc.kill()
                killed = True
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        delete_netns(netns_name(vm_id))
        if self.jail is not None:
            self.jail.cleanup(vm_id)
        if state_dir.is_symlink():
            state_dir.unlink()
        elif state_dir.exists():
            shutil.rmtree(state_dir)
        return killed

    async def _destroy_locked(self, vm_id: str, state_dir: Path) -> bool:
        return await asyncio.to_thread(self._teardown, vm_id, state_dir)

    # -- list -------------------------------------------------------------------------------

    async def list(self) -> list[RunningVm]:
        for vm_id, proc in builtins.list(self._procs.items()):
            if proc.poll() is not None and vm_id not in self._creating:
                del self._procs[vm_id]
        return await asyncio.to_thread(self._scan, frozenset(self._creating))

    def _entry_dir(self, entry: os.DirEntry[str]) -> Path | None:
        if entry.name in self._templating:
            return None  # a template being made is no VM of anyone's
        if not entry.is_dir():  # follows a jailed VM's link to its chroot
            if entry.is_symlink():  # the chroot is gone: only the link is left
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
            return None
        return Path(entry.path)

    def _remove_gone(self, vm_id: str, state_dir: Path) -> None:
        self._teardown(vm_id, state_dir)

    def _keep(self, vm_id: str, state: VmState, state_dir: Path) -> bool:
        if vm_id.startswith(TEMPLATE_PREFIX) and state is VmState.RUNNING:
            log.info("removing %s, a template left by an earlier controller", vm_id)
            with contextlib.suppress(OSError, RuntimeFailure):
                self._teardown(vm_id, state_dir)
            return False
        return True

    def _detail(self, meta: dict[str, Any]) -> dict[str, str]:
        return {"netns": str(meta.get("netns", ""))}

    # -- streams ----------------------------------------------------------------------------

    async def _connect_agent(
        self, state_dir: Path, secret: str, timeout_s: float = 10
    ) -> AgentClient:
        reader, writer = await vsock_connect(state_dir / VSOCK, AGENT_PORT, limit=MAX_MESSAGE + 1)
        return await AgentClient.connect(reader, writer, secret, timeout_s=timeout_s)

    async def _connect_vnc(self, state_dir: Path) -> Stream:
        return await vsock_connect(state_dir / VSOCK, VNC_PORT)

    # -- check ------------------------------------------------------------------------------

    async def check(self) -> builtins.list[str]:
        return await asyncio.to_thread(self._check)

    def _check(self) -> builtins.list[str]:
        problems: builtins.list[str] = []
        if not self.firecracker:
            problems.append(
                "firecracker not found on PATH (https://github.com/firecracker-microvm)"
            )
        if self.jail is not None and not os.access(self.jail.jailer, os.X_OK):
            problems.append(f"jailer not found: {self.jail.jailer}")
        if shutil.which("ip") is None:
            problems.append("ip (iproute2) not found: apt-get install iproute2")
        if (kvm := kvm_problem()) is not None:
            problems.append(f"KVM unusable for Firecracker: {kvm}")
        image = self.image_for(VmRole.BROWSER)
        if image is None:
            problems.append("no browser guest image: airlock image build --flavor browser")
        elif missing := image.missing():
            problems.append(f"guest image incomplete: {', '.join(missing)} missing")
        return problems


def _image_identity(image: GuestImage) -> str:
    """Changes when the image's files do: a template of an older image is remade."""
    parts = []
    for path in (image.kernel, image.initrd, image.rootfs):
        if path is not None:
            st = path.stat()
            parts.append(f"{path}:{st.st_size}:{st.st_mtime_ns}")
    return "|".join(parts)


def _finish_template(staging: Path, dest: Path, identity: str) -> None:
    info = read_json(staging / "template.json")
    (staging / "template.json").unlink()
    write_private(staging / "template.json", json.dumps({**info, "image": identity}).encode())
    os.replace(staging, dest)
