"""Whether KVM runs a stock guest kernel here: the one KVM probe, for the ``qemu`` runtime's
``accel="auto"``, the ``firecracker`` runtime's ``check()`` and ``airlock doctor``.

``/dev/kvm`` can exist and still run no stock kernel (kvm-pvm hangs one). ``kvm_problem``
says what the host shows without booting anything; ``probe_kvm`` boots the image's kernel
once under KVM and waits for its first console line, and caches the answer in
``{cache}/kvm-probe.json`` per guest kernel and host kernel. ``host_checks`` are the qemu
runtime's rows for the doctor: its binary, and which accelerator it will use.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from airlock.images import Image, find_image
from airlock.runtimes.host_checks import HostCheck, binary

PROBE_TIMEOUT_S = 8.0
KVM = "/dev/kvm"


def kvm_openable() -> str | None:
    """None if /dev/kvm can be opened, else why not."""
    try:
        os.close(os.open(KVM, os.O_RDWR | os.O_CLOEXEC))
    except OSError as exc:
        return f"/dev/kvm: {exc.strerror}"
    return None


def pvm_only() -> bool:
    """KVM served by kvm-pvm alone (no kvm_intel or kvm_amd): only PVM guest kernels run."""
    vendor = any(os.path.isdir(f"/sys/module/{m}") for m in ("kvm_intel", "kvm_amd"))
    return os.path.isdir("/sys/module/kvm_pvm") and not vendor


def kvm_problem() -> str | None:
    """Why a stock guest kernel cannot run on this host's KVM, as far as the host tells
    without booting one, or None."""
    if not os.path.exists(KVM):
        return "/dev/kvm does not exist"
    if (why := kvm_openable()) is not None:
        return why
    if pvm_only():
        return "/dev/kvm is served by kvm-pvm, which runs only special guest kernels"
    return None


def probe_kvm(qemu: str, image: Image, cache_dir: Path) -> tuple[bool, str]:
    """Whether KVM boots this image's stock kernel: (usable, why). Cached per guest kernel
    and host kernel; the probe itself takes at most ``PROBE_TIMEOUT_S`` once."""
    if (why := kvm_openable()) is not None:
        return False, why
    key = f"{image.kernel_version}@{os.uname().release}"
    cache = cache_dir / "kvm-probe.json"
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        known = json.loads(cache.read_text())[key]
        return bool(known["usable"]), str(known["why"])
    usable, why = _boot_probe(qemu, image)
    with contextlib.suppress(OSError, ValueError):
        data: dict[str, Any] = {}
        with contextlib.suppress(OSError, ValueError):
            data = json.loads(cache.read_text())
        data[key] = {"usable": usable, "why": why, "at": datetime.now(UTC).isoformat()}
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, cache)
    return usable, why


def _boot_probe(qemu: str, image: Image) -> tuple[bool, str]:
    argv = [
        qemu,
        "-M",
        "q35",
        "-accel",
        "kvm",
        "-m",
        "256",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-serial",
        "stdio",
        "-kernel",
        str(image.vmlinuz),
        "-append",
        "console=ttyS0 panic=-1 rdinit=/bin/busybox",  # never gets far: the first line is enough
        "-no-reboot",
    ]
    started = time.monotonic()
    try:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
    except OSError as exc:
        return False, f"cannot run {qemu}: {exc}"
    assert proc.stdout is not None
    os.set_blocking(proc.stdout.fileno(), False)
    seen = b""
    try:
        while time.monotonic() - started < PROBE_TIMEOUT_S:
            with contextlib.suppress(BlockingIOError, TypeError):
                seen += proc.stdout.read() or b""
            if b"Linux version" in seen:
                took = time.monotonic() - started
                return True, f"a stock kernel printed its first line under KVM in {took:.1f} s"
            if proc.poll() is not None:
                tail = seen.decode(errors="replace").strip()[-300:]
                return False, f"QEMU with KVM exited {proc.returncode}: {tail}"
            time.sleep(0.05)
        return False, (
            f"a stock kernel printed nothing under KVM in {PROBE_TIMEOUT_S:g} s "
            "(e.g. kvm-pvm runs only special guest kernels)"
        )
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()
        proc.stdout.close()


def host_checks(image_dir: Path, accel: str) -> list[HostCheck]:
    """The qemu runtime's rows for ``airlock doctor``: QEMU itself, and KVM as the runtime
    will see it (not needed: without it qemu uses TCG)."""
    qemu = binary(
        "qemu-system-x86_64",
        ("qemu-system-x86_64",),
        "qemu-system-x86 qemu-utils",
        needed=True,
        why="the qemu runtime",
    )
    return [qemu, _kvm_check(qemu.detail if qemu.ok else None, image_dir, accel)]


def _kvm_check(qemu: str | None, image_dir: Path, accel: str) -> HostCheck:
    if not os.path.exists(KVM):
        return HostCheck(
            "kvm",
            False,
            False,
            "/dev/kvm absent: qemu would use TCG (slow); firecracker cannot run",
            "run on a host with KVM (bare metal, or nested virtualisation enabled)",
        )
    if (why := kvm_openable()) is not None:
        return HostCheck(
            "kvm",
            False,
            False,
            f"{why} (present but not openable); qemu would use TCG",
            "add this user to the kvm group (usermod -aG kvm $USER)",
        )
    image = next((i for f in ("minimal", "browser") if (i := find_image(image_dir, f))), None)
    if qemu is not None and image is not None:
        if accel == "tcg":
            return HostCheck(
                "kvm", True, False, "present; qemu will use TCG (AIRLOCK_QEMU_ACCEL=tcg)"
            )
        usable, why = probe_kvm(qemu, image, image_dir)
        if usable:
            return HostCheck(
                "kvm", True, False, f"usable for stock kernels ({why}); qemu will use KVM"
            )
        return HostCheck(
            "kvm",
            True,
            False,
            f"KVM present but unusable for stock kernels ({why}); qemu will use TCG",
        )
    if pvm_only():
        return HostCheck(
            "kvm",
            True,
            False,
            "KVM present but unusable for stock kernels (served by kvm-pvm: only specially "
            "built guest kernels run); qemu will use TCG",
        )
    return HostCheck(
        "kvm",
        True,
        False,
        "present and openable; not probed for a stock kernel yet (no guest image: "
        "airlock image build --flavor minimal)",
    )
