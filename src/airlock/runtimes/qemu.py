"""The ``qemu`` runtime: every VM is a real QEMU virtual machine booting a guest image
(``airlock.images``), with KVM where it works for a stock kernel and TCG elsewhere.

A VM gets a qcow2 overlay over its flavor's shared ``rootfs.ext4``, a config disk (its agent
secret and role: not the kernel command line, which ``ps`` shows every host user), and no
network device at all. One virtio-serial port carries every stream: a host-side
multiplexer (``agent.mux``, its own process) listens on ``agent.sock`` and ``vnc.sock`` in
the VM's state dir and serves the VM's ``egress`` channel from the controller's egress proxy
socket, so the guest reaches exactly that proxy and the host reaches the guest only through
Unix sockets in a 0700 directory. QEMU is controlled through QMP (``qmp.sock``).

QEMU daemonizes and the multiplexer runs in its own session: both outlive the controller.
The state dir ``{vms_dir}/{vm_id}/`` holds what a restarted controller needs: ``meta.json``,
``pid`` (QEMU's pid and start time, so a reused pid is never taken for it), ``mux.pid``,
``agent.secret``; ``console.log`` is the guest's serial console.

KVM or TCG: ``/dev/kvm`` can exist and still run no stock kernel (kvm-pvm hangs one), so
``accel="auto"`` boots the image's kernel once under KVM and waits for its first console
line; the answer is cached in ``{cache}/kvm-probe.json`` per guest kernel and host kernel
(``kvm_probe``).
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import json
import logging
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient

import airlock
from airlock.agent.client import AgentClient, AgentError
from airlock.agent.protocol import MAX_MESSAGE
from airlock.domain.vms import VmRole
from airlock.errors import RuntimeFailure
from airlock.images import Image, find_image
from airlock.runtimes import confine
from airlock.runtimes.base import RunningVm, Stream, VmSpec
from airlock.runtimes.kvm_probe import kvm_openable, probe_kvm
from airlock.runtimes.skeleton import (
    VmDirRuntime,
    kill,
    lease_config,
    make_state_dir,
    record_pid,
    write_meta,
    write_private,
)
from airlock.runtimes.vmdir import (
    VM_NICE,
    PidRecord,
    is_alive,
    log_excerpt,
    open_unix,
    proc_stat,
    read_meta,
    read_pid,
    set_cpu_nice,
    unix_path,
)

log = logging.getLogger(__name__)
__all__ = ["QemuRuntime", "kvm_openable", "probe_kvm"]  # the probe lives in kvm_probe

CONFIG_DISK_SIZE = 4096
MUX_PORT = "org.airlock.mux"
# QEMU's seccomp filter: spawn=deny would refuse -daemonize's fork, elevateprivileges=deny
# the drop to the VM's uid (-runas).
QEMU_SANDBOX = "on,obsolete=deny,resourcecontrol=deny"
CREATING_GRACE_S = 120.0
# A CLI VM is where the vendor CLIs run, so it boots the image that has them.
DEFAULT_FLAVORS = {VmRole.BROWSER: "browser", VmRole.CLI: "cli"}
INSTALL_HINT = "apt-get install qemu-system-x86 qemu-utils (scripts/setup.sh --with-qemu)"


# -- processes ------------------------------------------------------------------------------
def _find_qemu(state_dir: Path) -> list[int]:
    """QEMU processes started for this state dir (by their pid file's path on the command
    line): for a VM whose pid file was never written (a controller died mid-create)."""
    needle = os.fsencode(state_dir / "qemu.pid")
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        with contextlib.suppress(OSError):
            cmdline = Path(f"/proc/{name}/cmdline").read_bytes()
            if b"qemu-system" in cmdline.split(b"\0", 1)[0] and needle in cmdline:
                found.append(int(name))
    return found


def _alive(record: PidRecord | None) -> bool:
    return record is not None and is_alive(record)


# -- the runtime ----------------------------------------------------------------------------
class QemuRuntime(VmDirRuntime):
    """VMs as QEMU guests; see the module docstring."""

    name = "qemu"
    label = "qemu VM"
    creating_grace_s = CREATING_GRACE_S
    missing_dir_is_empty = True

    def __init__(
        self,
        vms_dir: Path,
        image_dir: Path,
        *,
        flavors: Mapping[VmRole, str] | None = None,
        memory_mb: int = 512,
        cpus: int = 2,  # under TCG the agent and the mux start in parallel: ~2 s sooner
        accel: str = "auto",
        boot_timeout_s: float = 60.0,
        qemu: str | None = None,
        python: str | None = None,
        browser_single_process: bool = True,
        uid_base: int = confine.DEFAULT_UID_BASE,
    ) -> None:
        if accel not in ("auto", "kvm", "tcg"):
            raise ValueError(f"accel must be auto, kvm or tcg, not {accel!r}")
        super().__init__(vms_dir)
        self.image_dir = Path(image_dir).absolute()
        self.flavors = dict(flavors or DEFAULT_FLAVORS)
        self.memory_mb = memory_mb
        self.cpus = cpus
        self.accel_setting = accel
        self.boot_timeout_s = boot_timeout_s
        self.browser_processes = "single" if browser_single_process else "multi"
        self.uid_base = uid_base  # as root, each QEMU drops to a uid of its own (-runas)
        self.qemu = qemu or shutil.which("qemu-system-x86_64")
        self.qemu_img = shutil.which("qemu-img")
        self.python = python or sys.executable
        self.package_root = Path(airlock.__file__).resolve().parent.parent
        self._accel: dict[str, tuple[str, str]] = {}  # kernel version -> (accel, why)
        self._muxes: dict[str, subprocess.Popen[bytes]] = {}  # to reap

    # -- helpers ----------------------------------------------------------------------------
    def image_for(self, role: VmRole) -> Image:
        flavor = self.flavors[role]
        image = find_image(self.image_dir, flavor)
        if image is None:
            raise RuntimeFailure(
                f"no {flavor} guest image in {self.image_dir}: "
                f"run `airlock image build --flavor {flavor}`",
                code="image_missing",
            )
        return image

    async def accel_for(self, image: Image) -> tuple[str, str]:
        """("kvm" | "tcg", why), probed once per kernel and cached on disk and here."""
        if self.accel_setting != "auto":
            return self.accel_setting, f"AIRLOCK_QEMU_ACCEL={self.accel_setting}"
        known = self._accel.get(image.kernel_version)
        if known is None:
            assert self.qemu is not None
            usable, why = await asyncio.to_thread(probe_kvm, self.qemu, image, self.image_dir)
            known = ("kvm" if usable else "tcg", why)
            self._accel[image.kernel_version] = known
            log.info("qemu will use %s for kernel %s: %s", known[0], image.kernel_version, why)
        return known

    # -- create -----------------------------------------------------------------------------
    async def create(self, spec: VmSpec) -> RunningVm:
        state_dir = self._state_dir(spec.vm_id)
        if not self.qemu or not self.qemu_img:
            raise RuntimeFailure(f"QEMU not found: {INSTALL_HINT}")
        image = self.image_for(spec.role)
        if spec.vm_id in self._creating:
            raise RuntimeFailure(f"VM {spec.vm_id} is being created", code="vm_exists")
        accel, _why = await self.accel_for(image)
        started = time.monotonic()
        deadline = started + self.boot_timeout_s
        log_path = state_dir / "console.log"
        async with self._creating_vm(spec.vm_id, log_path, heading="console") as creation:
            secret = await asyncio.to_thread(self._prepare, spec, state_dir, image, accel)
            creation.push(lambda: self._teardown(spec.vm_id, state_dir, False))
            pid = await self._launch(spec, state_dir, image, accel)
            await self._wait_ready(state_dir, secret, deadline)
            if spec.role is VmRole.BROWSER and image.flavor == "browser":
                await self._wait_vnc(state_dir, deadline)
            set_cpu_nice(pid, VM_NICE)  # booted: the controller's deadlines come first
        boot_ms = round((time.monotonic() - started) * 1000)
        log.info("qemu VM %s (%s, %s) up in %d ms", spec.vm_id, spec.role.value, accel, boot_ms)
        return RunningVm(
            vm_id=spec.vm_id,
            role=spec.role,
            pid=pid,
            state_dir=state_dir,
            detail={"accel": accel, "boot_ms": str(boot_ms), "image": image.path.name},
        )

    def _prepare(self, spec: VmSpec, state_dir: Path, image: Image, accel: str) -> str:
        make_state_dir(self.vms_dir, state_dir, spec.vm_id)
        try:
            # egress_socket: the controller's egress proxy for this VM (it may start
            # listening only later): what a restarted host multiplexer serves the guest from.
            meta = write_meta(
                state_dir,
                spec,
                self.name,
                accel=accel,
                image=str(image.path),
                screen=f"{spec.screen[0]}x{spec.screen[1]}",
                labels=spec.labels,
                egress_socket=str((spec.egress_socket or state_dir / "egress.sock").absolute()),
            )
            if confine.privileged():
                confine.allocate_marker(self.vms_dir, state_dir, self.uid_base)
            secret = secrets.token_urlsafe(32)
            write_private(state_dir / "agent.secret", secret.encode() + b"\n")
            config = json.dumps(
                {
                    "secret": secret,
                    "role": spec.role.value,
                    "screen": meta["screen"],
                    "browser_processes": self.browser_processes,
                    **lease_config(spec),
                }
            ).encode()
            write_private(state_dir / "config.img", config.ljust(CONFIG_DISK_SIZE, b"\0"))
            assert self.qemu_img is not None
            done = subprocess.run(
                [
                    self.qemu_img,
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "-F",
                    "raw",
                    "-b",
                    str(image.rootfs),
                    str(state_dir / "disk.qcow2"),
                ],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
            if done.returncode != 0:
                raise RuntimeFailure(f"qemu-img create failed: {done.stderr.strip()}")
            return secret
        except BaseException as exc:
            shutil.rmtree(state_dir, ignore_errors=True)
            if isinstance(exc, OSError):
                raise RuntimeFailure(f"cannot prepare {state_dir}: {exc.strerror}") from None
            raise

    def _qemu_argv(self, spec: VmSpec, state_dir: Path, image: Image, accel: str) -> list[str]:
        assert self.qemu is not None
        s = str(state_dir)
        # Its sockets are named relative to the state dir, QEMU's working directory at
        # launch: an absolute path under a deep data dir passes sun_path's 107 bytes, and
        # QEMU cannot bind it. Files have no such limit and stay absolute.
        # QEMU opens its files, sockets and /dev/kvm as root, then drops to the VM's uid
        # (-runas) under its seccomp filter (QEMU_SANDBOX).
        drop: list[str] = []
        with contextlib.suppress(FileNotFoundError):
            uid = (state_dir / confine.UID_MARKER).stat().st_uid
            drop = ["-runas", f"{uid}:{uid}"]
        return [
            self.qemu,
            "-sandbox",
            QEMU_SANDBOX,
            *drop,
            "-name",
            f"airlock-{spec.vm_id},process=airlock-{spec.vm_id[:20]}",
            "-M",
            "q35",
            "-accel",
            accel,
            "-cpu",
            "max" if accel == "tcg" else "host",
            "-m",
            str(self.memory_mb),
            "-smp",
            str(self.cpus),
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-nic",
            "none",  # no network device: the egress proxy comes over the serial port
            # A guest that reboots ends: the guest init reboots when its lease ran out, and a
            # kernel panic (panic=-1) then ends the VM, visibly, instead of booting it afresh.
            "-no-reboot",
            "-kernel",
            str(image.vmlinuz),
            "-initrd",
            str(image.initrd),
            "-append",
            image.cmdline,
            "-drive",
            f"file={s}/disk.qcow2,if=virtio,format=qcow2,discard=unmap",
            "-drive",
            f"file={s}/config.img,if=virtio,format=raw,readonly=on",
            "-device",
            "virtio-serial-pci",
            "-chardev",
            "socket,id=mux,path=mux.sock,server=on,wait=off",
            "-device",
            f"virtserialport,chardev=mux,name={MUX_PORT}",
            "-device",
            "virtio-rng-pci",
            "-serial",
            f"file:{s}/console.log",
            "-qmp",
            "unix:qmp.sock,server=on,wait=off",
            "-pidfile",
            f"{s}/qemu.pid",
            "-daemonize",
        ]

    async def _launch(self, spec: VmSpec, state_dir: Path, image: Image, accel: str) -> int:
        argv = self._qemu_argv(spec, state_dir, image, accel)
        # The standard library's subprocess in a thread, not the event loop's: under uvloop
        # (what `airlock serve` runs on) the child kept a copy of its output pipe past
        # -daemonize, so waiting for that pipe's end waited for the timeout, every boot.
        # QEMU's own output goes to a file; the parent exits once the VM is set up.
        log_path = state_dir / "qemu.log"
        log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            done = await asyncio.to_thread(
                subprocess.run,
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log_fd,
                stderr=log_fd,
                cwd=state_dir,  # the sockets' paths are relative to it
                start_new_session=True,
                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
                timeout=30,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise RuntimeFailure("QEMU did not finish starting in 30 s") from None
        finally:
            os.close(log_fd)
        if done.returncode != 0:
            raise RuntimeFailure(f"QEMU failed to start: {log_excerpt(log_path)}")
        try:
            pid = int((state_dir / "qemu.pid").read_text().strip())
        except (OSError, ValueError):
            raise RuntimeFailure("QEMU did not write its pid file") from None
        await asyncio.to_thread(record_pid, state_dir / "pid", pid)
        await asyncio.to_thread(self._start_mux, spec.vm_id, state_dir)
        return pid

    def _start_mux(self, vm_id: str, state_dir: Path) -> None:
        """The host side of the VM's one serial line, in a session of its own (it outlives
        the controller, as QEMU does). Its egress target comes from ``meta.json``."""
        egress = str(read_meta(state_dir).get("egress_socket") or state_dir / "egress.sock")
        mux = [
            self.python,
            "-s",
            "-m",
            "airlock.agent.mux",
            "--connect",
            "mux.sock",  # relative to its working directory, the state dir (sun_path)
            "--listen",
            "agent=agent.sock",
            "--listen",
            "vnc=vnc.sock",
            "--target",
            f"egress={egress}",
        ]
        log_fd = os.open(state_dir / "mux.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            popen = subprocess.Popen(  # returns at once; reaped by list/destroy
                mux,
                stdin=subprocess.DEVNULL,
                stdout=log_fd,
                stderr=log_fd,
                cwd=state_dir,
                start_new_session=True,
                env={
                    "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                    "PYTHONPATH": str(self.package_root),
                    "PYTHONUNBUFFERED": "1",
                },
            )
        finally:
            os.close(log_fd)
        self._muxes[vm_id] = popen
        record_pid(state_dir / "mux.pid", popen.pid)

    async def _wait_ready(self, state_dir: Path, secret: str, deadline: float) -> None:
        record = read_pid(state_dir)
        last: Exception | None = None
        while True:
            if record is None or not is_alive(record):
                raise RuntimeFailure("QEMU exited")
            try:
                client = await asyncio.wait_for(self._connect_agent(state_dir, secret, 3), 5)
                async with client:
                    await client.ping()
                return
            except AgentError as exc:
                if exc.code == "unauthorized":
                    raise
                last = exc
            except (OSError, TimeoutError) as exc:
                last = exc
            if time.monotonic() > deadline:
                raise RuntimeFailure(f"agent not ready in {self.boot_timeout_s:g} s: {last}")
            await asyncio.sleep(0.2)

    async def _wait_vnc(self, state_dir: Path, deadline: float) -> None:
        """Until the guest's Xvnc speaks RFB through the multiplexer (a screen to show)."""
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                reader, writer = await open_unix(state_dir / "vnc.sock")
                try:
                    banner = await asyncio.wait_for(reader.readexactly(12), 5)
                finally:
                    writer.close()
                if banner.startswith(b"RFB "):
                    return
                last = ValueError(f"not an RFB server: {banner!r}")
            except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
                last = exc
            await asyncio.sleep(0.25)
        raise RuntimeFailure(f"VNC not ready in {self.boot_timeout_s:g} s: {last}")

    async def _connect_agent(
        self, state_dir: Path, secret: str, timeout_s: float = 10
    ) -> AgentClient:
        reader, writer = await open_unix(state_dir / "agent.sock", limit=MAX_MESSAGE + 1)
        return await AgentClient.connect(reader, writer, secret, timeout_s=timeout_s)

    async def _connect_vnc(self, state_dir: Path) -> Stream:
        return await open_unix(state_dir / "vnc.sock")

    # -- destroy ----------------------------------------------------------------------------
    async def _destroy_locked(self, vm_id: str, state_dir: Path) -> bool:
        if not await asyncio.to_thread(state_dir.exists):
            self._reap(vm_id)
            return False
        was_running = _alive(read_pid(state_dir))
        quit_ok = await self._qmp_quit(state_dir) if was_running else False
        killed = await asyncio.to_thread(self._teardown, vm_id, state_dir, quit_ok)
        return killed or was_running

    async def _qmp_quit(self, state_dir: Path) -> bool:
        """Ask QEMU to quit over QMP; True if it said yes. The kill comes after regardless."""
        qmp = QMPClient(f"airlock-{state_dir.name}")
        try:
            with unix_path(state_dir / "qmp.sock") as path:
                await asyncio.wait_for(qmp.connect(path), 2)
            await asyncio.wait_for(qmp.execute("quit"), 2)
            return True
        except Exception as exc:  # any QMP failure: the kill below still ends it
            log.info("QMP quit of %s failed (%s); killing it", state_dir.name, exc)
            return False
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(qmp.disconnect(), 2)

    def _teardown(self, vm_id: str, state_dir: Path, quit_sent: bool) -> bool:
        """Wait briefly for a QEMU that was told to quit, kill what is left (QEMU, also one the
        pid file does not name, and the multiplexer), remove every file."""
        record = read_pid(state_dir)
        was_running = _alive(record)
        if quit_sent:
            deadline = time.monotonic() + 3
            while _alive(record) and time.monotonic() < deadline:
                time.sleep(0.02)
        kill(record, timeout_s=5)
        for pid in _find_qemu(state_dir):
            found = proc_stat(pid)
            if found is not None:
                was_running = kill(PidRecord(pid, found[1]), timeout_s=5) or was_running
        kill(read_pid(state_dir, "mux.pid"), timeout_s=5)
        popen = self._muxes.pop(vm_id, None)
        if popen is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                popen.wait(timeout=5)
        shutil.rmtree(state_dir, ignore_errors=True)
        if state_dir.exists():
            raise RuntimeFailure(f"could not remove {state_dir}")
        return was_running

    def _reap(self, vm_id: str) -> None:
        popen = self._muxes.get(vm_id)
        if popen is not None and popen.poll() is not None:
            del self._muxes[vm_id]

    # -- list -------------------------------------------------------------------------------
    async def list(self) -> builtins.list[RunningVm]:
        for vm_id in builtins.list(self._muxes):
            self._reap(vm_id)
        busy = frozenset(self._creating) | {v for v, lk in self._locks.items() if lk.locked()}
        found = await asyncio.to_thread(self._scan, frozenset(self._creating))
        for vm in found:
            if vm.pid is not None and vm.vm_id not in busy:
                await asyncio.to_thread(self._revive_mux, vm.vm_id, vm.state_dir)
        return found

    def _revive_mux(self, vm_id: str, state_dir: Path) -> None:
        """A running VM whose host multiplexer died (killed, crashed) is unreachable: its
        agent, screen and egress all go through it. Start a new one; the guest side waits
        for it and the two resynchronise."""
        if _alive(read_pid(state_dir, "mux.pid")):
            return
        log.warning("qemu VM %s: its host multiplexer is gone; starting a new one", vm_id)
        self._reap(vm_id)
        with contextlib.suppress(OSError):
            self._start_mux(vm_id, state_dir)

    def _runs_unrecorded(self, state_dir: Path) -> bool:
        return bool(_find_qemu(state_dir))

    def _remove_gone(self, vm_id: str, state_dir: Path) -> None:
        self._teardown(vm_id, state_dir, False)

    def _detail(self, meta: dict[str, Any]) -> dict[str, str]:
        return {"accel": str(meta.get("accel", ""))}

    # -- check ------------------------------------------------------------------------------
    async def check(self) -> builtins.list[str]:
        problems: builtins.list[str] = []
        if not self.qemu or not os.access(self.qemu, os.X_OK):
            problems.append(f"qemu-system-x86_64 not found: {INSTALL_HINT}")
        if not self.qemu_img:
            problems.append(f"qemu-img not found: {INSTALL_HINT}")
        if self.qemu and os.access(self.qemu, os.X_OK):
            done = await asyncio.to_thread(
                subprocess.run,
                [self.qemu, "-sandbox", QEMU_SANDBOX, "-version"],
                capture_output=True,
                text=True,
                timeout=10,
                check=False,
            )
            if done.returncode != 0:
                problems.append(
                    f"this QEMU cannot run with -sandbox {QEMU_SANDBOX} (built without "
                    f"seccomp?): {done.stderr.strip()[:200]}; install Debian's qemu-system-x86"
                )
        for flavor in sorted(set(self.flavors.values())):
            try:
                if find_image(self.image_dir, flavor) is None:
                    problems.append(
                        f"no {flavor} guest image in {self.image_dir}: "
                        f"airlock image build --flavor {flavor}"
                    )
            except Exception as exc:
                problems.append(f"{flavor} image: {exc}")
        try:
            self.vms_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            problems.append(f"cannot create {self.vms_dir}: {exc.strerror}")
        return problems
