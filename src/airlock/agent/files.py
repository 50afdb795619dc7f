"""Writing and shredding files in the guest. Standard library only."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from airlock.agent.oparg import FilePlan, OpError

CHUNK = 64 * 1024


def shred(path: Path) -> bool:
    """Overwrite a file with zeros, flush it to disk, unlink it. False if it was not there."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    except OSError as exc:  # a symlink or a directory: do not follow, just unlink if a link
        if path.is_symlink():
            path.unlink()
            return True
        raise OpError("wipe_failed", f"cannot open {path.name}: {exc.strerror}") from None
    try:
        size = os.fstat(fd).st_size
        zeros = bytes(min(size, CHUNK))
        left = size
        while left > 0:
            left -= os.write(fd, zeros[: min(left, len(zeros))])
        os.fsync(fd)
    finally:
        os.close(fd)
    path.unlink()
    return True


def _makedirs_private(path: Path) -> None:
    """Create missing parents with mode 0700 (umask would otherwise widen or narrow it)."""
    missing: list[Path] = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        with contextlib.suppress(FileExistsError):
            d.mkdir(mode=0o700)
        os.chmod(d, 0o700)


def write_atomic(path: Path, content: bytes, mode: int) -> None:
    """Temp file in the same directory, fsync, rename, fsync the directory."""
    _makedirs_private(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        view = memoryview(content)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def write_planned(plan: FilePlan) -> list[str]:
    """Write a checked ``oparg.file_plan``, each file atomically; the paths written."""
    written: list[str] = []
    for path, target, content, mode in plan:
        try:
            write_atomic(target, content, mode)
        except OSError as exc:
            raise OpError("write_failed", f"cannot write {path}: {exc.strerror}") from None
        written.append(path)
    return written
