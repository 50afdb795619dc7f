"""Kernel-side pieces of a guest image: the uncompressed ``vmlinux`` Firecracker needs, and
the lean initramfs that makes a stock Debian kernel boot in seconds under TCG.

Debian's ``linux-image-cloud-amd64`` ships only a compressed ``vmlinuz`` (a bzImage, LZ4 on
bookworm) and builds the virtio drivers as modules. Debian's own initramfs runs udev and
scripts that take most of a 13.6 s TCG boot; ours is a busybox shell script that loads the
few virtio modules in order, mounts the root disk and switches to it.
"""

from __future__ import annotations

import gzip
import io
import lzma
import os
import re
import stat
import subprocess
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

# Packed when present and loaded after their dependencies (read from each module's
# ``.modinfo``). virtio_mmio is for Firecracker, virtio_pci for QEMU; vsock for Firecracker's
# agent channel, virtio-rng for entropy.
INITRAMFS_MODULES = (
    "kernel/drivers/virtio/virtio_ring.ko",
    "kernel/drivers/virtio/virtio.ko",
    "kernel/drivers/virtio/virtio_pci_modern_dev.ko",
    "kernel/drivers/virtio/virtio_pci_legacy_dev.ko",
    "kernel/drivers/virtio/virtio_pci.ko",
    "kernel/drivers/virtio/virtio_mmio.ko",
    "kernel/drivers/block/virtio_blk.ko",
    "kernel/drivers/char/virtio_console.ko",
    "kernel/drivers/char/hw_random/virtio-rng.ko",
    "kernel/net/vmw_vsock/vsock.ko",
    "kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko",
    "kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko",
)

# /init of the initramfs. virtio_mmio takes its devices from the kernel command line
# (Firecracker appends ``virtio_mmio.device=...``), which insmod does not read: pass them on.
INIT_SCRIPT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
root=/dev/vda
init=/sbin/airlock-init
mmio=""
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    root=*) root="${arg#root=}" ;;
    airlock.init=*) init="${arg#airlock.init=}" ;;
    virtio_mmio.device=*) mmio="$mmio device=${arg#virtio_mmio.device=}" ;;
  esac
done
while read -r mod; do
  case "$mod" in
    */virtio_mmio.ko) insmod "/lib/modules/$mod" $mmio 2>/dev/null ;;
    *) insmod "/lib/modules/$mod" 2>/dev/null ;;
  esac
done < /lib/modules/order
i=0
while [ ! -b "$root" ] && [ $i -lt 250 ]; do sleep 0.02; i=$((i+1)); done
if ! mount -t ext4 -o rw "$root" /newroot; then
  echo "airlock initramfs: cannot mount $root" > /dev/console
  exec sh
fi
mount --move /dev /newroot/dev
umount /proc /sys
exec switch_root /newroot "$init"
"""


class KernelError(Exception):
    """The kernel image is not what we can handle (no known compressed payload, ...)."""


@dataclass(frozen=True, slots=True)
class _Codec:
    name: str
    magic: bytes


# Magic numbers as in the kernel's scripts/extract-vmlinux.
_CODECS = (
    _Codec("lz4", b"\x02\x21\x4c\x18"),
    _Codec("gzip", b"\x1f\x8b\x08"),
    _Codec("xz", b"\xfd7zXZ\x00"),
    _Codec("zstd", b"\x28\xb5\x2f\xfd"),
)


def extract_vmlinux(bzimage: bytes) -> bytes:
    """The uncompressed ELF kernel inside a bzImage: try every offset where a known
    compressed stream starts until one decompresses to an ELF file."""
    for codec in _CODECS:
        start = bzimage.find(codec.magic)
        while start != -1:
            data = _decompress(codec.name, bzimage[start:])
            if data[:4] == b"\x7fELF":
                return data
            start = bzimage.find(codec.magic, start + 1)
    raise KernelError("no compressed ELF kernel found in the bzImage (lz4, gzip, xz, zstd)")


def _decompress(codec: str, data: bytes) -> bytes:
    """Decompress what it can; trailing bytes after the stream are expected (the bzImage
    continues) and are ignored, as extract-vmlinux does."""
    try:
        if codec == "gzip":
            return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data)
        if codec == "xz":
            return lzma.LZMADecompressor().decompress(data)
    except (zlib.error, lzma.LZMAError, EOFError):
        return b""
    # lz4 (the kernel's legacy frame format) and zstd: no stdlib codec; the Debian tools
    # write what they decoded before complaining about the trailing bytes.
    proc = subprocess.run(
        [codec, "-dc", "-"], input=data, capture_output=True, check=False, timeout=120
    )
    return proc.stdout


def _cpio_entry(name: str, mode: int, data: bytes = b"", ino: int = 0) -> bytes:
    """One ``newc`` cpio record (the format the kernel unpacks an initramfs from)."""
    name_b = name.encode() + b"\0"
    fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name_b), 0)
    header = b"070701" + b"".join(f"{v:08x}".encode() for v in fields)
    out = header + name_b
    out += b"\0" * (-len(out) % 4)
    out += data
    out += b"\0" * (-len(out) % 4)
    return out


def build_initramfs(busybox: Path, modules_dir: Path, dest: Path) -> list[str]:
    """Write a gzip'd cpio with busybox, ``/init`` and the virtio modules found in
    ``modules_dir`` (``/lib/modules/{version}``). Returns the modules it packed."""
    buf = io.BytesIO()
    ino = iter(range(1, 1_000_000))

    def add(name: str, mode: int, data: bytes = b"") -> None:
        buf.write(_cpio_entry(name, mode, data, next(ino)))

    for d in ("bin", "dev", "proc", "sys", "newroot", "lib", "lib/modules"):
        add(d, stat.S_IFDIR | 0o755)
    add("dev/console", stat.S_IFCHR | 0o600)  # rdev left 0: devtmpfs replaces /dev anyway
    add("bin/busybox", stat.S_IFREG | 0o755, busybox.read_bytes())
    add("init", stat.S_IFREG | 0o755, INIT_SCRIPT.encode())
    packed: list[str] = []
    dirs: set[str] = set()
    for rel in _load_order(modules_dir):
        src = modules_dir / rel
        for parent in _parents(rel):
            if parent not in dirs:
                dirs.add(parent)
                add(f"lib/modules/{parent}", stat.S_IFDIR | 0o755)
        add(f"lib/modules/{rel}", stat.S_IFREG | 0o644, src.read_bytes())
        packed.append(rel)
    add("lib/modules/order", stat.S_IFREG | 0o644, "".join(f"{m}\n" for m in packed).encode())
    buf.write(_cpio_entry("TRAILER!!!", 0))
    tmp = dest.with_suffix(".tmp")
    with open(tmp, "wb") as fh:
        fh.write(gzip.compress(buf.getvalue(), compresslevel=6, mtime=0))
    os.replace(tmp, dest)
    return packed


def _load_order(modules_dir: Path) -> list[str]:
    """The modules of ``INITRAMFS_MODULES`` that exist, each after its ``depends=``."""
    present = {Path(rel).stem: rel for rel in INITRAMFS_MODULES if (modules_dir / rel).is_file()}
    deps: dict[str, list[str]] = {}
    for name, rel in present.items():
        m = re.search(rb"depends=([^\0]*)\0", (modules_dir / rel).read_bytes())
        wanted = m.group(1).decode().split(",") if m and m.group(1) else []
        missing = [d for d in wanted if d.replace("-", "_") not in _norm(present)]
        if missing:
            raise KernelError(f"{name} needs modules not packed: {', '.join(missing)}")
        deps[name] = [d.replace("-", "_") for d in wanted]
    order: list[str] = []

    def visit(name: str) -> None:
        key = name.replace("-", "_")
        if key in (n.replace("-", "_") for n in order):
            return
        for dep in deps[_norm(present)[key]]:
            visit(dep)
        order.append(_norm(present)[key])

    for name in present:
        visit(name)
    return [present[n] for n in order]


def _norm(present: dict[str, str]) -> dict[str, str]:
    """Module names as the kernel writes them (``-`` and ``_`` are the same)."""
    return {n.replace("-", "_"): n for n in present}


def _parents(rel: str) -> Iterable[str]:
    parts = rel.split("/")[:-1]
    for i in range(1, len(parts) + 1):
        yield "/".join(parts[:i])
