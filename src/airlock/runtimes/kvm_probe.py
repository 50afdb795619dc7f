"""Whether KVM boots a stock kernel here, for the ``qemu`` runtime's ``accel="auto"``.

``/dev/kvm`` can exist and still run no stock kernel (kvm-pvm hangs one), so the probe boots
the image's kernel once under KVM and waits for its first console line; the answer is cached
in ``{cache}/kvm-probe.json`` per guest kernel and host kernel. ``doctor`` asks it too.
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

from airlock.images import Image

PROBE_TIMEOUT_S = 8.0


def kvm_openable() -> str | None:
    """None if /dev/kvm can be opened, else why not."""
    try:
        os.close(os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC))
    except OSError as exc:
        return f"/dev/kvm: {exc.strerror}"
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
