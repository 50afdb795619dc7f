"""The host side of a bubblewrap sandbox, for the ``sandbox`` runtime: finding its
processes (by pid namespace, or by the tag on bwrap's command line when the pid file names
none), killing a sandbox's init and every process of its namespace, reaching the sockets it
serves without trusting its state dir, and whether this host can run sandboxes at all
(``check_host`` for ``check()``, ``host_checks`` for ``airlock doctor``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import stat
import struct
import subprocess
import time
from pathlib import Path
from typing import Any

from airlock.errors import RuntimeFailure
from airlock.runtimes import confine
from airlock.runtimes.base import Stream
from airlock.runtimes.host_checks import HostCheck, binary
from airlock.runtimes.skeleton import kill
from airlock.runtimes.vmdir import DYING_VM_NICE, PidRecord, set_cpu_nice
from airlock.runtimes.vmdir import open_unix as _open_unix
from airlock.runtimes.vmdir import read_pid as _read_pid

INSTALL_HINT = "apt-get install bubblewrap tigervnc-standalone-server chromium"
# What a sandbox runs: (doctor's name, names on PATH, Debian package, what it is for).
BINARIES = (
    ("bwrap", ("bwrap",), "bubblewrap", "the sandbox runtime's isolation"),
    ("Xvnc", ("Xvnc",), "tigervnc-standalone-server", "the browser VM's display and VNC server"),
    (
        "chromium",
        ("chromium", "chromium-browser", "google-chrome"),
        "chromium",
        "the browser in the browser VM",
    ),
)
VM_TAG = "airlock-vm="  # $0 of the sandbox's shell: names its state dir in bwrap's cmdline


def _pids() -> list[int]:
    return [int(n) for n in os.listdir("/proc") if n.isdigit()]


def _ns_members(ns: tuple[int, int]) -> list[int]:
    """Host pids of every process in the pid namespace identified by (dev, inode)."""
    members = []
    for pid in _pids():
        try:
            st = os.stat(f"/proc/{pid}/ns/pid")
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == ns:
            members.append(pid)
    return members


def sandbox_inits(state_dir: Path) -> list[int]:
    """Inits of live sandboxes for this state dir, found by command line (bwrap's init is a
    fork of bwrap, in a pid namespace other than ours): the fallback when the pid file does not
    name a live sandbox, e.g. a controller died between starting it and writing the pid."""
    needle = b"\0" + VM_TAG.encode() + os.fsencode(state_dir) + b"\0"
    try:
        own = os.stat("/proc/self/ns/pid")
    except OSError:
        return []
    found = []
    for pid in _pids():
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            if needle not in cmdline or os.path.basename(cmdline.split(b"\0", 1)[0]) != b"bwrap":
                continue
            ns = os.stat(f"/proc/{pid}/ns/pid")
        except OSError:
            continue
        if (ns.st_dev, ns.st_ino) != (own.st_dev, own.st_ino):
            found.append(pid)  # not the outer bwrap, which stays in our namespace
    return found


def kill_init(record: PidRecord) -> bool:
    """SIGKILL a sandbox's init through a pidfd (no pid-reuse race), wait until it and every
    process of its pid namespace are gone. False if it was not running."""
    namespaces: list[tuple[int, int]] = []

    def before(pid: int) -> None:
        with contextlib.suppress(OSError):
            st = os.stat(f"/proc/{pid}/ns/pid")
            namespaces.append((st.st_dev, st.st_ino))
        set_cpu_nice(pid, DYING_VM_NICE)  # its processes' exit is work too

    if not kill(record, what="sandbox init", before=before):
        return False
    for ns in namespaces:
        deadline = time.monotonic() + 5
        while survivors := _ns_members(ns):
            if time.monotonic() > deadline:
                raise RuntimeFailure(f"processes {survivors} of a killed sandbox survive")
            for pid in survivors:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.01)
    return True


def remove_tree(path: Path) -> None:
    def onerror(func: Any, failed: str, exc_info: Any) -> None:
        if not isinstance(exc_info[1], FileNotFoundError):
            raise exc_info[1]

    for attempt in range(3):  # a dying agent may still have been creating a socket
        try:
            shutil.rmtree(path, onerror=onerror)
            return
        except OSError:
            if attempt == 2:
                raise
            time.sleep(0.05)


def _same_pid_ns(a: int, b: int) -> bool:
    try:
        sa, sb = os.stat(f"/proc/{a}/ns/pid"), os.stat(f"/proc/{b}/ns/pid")
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


async def open_vm_socket(state_dir: Path, name: str, *, limit: int = 2**16) -> Stream:
    """Connect to a socket the sandbox serves in its state dir. The sandbox can write that
    directory: a symlink there would lead the controller to a socket of the host. So only a
    socket is accepted, and its listener must live in the sandbox's pid namespace."""
    path = state_dir / name
    if not stat.S_ISSOCK(os.lstat(path).st_mode):
        raise OSError(f"{name} is not a socket")
    reader, writer = await _open_unix(path, limit=limit)
    record = _read_pid(state_dir)
    if record is not None:
        sock = writer.get_extra_info("socket")
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        peer_pid = struct.unpack("3i", creds)[0]
        if not _same_pid_ns(peer_pid, record.pid):
            writer.close()
            raise OSError(f"{name} is not served from inside the VM")
    return reader, writer


def check_host(bwrap: str | None, xvnc: str | None, chromium: str | None) -> list[str]:
    """What stops this host from running sandboxes with these binaries."""
    problems: list[str] = []
    for (what, _, package, _), path in zip(BINARIES, (bwrap, xvnc, chromium), strict=True):
        if not path or not os.access(path, os.X_OK):
            problems.append(
                f"{what} not found ({path or 'not on PATH'}): apt-get install {package}"
                f" (all of them: {INSTALL_HINT})"
            )
    if bwrap and os.access(bwrap, os.X_OK):
        probe = [
            bwrap,
            "--unshare-pid",
            "--unshare-ipc",
            "--unshare-uts",
            "--unshare-net",
            "--ro-bind",
            "/",
            "/",
            "--proc",
            "/proc",
            "--dev",
            "/dev",
            "true",
        ]
        try:
            done = subprocess.run(probe, capture_output=True, timeout=10, check=False)
            if done.returncode != 0:
                problems.append(
                    "bwrap cannot create namespaces here: "
                    + done.stderr.decode("utf-8", "replace").strip()
                )
        except (OSError, subprocess.TimeoutExpired) as exc:
            problems.append(f"bwrap does not run: {exc}")
    if xvnc and os.access(xvnc, os.X_OK):
        try:
            done = subprocess.run([xvnc, "-help"], capture_output=True, timeout=10, check=False)
            if b"rfbunixpath" not in done.stdout + done.stderr:
                problems.append(
                    "this Xvnc cannot serve VNC on a Unix socket (no -rfbunixpath): "
                    "install TigerVNC's tigervnc-standalone-server"
                )
        except (OSError, subprocess.TimeoutExpired) as exc:
            problems.append(f"Xvnc does not run: {exc}")
    if not hasattr(os, "pidfd_open"):
        problems.append("this Python or kernel lacks pidfd_open (Linux >= 5.3 needed)")
    return problems


def host_checks() -> list[HostCheck]:
    """The sandbox runtime's rows for ``airlock doctor``: its binaries, then what keeps a
    sandbox VM in (``confine``): a root controller (per-VM uids, cgroups, tmpfs), user
    namespaces for an unprivileged uid, seccomp, cgroup limits."""
    checks = [binary(n, c, p, needed=True, why=w) for n, c, p, w in BINARIES]
    checks.append(
        binary(
            "pasta",
            ("pasta", "passt"),
            "passt",
            needed=False,
            why="only for general egress from a sandbox; the egress proxy needs none",
        )
    )
    if confine.privileged():
        checks.append(HostCheck("controller uid", True, True, "root: each VM gets its own uid"))
    else:
        checks.append(
            HostCheck(
                "controller uid",
                False,
                True,
                f"uid {os.geteuid()}: VMs would run as this user, with no cgroup limits, no "
                "uid of their own and no size limit on their state dirs",
                "run the controller as root: it drops every VM to a uid of its own",
            )
        )
    if (bwrap := shutil.which("bwrap")) is not None:
        problem = confine.userns_problem(bwrap)
        checks.append(
            HostCheck(
                "user namespaces",
                problem is None,
                True,
                "an unprivileged uid can create one" if problem is None else problem,
                None
                if problem is None
                else "sysctl -w user.max_user_namespaces=15000; on Debian kernels before 6.1 "
                "also kernel.unprivileged_userns_clone=1; on Ubuntu 23.10+ "
                "kernel.apparmor_restrict_unprivileged_userns=0 (or an AppArmor profile "
                "allowing userns for /usr/bin/bwrap)",
            )
        )
    seccomp = "Seccomp:" in Path("/proc/self/status").read_text()
    checks.append(
        HostCheck(
            "seccomp",
            seccomp,
            True,
            "the kernel filters syscalls" if seccomp else "kernel without CONFIG_SECCOMP",
            None if seccomp else "a kernel built with CONFIG_SECCOMP_FILTER",
        )
    )
    checks.append(_cgroup_check())
    return checks


def _cgroup_check() -> HostCheck:
    problem = confine.cgroup_problem()
    layout = confine.cgroup_layout()
    if problem is None and layout is not None:
        kind, parents = layout
        where = ", ".join(str(p) for p in parents.values())
        detail = f"cgroup {kind}: VM leaves under {where}"
        if kind == "v1":
            detail += " (no cgroup v2 memory/pids/cpu here; v1 limits work the same)"
        return HostCheck("cgroups", True, True, detail)
    return HostCheck(
        "cgroups",
        False,
        True,
        problem or "no cgroups",
        "mount cgroup2 with the memory, pids and cpu controllers (systemd: "
        "systemd.unified_cgroup_hierarchy=1); in a container or a systemd unit, "
        "delegate a cgroup subtree to the controller (Delegate=yes, or docker/podman "
        "--cgroupns=private with a writable /sys/fs/cgroup)",
    )
