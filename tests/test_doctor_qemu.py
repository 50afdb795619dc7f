"""``airlock doctor`` for the qemu runtime, as the real console script: what the KVM probe
found (on kvm-pvm build machines: present but unusable for stock kernels, so TCG)."""

from __future__ import annotations

import json
import shutil

import pytest

from airlock.runtimes.qemu import kvm_openable, probe_kvm
from tests.qemu_image import image_dir, minimal_image
from tests.test_cli import Cli, cli

__all__ = ["cli"]  # the fixture, imported so pytest finds it here

# A test may build the image first (make test builds it before pytest; plain pytest may not).
pytestmark = [pytest.mark.qemu, pytest.mark.timeout(900)]


def test_doctor_says_which_accelerator_qemu_will_use(cli: Cli) -> None:
    image = minimal_image()
    cli.env["AIRLOCK_RUNTIME"] = "qemu"
    cli.env["AIRLOCK_IMAGE_DIR"] = str(image_dir())
    report = json.loads(cli("doctor", "--json", ok=False).stdout)
    checks = {c["name"]: c for c in report["checks"]}
    kvm = checks["kvm"]["detail"]
    if kvm_openable() is not None:
        assert "qemu would use TCG" in kvm
    else:
        qemu = shutil.which("qemu-system-x86_64")
        assert qemu is not None
        usable, why = probe_kvm(qemu, image, image_dir())
        if usable:
            assert "qemu will use KVM" in kvm
        else:
            assert "KVM present but unusable for stock kernels" in kvm
            assert "qemu will use TCG" in kvm and why in kvm
    # The minimal image is there; the browser image may not be (the tests do not build it).
    runtime = checks["runtime qemu"]
    assert runtime["ok"] or "--flavor minimal" not in runtime["detail"], runtime
