"""What keeps a VM's processes in: its host uid, its seccomp filter, its cgroup, its disk.

Shared by the runtimes (they may not import each other). The sandbox runtime uses all of it;
the qemu and firecracker runtimes use the uid pool to run their VMMs unprivileged.

- **A uid per VM**, from a reserved range (``AIRLOCK_VM_UID_BASE`` and the 65,536 above it),
  that no user of the host has: a VM's files are its own, another VM (another uid) cannot
  read them, and the uid owns nothing else on the host. The owner of a VM's state dir *is* its
  uid: a restarted controller reads it back from there, so nothing else records it.
- **A seccomp filter** (classic BPF, built here, loaded by bwrap before it execs the guest):
  a denylist that covers every syscall Docker's and Podman's default profiles refuse (module
  loading, mount and the new mount API, namespaces, ptrace and process_vm_*, kexec, bpf,
  perf_event_open, keyctl, userfaultfd, io_uring, clock setting, ...), 32-bit and x32 entry
  points killed, ``clone`` with namespace flags refused, ``clone3`` answered ENOSYS so libc
  falls back to ``clone``, ``ioctl(TIOCSTI)`` refused.
- **A cgroup leaf per VM** with a memory, pids and CPU-weight limit, on cgroup v2 or, where a
  host still mounts the v1 controllers (this CI machine does), on their v1 hierarchies.
- **A size-limited state dir**: a tmpfs the controller mounts on the host at the state dir, so
  the VM's one writable host directory cannot fill the host's disk, and its pages count
  against the VM's memory limit.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import signal
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

UID_COUNT = 65536
DEFAULT_UID_BASE = 1_900_000_000
UID_MARKER = "uid"
CGROUP_ROOT = Path("/sys/fs/cgroup")
V1_CONTROLLERS = ("memory", "pids", "cpu")
V2_CONTROLLERS = ("memory", "pids", "cpu")
CGROUP_PARENT = "airlock"

# -- seccomp ---------------------------------------------------------------------------------

AUDIT_ARCH_X86_64 = 0xC000003E
X32_SYSCALL_BIT = 0x40000000
RET_KILL_PROCESS = 0x80000000
RET_ERRNO = 0x00050000
RET_ALLOW = 0x7FFF0000
LD_W_ABS = 0x20  # BPF_LD | BPF_W | BPF_ABS
JEQ_K = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
JGE_K = 0x35  # BPF_JMP | BPF_JGE | BPF_K
JSET_K = 0x45  # BPF_JMP | BPF_JSET | BPF_K
RET_K = 0x06  # BPF_RET | BPF_K
OFF_NR, OFF_ARCH, OFF_ARG0, OFF_ARG1 = 0, 4, 16, 24  # struct seccomp_data, little-endian

# x86_64 numbers (asm/unistd_64.h). Every one is refused with EPERM.
DENIED_SYSCALLS: dict[str, int] = {
    "ptrace": 101,
    "syslog": 103,
    "uselib": 134,
    "ustat": 136,
    "sysfs": 139,
    "vhangup": 153,
    "pivot_root": 155,
    "_sysctl": 156,
    "acct": 163,
    "settimeofday": 164,
    "mount": 165,
    "umount2": 166,
    "swapon": 167,
    "swapoff": 168,
    "reboot": 169,
    "iopl": 172,
    "ioperm": 173,
    "create_module": 174,
    "init_module": 175,
    "delete_module": 176,
    "get_kernel_syms": 177,
    "query_module": 178,
    "quotactl": 179,
    "nfsservctl": 180,
    "getpmsg": 181,
    "putpmsg": 182,
    "afs_syscall": 183,
    "tuxcall": 184,
    "security": 185,
    "lookup_dcookie": 212,
    "epoll_ctl_old": 214,
    "epoll_wait_old": 215,
    "clock_settime": 227,
    "mbind": 237,
    "set_mempolicy": 238,
    "get_mempolicy": 239,
    "kexec_load": 246,
    "add_key": 248,
    "request_key": 249,
    "keyctl": 250,
    "unshare": 272,
    "move_pages": 279,
    "perf_event_open": 298,
    "fanotify_init": 300,
    "name_to_handle_at": 303,
    "open_by_handle_at": 304,
    "clock_adjtime": 305,
    "setns": 308,
    "process_vm_readv": 310,
    "process_vm_writev": 311,
    "kcmp": 312,
    "finit_module": 313,
    "kexec_file_load": 320,
    "bpf": 321,
    "userfaultfd": 323,
    "io_uring_setup": 425,
    "io_uring_enter": 426,
    "io_uring_register": 427,
    "open_tree": 428,
    "move_mount": 429,
    "fsopen": 430,
    "fsconfig": 431,
    "fsmount": 432,
    "fspick": 433,
    "pidfd_getfd": 438,
    "mount_setattr": 442,
    "quotactl_fd": 443,
    "set_mempolicy_home_node": 450,
    "open_tree_attr": 467,
}
NR_IOCTL, NR_PERSONALITY, NR_CLONE, NR_CLONE3 = 16, 135, 56, 435
TIOCSTI, TIOCLINUX = 0x5412, 0x541C
# Docker's profile allows personality() only with these (PER_LINUX, PER_LINUX32, UNAME26...).
ALLOWED_PERSONALITIES = (0x0, 0x8, 0x20000, 0x20008, 0xFFFFFFFF)
CLONE_NS_FLAGS = (
    0x00020000  # CLONE_NEWNS
    | 0x02000000  # CLONE_NEWCGROUP
    | 0x04000000  # CLONE_NEWUTS
    | 0x08000000  # CLONE_NEWIPC
    | 0x10000000  # CLONE_NEWUSER
    | 0x20000000  # CLONE_NEWPID
    | 0x40000000  # CLONE_NEWNET
    | 0x00000080  # CLONE_NEWTIME
)


def _ins(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k)


def seccomp_program() -> bytes:
    """The filter as ``struct sock_filter[]``, the form ``bwrap --seccomp FD`` reads."""
    eperm = _ins(RET_K, RET_ERRNO | errno.EPERM)
    allow = _ins(RET_K, RET_ALLOW)
    prog = [
        _ins(LD_W_ABS, OFF_ARCH),
        _ins(JEQ_K, AUDIT_ARCH_X86_64, jt=1),
        _ins(RET_K, RET_KILL_PROCESS),  # int 0x80 (i386) or any other ABI
        _ins(LD_W_ABS, OFF_NR),
        _ins(JGE_K, X32_SYSCALL_BIT, jf=1),
        eperm,  # the x32 ABI: a second table of the same calls
    ]
    for nr in DENIED_SYSCALLS.values():
        prog += [_ins(JEQ_K, nr, jf=1), eperm]
    prog += [_ins(JEQ_K, NR_CLONE3, jf=1), _ins(RET_K, RET_ERRNO | errno.ENOSYS)]
    # clone(flags, ...): refused with any namespace flag (the low 32 bits hold them all).
    prog += [_ins(JEQ_K, NR_CLONE, jf=4), _ins(LD_W_ABS, OFF_ARG0)]
    prog += [_ins(JSET_K, CLONE_NS_FLAGS, jf=1), eperm, allow]
    prog += [_ins(JEQ_K, NR_IOCTL, jf=5), _ins(LD_W_ABS, OFF_ARG1)]
    prog += [_ins(JEQ_K, TIOCSTI, jt=1), _ins(JEQ_K, TIOCLINUX, jf=1), eperm, allow]
    n = len(ALLOWED_PERSONALITIES)
    prog += [_ins(JEQ_K, NR_PERSONALITY, jf=n + 3), _ins(LD_W_ABS, OFF_ARG0)]
    for i, value in enumerate(ALLOWED_PERSONALITIES):
        prog.append(_ins(JEQ_K, value, jt=n - i))
    prog += [eperm, allow]
    prog.append(allow)
    return b"".join(prog)


def seccomp_fd() -> int:
    """A readable fd holding the filter (a memfd; bwrap reads it to the end)."""
    fd = os.memfd_create("airlock-seccomp", 0)  # not CLOEXEC: handed to bwrap
    try:
        os.write(fd, seccomp_program())
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


# -- the uid pool ----------------------------------------------------------------------------

_uid_lock = threading.Lock()


@contextlib.contextmanager
def _uids_locked(vms_dir: Path) -> Iterator[None]:
    """One allocation at a time: across threads, and across controllers sharing the vms
    dir (a rolling restart), by an flock on the vms dir itself."""
    with _uid_lock:
        fd = os.open(vms_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


def privileged() -> bool:
    """Only a root controller can give VMs their own uid, cgroup and tmpfs."""
    return os.geteuid() == 0


def _free_uid(vms_dir: Path, base: int, marker: str) -> int:
    taken = set()
    with os.scandir(vms_dir) as entries:
        for entry in entries:
            if not entry.is_dir(follow_symlinks=False):
                continue
            with contextlib.suppress(OSError):
                taken.add(os.lstat(os.path.join(entry.path, marker)).st_uid)
    # The last uid of the range is the jailed Firecrackers' (services/core.py).
    uid = next((u for u in range(base, base + UID_COUNT - 1) if u not in taken), None)
    if uid is None:
        raise OSError(errno.EUSERS, f"all {UID_COUNT} VM uids from {base} are in use")
    return uid


def allocate_dir(vms_dir: Path, state_dir: Path, base: int) -> int:
    """Make ``state_dir`` owned by a uid of the range no other state dir in ``vms_dir`` has,
    and return that uid. Raises FileExistsError if the dir exists."""
    with _uids_locked(vms_dir):
        uid = _free_uid(vms_dir, base, "")
        state_dir.mkdir(mode=0o700)
        os.chown(state_dir, uid, uid)
        return uid


def allocate_marker(vms_dir: Path, state_dir: Path, base: int) -> int:
    """For a VM whose state dir stays root's (a VMM that drops to its uid only after it has
    opened its files): a ``uid`` file in it, owned by a uid of the range no other VM's
    ``uid`` file has. The owner is the record; return it."""
    with _uids_locked(vms_dir):
        uid = _free_uid(vms_dir, base, UID_MARKER)
        marker = state_dir / UID_MARKER
        os.close(os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o400))
        os.chown(marker, uid, uid)
        return uid


# -- the state dir's tmpfs -------------------------------------------------------------------

MS_NOSUID, MS_NODEV = 0x2, 0x4
MNT_DETACH = 0x2
_libc = ctypes.CDLL(None, use_errno=True)


def mount_tmpfs(path: Path, *, size_mb: int, uid: int) -> None:
    """A tmpfs of ``size_mb`` on ``path``, 0700 and owned by ``uid``."""
    opts = f"size={size_mb}m,mode=0700,uid={uid},gid={uid}".encode()
    if _libc.mount(b"tmpfs", os.fsencode(path), b"tmpfs", MS_NOSUID | MS_NODEV, opts) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"cannot mount a tmpfs on {path}: {os.strerror(err)}")


def is_mountpoint(path: Path) -> bool:
    try:
        return os.path.ismount(path)
    except OSError:
        return False


def unmount(path: Path) -> None:
    """Detach a tmpfs mounted by ``mount_tmpfs`` (its pages go with the last user)."""
    if is_mountpoint(path) and _libc.umount2(os.fsencode(path), MNT_DETACH) != 0:
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOENT):
            raise OSError(err, f"cannot unmount {path}: {os.strerror(err)}")


# -- cgroups ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Limits:
    """A VM's cgroup limits. ``cpu_weight`` is cgroup v2's (1-10000, 100 = everyone else)."""

    memory_mb: int
    pids_max: int
    cpu_weight: int


def _own_cgroups() -> dict[str, str]:
    """This process's cgroup per hierarchy: {"": v2 path, "memory": v1 path, ...}."""
    found: dict[str, str] = {}
    try:
        text = Path("/proc/self/cgroup").read_text()
    except OSError:
        return found
    for line in text.splitlines():
        _, names, path = line.split(":", 2)
        for name in names.split(",") if names else [""]:
            found[name] = path
    return found


def cgroup_layout() -> tuple[str, dict[str, Path]] | None:
    """("v2", {"": parent}) or ("v1", {controller: parent}): where VM leaves go, or None if
    this host offers neither. On v2 the parent is ``/sys/fs/cgroup/airlock`` (a sibling of
    whatever runs the controller: v2 forbids processes in a cgroup whose children have
    controllers); on v1 it is ``airlock`` under the controller's own cgroup."""
    v2_root = CGROUP_ROOT if (CGROUP_ROOT / "cgroup.controllers").exists() else None
    if v2_root is not None:
        available = (v2_root / "cgroup.controllers").read_text().split()
        if all(c in available for c in V2_CONTROLLERS):
            return "v2", {"": v2_root / CGROUP_PARENT}
    own = _own_cgroups()
    parents: dict[str, Path] = {}
    for controller in V1_CONTROLLERS:
        mount = CGROUP_ROOT / controller
        if controller not in own or not (mount / "cgroup.procs").exists():
            return None
        parents[controller] = mount / own[controller].lstrip("/") / CGROUP_PARENT
    return "v1", parents


def _write(path: Path, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _enable_v2(parent: Path) -> None:
    parent.mkdir(exist_ok=True)
    want = " ".join(f"+{c}" for c in V2_CONTROLLERS)
    for level in (parent.parent, parent):
        enabled = (level / "cgroup.subtree_control").read_text().split()
        if not all(c in enabled for c in V2_CONTROLLERS):
            _write(level / "cgroup.subtree_control", want)


def make_leaf(name: str, limits: Limits) -> list[Path]:
    """Create the VM's cgroup(s) with its limits; return their dirs (write a pid to each
    ``cgroup.procs`` to put it in). Raises OSError if the host does not allow it."""
    layout = cgroup_layout()
    if layout is None:
        raise OSError(errno.ENOTSUP, "no cgroup v2 with memory, pids and cpu, nor cgroup v1")
    kind, parents = layout
    leaves: list[Path] = []
    try:
        if kind == "v2":
            _enable_v2(parents[""])
            leaf = parents[""] / name
            leaf.mkdir()
            leaves.append(leaf)
            _write(leaf / "memory.max", str(limits.memory_mb * 2**20))
            with contextlib.suppress(FileNotFoundError):  # no swap accounting on this host
                _write(leaf / "memory.swap.max", "0")
            _write(leaf / "pids.max", str(limits.pids_max))
            _write(leaf / "cpu.weight", str(limits.cpu_weight))
        else:
            for parent in parents.values():
                parent.mkdir(exist_ok=True)
                leaf = parent / name
                leaf.mkdir()
                leaves.append(leaf)
            memory, pids, cpu = (parents[c] / name for c in V1_CONTROLLERS)
            _write(memory / "memory.limit_in_bytes", str(limits.memory_mb * 2**20))
            with contextlib.suppress(OSError):  # memsw exists only with swap accounting
                _write(memory / "memory.memsw.limit_in_bytes", str(limits.memory_mb * 2**20))
            _write(pids / "pids.max", str(limits.pids_max))
            _write(cpu / "cpu.shares", str(max(2, limits.cpu_weight * 1024 // 100)))
    except BaseException:
        remove_leaves(leaves)
        raise
    return leaves


def boost(leaves: list[Path]) -> None:
    """Top CPU weight for a VM being killed: its processes' exit is work too, and nice
    (``vmdir.set_cpu_nice``) acts only inside the VM's own cgroup."""
    for leaf in leaves:
        for name, value in (("cpu.weight", "10000"), ("cpu.shares", "262144")):
            with contextlib.suppress(OSError):
                _write(leaf / name, value)


def _procs(leaf: Path) -> list[int]:
    try:
        return [int(p) for p in (leaf / "cgroup.procs").read_text().split()]
    except (OSError, ValueError):
        return []


def remove_leaves(leaves: list[Path], timeout_s: float = 5.0) -> None:
    """Kill whatever is left in the VM's cgroups, then remove them."""
    for leaf in leaves:
        if not leaf.is_dir():
            continue
        deadline = time.monotonic() + timeout_s
        while True:
            if (leaf / "cgroup.kill").exists():
                with contextlib.suppress(OSError):
                    _write(leaf / "cgroup.kill", "1")
            for pid in _procs(leaf):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            try:
                leaf.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError as exc:
                if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                    raise
                time.sleep(0.02)


def cgroup_problem() -> str | None:
    """Why this host cannot give each VM a cgroup leaf with limits, or None if it can."""
    layout = cgroup_layout()
    if layout is None:
        return (
            "neither cgroup v2 with the memory, pids and cpu controllers nor their v1 "
            "hierarchies are mounted at /sys/fs/cgroup"
        )
    _, parents = layout
    for parent in parents.values():
        where = parent if parent.is_dir() else parent.parent
        if not os.access(where, os.W_OK):
            return (
                f"cannot create cgroups under {where}: run the controller as root, or "
                "delegate its cgroup to the controller's user (systemd: Delegate=yes)"
            )
    return None


def userns_problem(bwrap: str) -> str | None:
    """Why an unprivileged uid cannot make a user namespace here, or None if it can."""
    import subprocess

    cmd = [bwrap, "--unshare-user", "--unshare-pid", "--ro-bind", "/", "/", "true"]
    if privileged():
        cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--", *cmd]
    try:
        done = subprocess.run(cmd, capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot run {cmd[0]}: {exc}"
    if done.returncode == 0:
        return None
    return done.stderr.decode("utf-8", "replace").strip() or f"exit {done.returncode}"
