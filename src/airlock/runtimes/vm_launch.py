"""Run bwrap for one VM as the VM's own uid: the few steps that need root, then the drop.

Started by the sandbox runtime as ``python -I -S vm_launch.py ...`` (stdlib only, no
``airlock`` import: it is a program of its own). As root it

1. puts itself in the VM's cgroups (so bwrap and everything it forks start inside them),
2. enters a private mount namespace and bind-mounts each host path the VM sees onto a small
   tmpfs staging dir: bwrap, running as the VM's uid, could not walk to a path under a 0700
   directory (the data dir, a Python in root's home), and resolves bind sources by path,
3. drops to the VM's uid and gid (no supplementary groups, so no capability is left) with
   ``no_new_privs``, and
4. execs bwrap with its arguments, whose bind sources name the staged paths.

The staging mounts live only in this process's mount namespace: they go with the VM.
"""

from __future__ import annotations

import ctypes
import os
import sys

CLONE_NEWNS = 0x00020000
MS_BIND, MS_REC, MS_PRIVATE, MS_NOSUID, MS_NODEV = 0x1000, 0x4000, 0x40000, 0x2, 0x4
PR_SET_NO_NEW_PRIVS = 38


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def main(argv: list[str]) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    split = argv.index("--")
    opts, command = argv[:split], argv[split + 1 :]
    cgroups, stage, uid, sources = [], "", -1, []
    it = iter(opts)
    for opt in it:
        value = next(it)
        if opt == "--cgroup":
            cgroups.append(value)
        elif opt == "--stage":
            stage = value
        elif opt == "--uid":
            uid = int(value)
        elif opt in ("--dir", "--file"):
            sources.append((opt, value))
        else:
            raise SystemExit(f"vm_launch: unknown option {opt}")
    for procs in cgroups:
        with open(procs, "w") as f:
            f.write(str(os.getpid()))
    if sources:
        _check(libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
        _check(libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "make / private")
        flags = MS_NOSUID | MS_NODEV
        _check(libc.mount(b"tmpfs", stage.encode(), b"tmpfs", flags, b"mode=0755"), "stage")
        for i, (kind, src) in enumerate(sources):
            dst = os.path.join(stage, str(i))
            if kind == "--dir":
                os.mkdir(dst, 0o755)
            else:
                os.close(os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
            _check(libc.mount(src.encode(), dst.encode(), None, MS_BIND | MS_REC, None), src)
    if uid >= 0:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)  # from root to non-root: every capability goes
    _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    os.execv(command[0], command)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (OSError, ValueError, StopIteration) as exc:
        print(f"vm_launch: {exc}", file=sys.stderr, flush=True)
        sys.exit(1)
