"""Guest images: what the build produced (for QEMU and for Firecracker), the cache, and the
error when a package cannot be had. The image itself is built once per machine."""

from __future__ import annotations

import gzip
import hashlib
import json
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import pytest

from airlock.images import ImageBuildError, build_image, find_image, image_key
from airlock.images import build as build_mod
from airlock.images.kernel import KernelError, extract_vmlinux
from airlock.providers import vendor
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


def test_unknown_flavors_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ImageBuildError, match="unknown flavor"):
        build_image(tmp_path, "nope")
    assert list(tmp_path.iterdir()) == []


def _fake_install(root: Path, lock: bytes, stamp: str | None = None) -> Path:
    bins = root / "node_modules" / ".bin"
    bins.mkdir(parents=True)
    for name in build_mod.VENDOR_CLIS:
        (bins / name).write_text("#!/bin/sh\n")
        (bins / name).chmod(0o755)
    (root / "package.json").write_text('{"dependencies": {}}')
    (root / "package-lock.json").write_bytes(lock)
    (root / ".airlock-lock.sha256").write_text(stamp or hashlib.sha256(lock).hexdigest())
    return root


def test_the_cli_flavor_without_a_pinned_vendor_install_says_run_setup(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    images = tmp_path / "images"
    monkeypatch.setattr(build_mod, "VENDOR_CLI_DIR", tmp_path / "absent")
    with pytest.raises(ImageBuildError, match=r"not installed in .*scripts/setup\.sh"):
        build_image(images, "cli")
    assert not images.exists()
    # npm ci interrupted (no stamp for this lockfile), or an install of another lockfile.
    half = _fake_install(tmp_path / "half", b"{}", stamp="0" * 64)
    with pytest.raises(ImageBuildError, match=r"half installed: run scripts/setup\.sh"):
        build_mod.vendor_clis(half)
    other = _fake_install(tmp_path / "other", b'{"lockfileVersion": 3}')
    with pytest.raises(ImageBuildError, match=r"not the ones .*package-lock\.json pins"):
        build_mod.vendor_clis(other)


def test_the_cli_key_follows_node_and_the_lockfile(monkeypatch: pytest.MonkeyPatch) -> None:
    host = build_mod.vendor_clis()  # make test's set-up installed them
    assert build_mod.VENDOR_CLI_DIR == vendor.VENDOR_CLI_DIR  # where the providers look
    key = image_key("cli")
    assert key != image_key("minimal")
    for change in ({"lock_sha256": "1" * 64}, {"node_sha256": "2" * 64}):
        monkeypatch.setattr(build_mod, "vendor_clis", lambda c=change: replace(host, **c))
        assert image_key("cli") != key


def test_an_unreachable_package_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(build_mod.FLAVORS, "minimal", ("python3", "airlock-no-such-package"))
    with pytest.raises(ImageBuildError) as failed:
        build_image(tmp_path, "minimal")
    assert "unreachable: airlock-no-such-package" in str(failed.value)
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".minimal-")] == []


def test_vmlinux_extraction_refuses_what_is_no_kernel() -> None:
    with pytest.raises(KernelError):
        extract_vmlinux(b"\x00" * 4096 + b"\x1f\x8b\x08" + b"garbage" * 100)
