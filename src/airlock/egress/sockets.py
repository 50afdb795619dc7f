"""The egress proxy's listening socket: a Unix socket made private before anyone can
connect, bound even where the path is longer than ``sun_path``, and removed only while it
is still ours."""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import stat
from pathlib import Path


def unlink_if(path: Path, inode: tuple[int, int]) -> None:
    """Remove the socket file if it is still ours (not a successor's at the same path)."""
    with contextlib.suppress(FileNotFoundError):
        st = path.lstat()
        if (st.st_dev, st.st_ino) == inode:
            path.unlink()


def _bind_long(sock: socket.socket, path: Path) -> None:
    """Bind even when ``path`` is longer than sun_path allows (deep data dirs), by naming
    it through ``/proc/self/fd`` of its directory."""
    if len(os.fsencode(path)) < 100:
        sock.bind(os.fspath(path))
        return
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        sock.bind(f"/proc/self/fd/{fd}/{path.name}")
    finally:
        os.close(fd)


def bind_unix(path: Path) -> tuple[socket.socket, tuple[int, int]]:
    """A listening-ready Unix socket at ``path`` with mode 0600 from the first instant: bound
    under a temporary name, chmod-ed (and given to the owner of its directory), then renamed
    into place."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise FileExistsError(f"{path} exists and is not a socket")
        path.unlink()  # a stale socket from an earlier controller
    tmp = path.with_name(f".{secrets.token_hex(4)}")  # short: AF_UNIX paths max 107 bytes
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        _bind_long(sock, tmp)
        os.chmod(tmp, 0o600)
        owner = path.parent.stat()
        if os.geteuid() == 0 and owner.st_uid != 0:
            # A VM's state dir belongs to the VM's own uid: so does its egress socket.
            os.chown(tmp, owner.st_uid, owner.st_gid)
        os.rename(tmp, path)
        st = path.lstat()
    except BaseException:
        sock.close()
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    sock.setblocking(False)
    return sock, (st.st_dev, st.st_ino)
