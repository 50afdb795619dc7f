"""The ``sandbox`` runtime: every VM is a bubblewrap sandbox on this host.

A sandbox gets its own pid, ipc, uts and network namespaces (loopback only: the browser
reaches the outside only through the egress socket), a read-only view of the system
(``/usr``, ``/etc``, the Python that runs the agent), a private ``/tmp`` and home, and its
state directory at ``/run/airlock``. The data dir (database, ``secret.key``) is never
mounted. Inside runs the guest agent (``agent.server``), which for a browser VM also runs
Xvnc and Chromium.

Contained (``confine``, ``vm_launch``): with a root controller each VM runs as a host uid of
its own (the owner of its state dir) in its own user namespace, with no capabilities,
``no_new_privs``, the controller's seccomp filter, a read-only ``/proc/sys``, a cgroup with
memory, pids and CPU-weight limits, and tmpfs of a fixed size for all it can write: the state
dir itself is a tmpfs the controller mounts on the host, so it outlives a controller restart
as the VM does.

A sandbox outlives the controller, like a Firecracker VM outlives the process that started
it: no ``--die-with-parent``, its own session. Its state dir holds everything a restarted
controller needs to find it (``meta.json``, ``pid`` with the host pid of the sandbox's init
and that process's start time, so a reused pid is never mistaken for it) and to reach it
(``agent.secret``, ``agent.sock``, ``vnc.sock``). Killing the sandbox's init kills its whole
pid namespace. Finding, killing and reaching those processes is ``sandbox_host``'s.
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
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import airlock
from airlock.agent import chromium_policy
from airlock.agent.client import AgentClient, AgentError
from airlock.agent.protocol import MAX_MESSAGE
from airlock.domain.vms import VmRole
from airlock.errors import RuntimeFailure
from airlock.runtimes import confine, vm_launch
from airlock.runtimes.base import RunningVm, Stream, VmSpec
from airlock.runtimes.sandbox_host import (
    INSTALL_HINT,
    VM_TAG,
    check_host,
    kill_init,
    open_vm_socket,
    remove_tree,
    sandbox_inits,
)
from airlock.runtimes.skeleton import (
    VmDirRuntime,
    make_state_dir,
    record_pid,
    vms_dir_problems,
    write_meta,
)
from airlock.runtimes.skeleton import write_private as _write_private
from airlock.runtimes.vmdir import VM_NICE, PidRecord, read_meta, set_cpu_nice
from airlock.runtimes.vmdir import proc_stat as _proc_stat
from airlock.runtimes.vmdir import read_pid as _read_pid

log = logging.getLogger(__name__)

INNER_STATE = "/run/airlock"
INNER_HOME = "/home/airlock"
INNER_EGRESS_DIR = "/run/airlock-egress"
# System directories every sandbox sees read-only (symlinks, as on merged-/usr, are recreated).
SYSTEM_PATHS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc")
# Chromium scans every font without fontconfig's cache: ~1 s more per boot.
OPTIONAL_RO_PATHS = ("/var/cache/fontconfig",)
# Secrets of the host that /etc would otherwise show to the sandbox's root.
MASKED_FILES = ("/etc/shadow", "/etc/shadow-", "/etc/gshadow", "/etc/gshadow-")
MASKED_DIRS = ("/etc/ssh", "/etc/ssl/private", "/etc/airlock")
# Files in the state dir that the controller writes and the sandbox must not change.
CONTROLLER_FILES = ("meta.json", "agent.secret", "pid", "agent.log")
CHROMIUM_ETC = "chromium-etc"  # the browser's /etc/chromium, with Airlock's managed policy
CREATING_GRACE_S = 60.0  # a state dir without a pid this young may be a create in flight
AGENT_WRAPPER = '"$@"; kill -KILL -1'  # -1 in a pid namespace: all but init and the shell
STAGE_DIR = "/run/airlock-stage"  # vm_launch's tmpfs of staged binds, in its own mount ns
DEFAULT_UID_BASE = confine.DEFAULT_UID_BASE
DEFAULT_LIMITS = confine.Limits(memory_mb=2048, pids_max=1024, cpu_weight=100)
DEFAULT_DISK_MB = 1024


def _set_once(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _default_chromium() -> str | None:
    # Debian's /usr/bin/chromium is a shell wrapper that sources /etc/chromium.d (extensions,
    # an shm probe); the binary itself starts faster and takes exactly our flags.
    for candidate in ("/usr/lib/chromium/chromium",):
        if os.access(candidate, os.X_OK):
            return candidate
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if found := shutil.which(name):
            return found
    return None


def _within(path: Path, parent: Path) -> bool:
    return path == parent or parent in path.parents


class SandboxRuntime(VmDirRuntime):
    """VMs as bubblewrap sandboxes; see the module docstring."""

    name = "sandbox"
    label = "sandbox"
    creating_grace_s = CREATING_GRACE_S

    def __init__(
        self,
        vms_dir: Path,
        *,
        bwrap: str | Path | None = None,
        xvnc: str | Path | None = None,
        chromium: str | Path | None = None,
        python: str | Path | None = None,
        boot_timeout_s: float = 20.0,
        browser_single_process: bool = True,
        limits: confine.Limits = DEFAULT_LIMITS,
        disk_mb: int = DEFAULT_DISK_MB,
        uid_base: int = DEFAULT_UID_BASE,
    ) -> None:
        super().__init__(vms_dir)
        self.bwrap = str(bwrap) if bwrap else shutil.which("bwrap")
        self.xvnc = str(xvnc) if xvnc else shutil.which("Xvnc")
        self.chromium = str(chromium) if chromium else _default_chromium()
        self.python = str(python or sys.executable)
        self.boot_timeout_s = boot_timeout_s
        self.browser_processes = "single" if browser_single_process else "multi"
        self.limits = limits
        self.disk_mb = disk_mb
        self.uid_base = uid_base
        # Root gives every VM its own uid, cgroup and tmpfs; anyone else runs VMs as itself.
        self.privileged = confine.privileged()
        if self.privileged:
            with contextlib.suppress(OSError):  # if this fails, check() says so
                os.makedirs(STAGE_DIR, mode=0o755, exist_ok=True)
        # Where ``import airlock`` comes from; the agent inside needs it on its path.
        self.package_root = Path(airlock.__file__).resolve().parent.parent
        self._procs: dict[str, subprocess.Popen[bytes]] = {}  # outer bwrap, to reap
        with contextlib.suppress(OSError):  # if this fails, list() and check() say so
            self.vms_dir.mkdir(mode=0o700, parents=True, exist_ok=True)

    # -- paths ------------------------------------------------------------------------------

    def exposed_paths(self) -> list[Path]:
        """Every host directory a sandbox sees (read-only), besides its own state dir."""
        paths: list[Path] = []
        for p in (*SYSTEM_PATHS, *OPTIONAL_RO_PATHS):
            if os.path.isdir(p) and not os.path.islink(p):
                paths.append(Path(p))
        extra = [
            Path(sys.prefix),
            Path(sys.base_prefix),
            self.package_root,
            Path(os.path.realpath(self.python)).parent,
        ]
        for binary in (self.xvnc, self.chromium):
            if binary:
                extra.append(Path(os.path.realpath(binary)).parent)
        for e in sorted({e.resolve() for e in extra}, key=lambda e: len(e.parts)):
            if e.is_dir() and not any(_within(e, q) for q in paths):
                paths.append(e)
        return paths

    def _data_dir_exposed(self) -> Path | None:
        data_dir = self.vms_dir.parent.resolve()
        for p in self.exposed_paths():
            if _within(data_dir, p) or _within(p, data_dir):
                return p
        return None

    def _bwrap_argv(
        self, spec: VmSpec, state_dir: Path, fds: dict[str, int], source: Callable[[Path], str]
    ) -> list[str]:
        """bwrap's command line. ``fds`` holds the fds it inherits (``info``, ``seccomp``);
        ``source`` says where bwrap finds a host path it binds (as root, staged by
        ``vm_launch``: see there)."""
        assert self.bwrap is not None
        mb = 2**20
        argv = [
            self.bwrap,
            "--unshare-user",  # its own user namespace: no capability of it is the host's
            "--disable-userns",  # and no further one inside (also refused by seccomp)
            "--unshare-pid",
            "--unshare-ipc",
            "--unshare-uts",
            "--unshare-net",  # loopback only; bwrap brings lo up
            "--unshare-cgroup",
            "--cap-drop",
            "ALL",
            "--hostname",
            f"airlock-{spec.vm_id[:8]}",
            "--new-session",
            "--info-fd",
            str(fds["info"]),
            "--seccomp",
            str(fds["seccomp"]),
        ]
        for p in SYSTEM_PATHS:
            if os.path.islink(p):
                argv += ["--symlink", os.readlink(p), p]
        # A fresh /tmp first, then the binds: a Python or a checkout that lives under /tmp
        # (a CI clone) stays visible on top of it.
        argv += ["--proc", "/proc", "--ro-bind", "/proc/sys", "/proc/sys", "--dev", "/dev"]
        argv += ["--size", str(self.disk_mb * mb), "--tmpfs", "/dev/shm"]
        argv += ["--size", str(self.disk_mb * mb), "--tmpfs", "/tmp"]
        for exposed in self.exposed_paths():
            argv += ["--ro-bind", source(exposed), str(exposed)]
        for f in MASKED_FILES:
            if os.path.isfile(f):
                argv += ["--ro-bind", "/dev/null", f]
        for d in MASKED_DIRS:
            if os.path.isdir(d):
                argv += ["--tmpfs", d, "--remount-ro", d]
        if spec.role is VmRole.CLI:
            argv += ["--bind", source(state_dir / "home"), INNER_HOME]
        else:
            argv += ["--perms", "0700", "--size", str(self.disk_mb * mb), "--tmpfs", INNER_HOME]
            if chromium_policy.ETC_CHROMIUM.is_dir() and (state_dir / CHROMIUM_ETC).is_dir():
                # The host's /etc is read-only in here: its /etc/chromium with our managed
                # policy added (agent.chromium_policy) goes over it.
                argv += [
                    "--ro-bind",
                    source(state_dir / CHROMIUM_ETC),
                    str(chromium_policy.ETC_CHROMIUM),
                ]
        argv += ["--bind", source(state_dir), INNER_STATE]
        for name in CONTROLLER_FILES:
            argv += ["--ro-bind", source(state_dir / name), f"{INNER_STATE}/{name}"]
        agent = [
            self.python,
            "-s",
            "-m",
            "airlock.agent.server",
            "--state-dir",
            INNER_STATE,
            "--role",
            spec.role.value,
            "--screen",
            f"{spec.screen[0]}x{spec.screen[1]}",
            "--xvnc",
            self.xvnc or "Xvnc",
            "--chromium",
            self.chromium or "chromium",
            "--browser-processes",
            self.browser_processes,
        ]
        egress = spec.egress_socket
        if egress is not None and egress.absolute() != state_dir / "egress.sock":
            # The directory, not the socket: a proxy that restarts makes a new socket inode.
            egress = egress.absolute()
            argv += ["--ro-bind", source(egress.parent), INNER_EGRESS_DIR]
            agent += ["--egress-socket", f"{INNER_EGRESS_DIR}/{egress.name}"]
        # The agent is the VM: when it exits, for whatever reason, everything else in the
        # sandbox is killed, so its init (which waits for all children) exits and the VM is
        # gone, visibly, instead of lingering as a screen nobody can reach.
        tag = f"{VM_TAG}{state_dir}"
        argv += ["--chdir", INNER_HOME, "--", "/bin/sh", "-c", AGENT_WRAPPER, tag, *agent]
        return argv

    def _command(
        self, spec: VmSpec, state_dir: Path, meta: dict[str, Any], fds: dict[str, int]
    ) -> list[str]:
        """The whole command: bwrap's, and as root ``vm_launch`` before it (cgroups, staged
        binds, the drop to the VM's uid)."""
        uid = meta.get("uid")
        if not self.privileged or not isinstance(uid, int):
            return self._bwrap_argv(spec, state_dir, fds, str)
        launch = [self.python, "-I", "-S", str(Path(vm_launch.__file__)), "--stage", STAGE_DIR]
        for cgroup in meta.get("cgroups", []):
            launch += ["--cgroup", str(Path(cgroup) / "cgroup.procs")]
        launch += ["--uid", str(uid)]
        staged: dict[Path, str] = {}

        def source(path: Path) -> str:
            if path not in staged:
                staged[path] = f"{STAGE_DIR}/{len(staged)}"
                launch.extend(["--dir" if path.is_dir() else "--file", str(path)])
            return staged[path]

        bwrap = self._bwrap_argv(spec, state_dir, fds, source)
        return [*launch, "--", *bwrap]

    def _sandbox_env(self) -> dict[str, str]:
        """The sandbox's whole environment: nothing of the controller's (database URLs,
        tokens) leaks in."""
        return {
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": INNER_HOME,
            "LANG": "C.UTF-8",
            "TMPDIR": "/tmp",
            "PYTHONPATH": str(self.package_root),
            "PYTHONUNBUFFERED": "1",
            "PYTHONDONTWRITEBYTECODE": "1",
        }

    # -- create -----------------------------------------------------------------------------

    async def create(self, spec: VmSpec) -> RunningVm:
        state_dir = self._state_dir(spec.vm_id)
        missing = [] if self.bwrap else ["bwrap"]
        if spec.role is VmRole.BROWSER:
            missing += [n for n, b in (("Xvnc", self.xvnc), ("chromium", self.chromium)) if not b]
        if missing:
            raise RuntimeFailure(f"missing {', '.join(missing)}: {INSTALL_HINT}")
        if (exposed := self._data_dir_exposed()) is not None:
            raise RuntimeFailure(f"the data dir would be visible in sandboxes (via {exposed})")
        started = time.monotonic()
        deadline = started + self.boot_timeout_s
        log_path = state_dir / "agent.log"
        async with self._creating_vm(spec.vm_id, log_path, heading="agent.log") as creation:
            secret, meta = await asyncio.to_thread(self._prepare, spec, state_dir)
            creation.push(lambda: self._teardown(spec.vm_id, state_dir))
            record = await self._launch(spec, state_dir, meta, deadline)
            await self._wait_ready(spec, state_dir, secret, deadline, record)
        boot_ms = round((time.monotonic() - started) * 1000)
        log.info("sandbox %s (%s) up in %d ms", spec.vm_id, spec.role.value, boot_ms)
        return RunningVm(
            vm_id=spec.vm_id,
            role=spec.role,
            pid=record.pid,
            state_dir=state_dir,
            detail={"boot_ms": str(boot_ms), "hostname": f"airlock-{spec.vm_id[:8]}"},
        )

    def _prepare(self, spec: VmSpec, state_dir: Path) -> tuple[str, dict[str, Any]]:
        """Make the state dir (as root: owned by a uid of its own, a tmpfs of
        ``disk_mb``), the VM's cgroups and the files the sandbox reads; return the agent's
        secret and the meta. On failure nothing is left behind."""
        uid = os.geteuid()
        if self.privileged:

            def allocate() -> None:
                nonlocal uid
                uid = confine.allocate_dir(self.vms_dir, state_dir, self.uid_base)

            make_state_dir(self.vms_dir, state_dir, spec.vm_id, allocate)
        else:
            make_state_dir(self.vms_dir, state_dir, spec.vm_id)
        cgroups: builtins.list[Path] = []
        try:
            if self.privileged:
                confine.mount_tmpfs(state_dir, size_mb=self.disk_mb, uid=uid)
                cgroups = confine.make_leaf(self._cgroup_name(spec.vm_id), self.limits)
            return self._fill_state_dir(spec, state_dir, uid, cgroups)
        except BaseException as exc:
            self._discard(state_dir, [str(c) for c in cgroups])
            if isinstance(exc, OSError):
                raise RuntimeFailure(f"cannot prepare {state_dir}: {exc}") from None
            raise

    def _cgroup_name(self, vm_id: str) -> str:
        # The vms dir's inode too: two runtimes (tests) may each have a VM of this id.
        return f"{vm_id}.{os.stat(self.vms_dir).st_ino:x}"

    def _own_cgroups(
        self, state_dir: Path, cgroups: builtins.list[str] | None = None
    ) -> builtins.list[Path]:
        """The VM's cgroups as its meta.json records them. Only ours: meta.json is the
        controller's, but a path from it is still checked."""
        if cgroups is None:
            found = read_meta(state_dir).get("cgroups", [])
            cgroups = [str(c) for c in found] if isinstance(found, builtins.list) else []
        return [Path(c) for c in cgroups if Path(c).name == self._cgroup_name(state_dir.name)]

    def _discard(self, state_dir: Path, cgroups: builtins.list[str] | None = None) -> None:
        """Remove what ``_prepare`` made: cgroups (killing what is left in them), the
        tmpfs, the dir."""
        confine.remove_leaves(self._own_cgroups(state_dir, cgroups))
        confine.unmount(state_dir)
        if state_dir.exists():
            remove_tree(state_dir)

    def _fill_state_dir(
        self, spec: VmSpec, state_dir: Path, uid: int, cgroups: builtins.list[Path]
    ) -> tuple[str, dict[str, Any]]:
        os.chmod(state_dir, 0o700)
        meta = write_meta(
            state_dir,
            spec,
            self.name,
            screen=f"{spec.screen[0]}x{spec.screen[1]}",
            labels=spec.labels,
            uid=uid,
            cgroups=[str(c) for c in cgroups],
        )
        if spec.boot_lease is not None:  # the agent reads it at start (agent.protocol, lease)
            _write_private(state_dir / "agent.lease", json.dumps(spec.boot_lease).encode())
        secret = secrets.token_urlsafe(32)
        _write_private(state_dir / "agent.secret", secret.encode() + b"\n")
        _write_private(state_dir / "pid", b"")  # filled in place once bwrap tells us the pid
        _write_private(state_dir / "agent.log", b"")
        if uid != os.geteuid():  # the agent reads these, as the VM's uid
            os.chown(state_dir / "agent.secret", uid, uid)
            if spec.boot_lease is not None:
                os.chown(state_dir / "agent.lease", uid, uid)
        if spec.role is VmRole.CLI:
            (state_dir / "home").mkdir(mode=0o700)
            if uid != os.geteuid():
                os.chown(state_dir / "home", uid, uid)
        else:  # Chromium's managed policy (its own background traffic off), see _bwrap_argv
            chromium_policy.etc_overlay(state_dir / CHROMIUM_ETC)
        return secret, meta

    async def _launch(
        self, spec: VmSpec, state_dir: Path, meta: dict[str, Any], deadline: float
    ) -> PidRecord:
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        log_fd = os.open(state_dir / "agent.log", os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        fds: dict[str, int] = {"info": write_fd}
        try:
            fds["seccomp"] = confine.seccomp_fd()
            proc = await asyncio.to_thread(
                subprocess.Popen,
                self._command(spec, state_dir, meta, fds),
                stdin=subprocess.DEVNULL,
                stdout=log_fd,
                stderr=log_fd,
                pass_fds=tuple(fds.values()),
                start_new_session=True,  # not in the controller's process group or session
                env=self._sandbox_env(),
                cwd="/",  # the VM's uid may not reach the controller's working directory
            )
        except OSError as exc:
            os.close(read_fd)
            raise RuntimeFailure(f"cannot start bwrap: {exc}") from None
        finally:
            for fd in fds.values():
                os.close(fd)
            os.close(log_fd)
        self._procs[spec.vm_id] = proc
        try:
            info = await self._read_info(read_fd, deadline)
        finally:
            os.close(read_fd)
        pid = info.get("child-pid")
        if not isinstance(pid, int):
            raise RuntimeFailure(f"bwrap did not say its child pid (exit {proc.poll()})")
        # In place (not rename): the sandbox sees this inode through a read-only bind.
        return record_pid(state_dir / "pid", pid, what="the sandbox", in_place=True)

    async def _read_info(self, fd: int, deadline: float) -> dict[str, Any]:
        """bwrap's --info-fd JSON: written once the sandbox exists, then the fd is closed."""
        loop = asyncio.get_running_loop()
        os.set_blocking(fd, False)
        data = b""
        while True:
            readable = loop.create_future()
            loop.add_reader(fd, _set_once, readable)
            try:
                await asyncio.wait_for(readable, max(deadline - time.monotonic(), 0.01))
            except TimeoutError:
                raise RuntimeFailure("bwrap did not start the sandbox in time") from None
            finally:
                loop.remove_reader(fd)
            chunk = os.read(fd, 65536)
            data += chunk
            if not chunk:
                break
            with contextlib.suppress(ValueError):
                info = json.loads(data)
                if isinstance(info, dict):
                    return info
        raise RuntimeFailure("bwrap failed before starting the sandbox")

    async def _wait_ready(
        self, spec: VmSpec, state_dir: Path, secret: str, deadline: float, record: PidRecord
    ) -> None:
        """Until the agent answers ping; for a browser VM also until VNC speaks RFB and
        Chromium is up (the agent's ping says so: its window is mapped, or its start page
        asked for the URL)."""
        proc = self._procs.get(spec.vm_id)

        async def attempt(what: str, probe: Callable[[], Awaitable[None]]) -> None:
            last: Exception | None = None
            while True:
                if proc is not None and proc.poll() is not None:
                    raise RuntimeFailure(f"the sandbox exited with {proc.returncode}")
                try:
                    await asyncio.wait_for(probe(), max(deadline - time.monotonic(), 0.01))
                    return
                except AgentError as exc:
                    if exc.code == "unauthorized":
                        raise
                    last = exc
                except (OSError, TimeoutError, ValueError) as exc:
                    last = exc
                if time.monotonic() > deadline:
                    raise RuntimeFailure(f"{what} not ready in {self.boot_timeout_s:g} s: {last}")
                await asyncio.sleep(0.02)

        async def ping() -> None:
            async with await self._connect_agent(state_dir, secret) as client:
                await client.ping()

        async def vnc() -> None:
            reader, writer = await open_vm_socket(state_dir, "vnc.sock")
            try:
                banner = await reader.readexactly(12)
            finally:
                writer.close()
            if not banner.startswith(b"RFB "):
                raise ValueError(f"not an RFB server: {banner!r}")

        async def browser() -> None:
            async with await self._connect_agent(state_dir, secret) as client:
                if not (await client.ping()).get("browser"):
                    raise ValueError("Chromium is not up yet")

        await attempt("agent", ping)
        # Now, not at launch: bwrap's init calls setsid() (a new scheduling group, at nice
        # 0) some time after it tells us its pid; the agent answering proves it has.
        set_cpu_nice(record.pid, VM_NICE)
        if spec.role is VmRole.BROWSER:
            await attempt("VNC", vnc)
            await attempt("Chromium", browser)

    async def _connect_agent(
        self, state_dir: Path, secret: str, timeout_s: float = 10
    ) -> AgentClient:
        reader, writer = await open_vm_socket(state_dir, "agent.sock", limit=MAX_MESSAGE + 1)
        return await AgentClient.connect(reader, writer, secret, timeout_s=timeout_s)

    async def _connect_vnc(self, state_dir: Path) -> Stream:
        return await open_vm_socket(state_dir, "vnc.sock")

    # -- destroy ----------------------------------------------------------------------------

    def _teardown(self, vm_id: str, state_dir: Path) -> bool:
        """Kill the sandbox (by its pid file, else by command line), reap, remove the dir."""
        killed = False
        confine.boost(self._own_cgroups(state_dir))
        record = _read_pid(state_dir)
        if record is not None:
            killed = kill_init(record)
        for pid in sandbox_inits(state_dir):  # a sandbox the pid file does not name
            found = _proc_stat(pid)
            if found is not None:
                killed = kill_init(PidRecord(pid, found[1])) or killed
        proc = self._procs.pop(vm_id, None)
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        self._discard(state_dir)
        return killed

    async def _destroy_locked(self, vm_id: str, state_dir: Path) -> bool:
        if not await asyncio.to_thread(state_dir.exists):
            self._reap(vm_id)
            return False
        return await asyncio.to_thread(self._teardown, vm_id, state_dir)

    def _reap(self, vm_id: str) -> None:
        proc = self._procs.get(vm_id)
        if proc is not None and proc.poll() is not None:
            del self._procs[vm_id]

    # -- list -------------------------------------------------------------------------------

    async def list(self) -> list[RunningVm]:
        for vm_id in list(self._procs):
            self._reap(vm_id)
        return await asyncio.to_thread(self._scan, frozenset(self._creating))

    def _runs_unrecorded(self, state_dir: Path) -> bool:
        return bool(sandbox_inits(state_dir))

    def _remove_gone(self, vm_id: str, state_dir: Path) -> None:
        self._discard(state_dir)

    # -- check ------------------------------------------------------------------------------

    async def check(self) -> builtins.list[str]:
        return await asyncio.to_thread(self._check)

    def _check(self) -> builtins.list[str]:
        problems = check_host(self.bwrap, self.xvnc, self.chromium)
        if (exposed := self._data_dir_exposed()) is not None:
            problems.append(
                f"the data dir {self.vms_dir.parent} lies in {exposed}, which every sandbox "
                "sees: move the data dir"
            )
        return problems + vms_dir_problems(self.vms_dir)
