"""Tries to get out of the VM it runs in; prints one JSON line per attempt.

Shipped into a browser VM by ``test_escape.py`` and run there through the agent's ``run`` op,
as the VM runs anything: stdlib only. Each attempt says what it tried, what it got, and
whether that was an escape (the test fails on any). ``--only other-vm`` is run on the host
as one VM's uid against another VM's state dir.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import json
import os
import signal
import socket
import time
from collections.abc import Callable

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
MIB = 2**20


def _errno_name(err: int) -> str:
    return errno.errorcode.get(err, str(err))


def _syscall(nr: int, *args: int) -> tuple[int, int]:
    ctypes.set_errno(0)
    ret = libc.syscall(ctypes.c_long(nr), *(ctypes.c_long(a) for a in args))
    return ret, ctypes.get_errno()


def proc_sys(_: argparse.Namespace) -> tuple[str, bool]:
    results = []
    escaped = False
    for path, value in (("kernel/printk", "1 4 1 7"), ("kernel/core_pattern", "|/tmp/x %p")):
        try:
            with open(f"/proc/sys/{path}", "w") as f:
                f.write(value)
            results.append(f"{path}: written")
            escaped = True
        except OSError as exc:
            results.append(f"{path}: {_errno_name(exc.errno or 0)}")
    return "; ".join(results), escaped


def mount(_: argparse.Namespace) -> tuple[str, bool]:
    got = []
    ctypes.set_errno(0)
    ret = libc.mount(b"none", b"/tmp", b"tmpfs", 0, None)
    got.append(f"mount(tmpfs): {ret} {_errno_name(ctypes.get_errno())}")
    ret, err = _syscall(430, 0, 0)  # fsopen("tmpfs", 0) with a NULL name: any answer but EPERM
    got.append(f"fsopen: {ret} {_errno_name(err)}")
    return "; ".join(got), "mount(tmpfs): 0 " in got[0] or (ret >= 0)


def unshare(_: argparse.Namespace) -> tuple[str, bool]:
    got, escaped = [], False
    for name, flag in (("user", 0x10000000), ("mount", 0x00020000), ("net", 0x40000000)):
        ctypes.set_errno(0)
        ret = libc.unshare(flag)
        got.append(f"{name}: {ret} {_errno_name(ctypes.get_errno())}")
        escaped |= ret == 0
    # clone() with CLONE_NEWUSER, as a raw syscall (glibc's unshare is not the only door).
    ret, err = _syscall(56, 0x10000000 | signal.SIGCHLD, 0, 0, 0, 0)
    if ret == 0:
        os._exit(0)
    got.append(f"clone(NEWUSER): {ret} {_errno_name(err)}")
    escaped |= ret > 0
    return "; ".join(got), escaped


def ptrace(args: argparse.Namespace) -> tuple[str, bool]:
    got, escaped = [], False
    for pid in (1, args.host_pid):  # the VM's init, and the controller's pid on the host
        ret, err = _syscall(101, 16, pid, 0, 0)  # PTRACE_ATTACH
        got.append(f"attach {pid}: {ret} {_errno_name(err)}")
        escaped |= ret == 0
    ret, err = _syscall(310, args.host_pid, 0, 0, 0, 0, 0)  # process_vm_readv
    got.append(f"process_vm_readv: {ret} {_errno_name(err)}")
    return "; ".join(got), escaped or ret >= 0


def kernel_module(_: argparse.Namespace) -> tuple[str, bool]:
    got, escaped = [], False
    fd = os.open("/dev/null", os.O_RDONLY)
    for name, nr, a in (("finit_module", 313, (fd, 0, 0)), ("init_module", 175, (0, 0, 0))):
        ret, err = _syscall(nr, *a)
        got.append(f"{name}: {ret} {_errno_name(err)}")
        escaped |= ret == 0
    os.close(fd)
    for name, nr in (("bpf", 321), ("perf_event_open", 298), ("kexec_load", 246)):
        ret, err = _syscall(nr, 0, 0, 0, 0, 0)
        got.append(f"{name}: {ret} {_errno_name(err)}")
        escaped |= err not in (errno.EPERM, errno.ENOSYS)
    return "; ".join(got), escaped


def raw_socket(_: argparse.Namespace) -> tuple[str, bool]:
    got, escaped = [], False
    for name, fam, typ, proto in (
        ("AF_INET SOCK_RAW", socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP),
        ("AF_PACKET", socket.AF_PACKET, socket.SOCK_RAW, 0x0300),
    ):
        try:
            socket.socket(fam, typ, proto).close()
            got.append(f"{name}: opened")
            escaped = True
        except OSError as exc:
            got.append(f"{name}: {_errno_name(exc.errno or 0)}")
    return "; ".join(got), escaped


def root_file(args: argparse.Namespace) -> tuple[str, bool]:
    got, escaped = [], False
    for path in ("/etc/shadow", args.root_file):
        try:
            with open(path, "rb") as f:
                data = f.read()
            got.append(f"{path}: read {len(data)} bytes")
            escaped |= bool(data)
        except OSError as exc:
            got.append(f"{path}: {_errno_name(exc.errno or 0)}")
    return "; ".join(got), escaped


def network(args: argparse.Namespace) -> tuple[str, bool]:
    got, escaped = [], False
    for host in [*args.addresses, "1.1.1.1", "8.8.8.8"]:
        try:
            with socket.create_connection((host, 80), timeout=2):
                got.append(f"{host}:80 connected")
                escaped = True
        except OSError as exc:
            got.append(f"{host}:80 {_errno_name(exc.errno or 0) if exc.errno else exc}")
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(b"x", ("8.8.8.8", 53))
            got.append("udp 8.8.8.8:53 sent")
            escaped = True
    except OSError as exc:
        got.append(f"udp 8.8.8.8:53 {_errno_name(exc.errno or 0)}")
    return "; ".join(got), escaped


def fork_bomb(args: argparse.Namespace) -> tuple[str, bool]:
    children: list[int] = []
    error = "none"
    try:
        for _ in range(args.pids_max * 2):
            pid = os.fork()
            if pid == 0:
                signal.pause()
                os._exit(0)
            children.append(pid)
    except OSError as exc:
        error = _errno_name(exc.errno or 0)
    finally:
        for pid in children:
            os.kill(pid, signal.SIGKILL)
        for pid in children:
            os.waitpid(pid, 0)
    got = f"{len(children)} forks, then {error} (pids.max {args.pids_max})"
    return got, len(children) >= args.pids_max


def memory_hog(args: argparse.Namespace) -> tuple[str, bool]:
    target = 2 * args.memory_mb
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        # The OOM killer's first choice, so it is this hog it kills and not Chromium (the
        # point is where the kill happens: inside the VM's cgroup, nothing outside it).
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")
        hoard = []
        for _ in range(target // 64):
            hoard.append(bytearray(64 * MIB))  # zeroed: every page touched
            os.write(write_fd, b".")
        os._exit(0)
    os.close(write_fd)
    _, status = os.waitpid(pid, 0)
    with os.fdopen(read_fd, "rb") as f:
        reached = len(f.read()) * 64
    if os.WIFSIGNALED(status):
        how = f"killed by signal {os.WTERMSIG(status)} at ~{reached} MiB"
    else:
        how = f"exited {os.WEXITSTATUS(status)} at {reached} MiB"
    got = f"{how} (limit {args.memory_mb} MiB, tried {target} MiB)"
    return got, not os.WIFSIGNALED(status) or reached > args.memory_mb


def fill_disk(args: argparse.Namespace) -> tuple[str, bool]:
    got, escaped = [], False
    chunk = b"\0" * MIB
    for where in ("/tmp", os.path.expanduser("~"), "/run/airlock", "/dev/shm"):
        path = os.path.join(where, f".fill-{os.getpid()}")
        written, error = 0, "none"
        try:
            with open(path, "wb") as f:
                while written < 4 * args.disk_mb:
                    f.write(chunk)
                    f.flush()
                    written += 1
        except OSError as exc:
            error = _errno_name(exc.errno or 0)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(path)
        got.append(f"{where}: {written} MiB, then {error}")
        escaped |= written > args.disk_mb or error == "none"
    return "; ".join(got), escaped


def other_vm(args: argparse.Namespace) -> tuple[str, bool]:
    got, escaped = [], False
    target = args.other_vm
    for what, fn in (
        ("list", lambda: os.listdir(target)),
        ("read agent.secret", lambda: _read(os.path.join(target, "agent.secret"))),
        ("connect agent.sock", lambda: _connect(os.path.join(target, "agent.sock"))),
    ):
        try:
            fn()
            got.append(f"{what}: done")
            escaped = True
        except OSError as exc:
            got.append(f"{what}: {_errno_name(exc.errno or 0)}")
    return "; ".join(got), escaped


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _connect(path: str) -> None:
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(path)


def identity(_: argparse.Namespace) -> tuple[str, bool]:
    lines = _read("/proc/self/status").splitlines()
    status = dict(line.split(":\t", 1) for line in lines if ":\t" in line)
    got = (
        f"uid {os.getuid()}, CapEff {status['CapEff'].strip()}, CapBnd {status['CapBnd'].strip()}, "
        f"NoNewPrivs {status['NoNewPrivs'].strip()}, Seccomp {status['Seccomp'].strip()}"
    )
    escaped = (
        os.getuid() == 0
        or int(status["CapEff"], 16) != 0
        or status["NoNewPrivs"].strip() != "1"
        or status["Seccomp"].strip() != "2"
    )
    return got, escaped


PROBES: dict[str, tuple[str, Callable[[argparse.Namespace], tuple[str, bool]]]] = {
    "identity": ("who the VM is: uid, capabilities, no_new_privs, seccomp", identity),
    "proc-sys": ("write /proc/sys/kernel/printk and core_pattern", proc_sys),
    "mount": ("mount a tmpfs, fsopen", mount),
    "unshare": ("unshare user/mount/net namespaces, clone(CLONE_NEWUSER)", unshare),
    "ptrace": ("ptrace the VM's init and a host process, process_vm_readv", ptrace),
    "kernel-module": ("finit_module, init_module, bpf, perf_event_open, kexec_load", kernel_module),
    "raw-socket": ("open a raw IP socket and an AF_PACKET socket", raw_socket),
    "root-file": ("read /etc/shadow and a 0600 root file bound into the VM", root_file),
    "network": ("reach a non-loopback address (TCP, UDP)", network),
    "fork-bomb": ("fork until refused", fork_bomb),
    "memory-hog": ("allocate twice the memory limit", memory_hog),
    "fill-disk": ("write /tmp, home, the state dir, /dev/shm until refused", fill_disk),
    "other-vm": ("list, read, connect to another VM's state dir", other_vm),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", action="append", choices=sorted(PROBES))
    parser.add_argument("--host-pid", type=int, default=1)
    parser.add_argument("--root-file", default="/nonexistent")
    parser.add_argument("--address", dest="addresses", action="append", default=[])
    parser.add_argument("--pids-max", type=int, default=1024)
    parser.add_argument("--memory-mb", type=int, default=2048)
    parser.add_argument("--disk-mb", type=int, default=1024)
    parser.add_argument("--other-vm", default="/nonexistent")
    args = parser.parse_args()
    for name in args.only or [p for p in PROBES if p != "other-vm"]:
        tried, probe = PROBES[name]
        started = time.monotonic()
        try:
            got, escaped = probe(args)
        except Exception as exc:  # a probe that breaks is reported, not an escape
            got, escaped = f"probe failed: {type(exc).__name__}: {exc}", False
        ms = round((time.monotonic() - started) * 1000)
        line = {"probe": name, "tried": tried, "got": got, "escaped": escaped, "ms": ms}
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
