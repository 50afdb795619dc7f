"""Guest images: what the build produced (for QEMU and for Firecracker), the cache, and the
error when a package cannot be had. The image itself is built once per machine."""

from __future__ import annotations

import gzip
import json
import subprocess
import time
from pathlib import Path

import pytest

from airlock.images import ImageBuildError, build_image, find_image, image_key
from airlock.images import build as build_mod
from airlock.images.kernel import KernelError, extract_vmlinux
from tests.qemu_image import image_dir, minimal_image

# A test may build the image first (make test builds it before pytest; plain pytest may not).
pytestmark = [pytest.mark.qemu, pytest.mark.timeout(900)]


def _cpio_names(data: bytes) -> list[str]:
    names, pos = [], 0
    while True:
        header = data[pos : pos + 110]
        assert header[:6] == b"070701"
        size, namesize = int(header[54:62], 16), int(header[94:102], 16)
        name = data[pos + 110 : pos + 110 + namesize - 1].decode()
        if name == "TRAILER!!!":
            return names
        names.append(name)
        pos += 110 + namesize
        pos += -pos % 4
        pos += size + (-size % 4)


def test_minimal_image_has_everything_both_runtimes_boot() -> None:
    image = minimal_image()
    manifest = json.loads((image.path / "manifest.json").read_text())
    assert manifest["flavor"] == "minimal" and manifest["key"] == image_key("minimal")
    assert image.path.name == f"minimal-{image.key}"
    # Firecracker's kernel: an uncompressed x86-64 ELF, the same kernel as the bzImage.
    head = image.vmlinux.read_bytes()[:20]
    assert head[:4] == b"\x7fELF" and head[4] == 2  # ELFCLASS64
    assert image.vmlinuz.read_bytes()[0x202:0x206] == b"HdrS"  # a bzImage
    # The lean initramfs: busybox, /init, the virtio modules, virtio_ring before virtio.
    names = _cpio_names(gzip.decompress(image.initrd.read_bytes()))
    assert {"init", "bin/busybox", "lib/modules/order"} <= set(names)
    modules = manifest["initramfs_modules"]
    assert all(f"lib/modules/{m}" in names for m in modules)
    stems = [Path(m).stem for m in modules]
    assert {"virtio_blk", "virtio_pci", "virtio_console", "virtio_mmio"} <= set(stems)
    assert stems.index("virtio_ring") < stems.index("virtio") < stems.index("virtio_blk")
    assert image.initrd.stat().st_size < 4 * 2**20
    # The root filesystem: ext4 with the agent, its init, and no kernel inside.
    out = subprocess.run(
        ["debugfs", "-R", "ls -p /opt/airlock/airlock/agent", str(image.rootfs)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "server.py" in out and "guest.py" in out and "mux.py" in out
    assert "root=/dev/vda" in image.cmdline and "console=ttyS0" in image.cmdline


def test_a_cached_image_is_reused_in_an_instant() -> None:
    image = minimal_image()
    t0 = time.monotonic()
    again = build_image(image_dir(), "minimal")
    assert again.path == image.path and time.monotonic() - t0 < 2
    assert find_image(image_dir(), "minimal") == image


def test_unknown_and_unbuilt_flavors_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ImageBuildError, match="unknown flavor"):
        build_image(tmp_path, "nope")
    with pytest.raises(ImageBuildError, match="not built yet"):
        build_image(tmp_path, "cli")
    assert list(tmp_path.iterdir()) == []


def test_an_unreachable_package_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(build_mod.FLAVORS, "minimal", ("python3", "airlock-no-such-package"))
    with pytest.raises(ImageBuildError) as failed:
        build_image(tmp_path, "minimal")
    assert "unreachable: airlock-no-such-package" in str(failed.value)
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".minimal-")] == []


def test_vmlinux_extraction_refuses_what_is_no_kernel() -> None:
    with pytest.raises(KernelError):
        extract_vmlinux(b"\x00" * 4096 + b"\x1f\x8b\x08" + b"garbage" * 100)
