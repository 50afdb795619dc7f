"""Boot time of the qemu runtime's minimal image: ``create()`` until the guest agent answers
a ping (``create`` returns only then), one VM at a time, each destroyed before the next.
Then one browser VM on the browser image (Xvnc + Chromium), if that image is built (it is
never built here: over a GiB): ``create()`` until Xvnc speaks RFB (``create`` waits for it),
and until the agent's ping says Chromium is up.

The accelerator is whatever the runtime chooses here (its cached KVM probe): on build
machines where KVM runs no stock kernel, TCG. The image is built first if missing (not
timed). Also prints the destroy time (QMP quit, kill, files removed).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from airlock.domain.vms import VmRole
from airlock.errors import RuntimeFailure
from airlock.images import build_image, find_image
from airlock.logs import setup_logging
from airlock.runtimes.base import VmSpec
from airlock.runtimes.qemu import QemuRuntime
from airlock.settings import Settings
from bench.lifecycle import pct


async def run(boots: int, vms_dir: Path, image_dir: Path) -> dict[str, object]:
    runtime = QemuRuntime(
        vms_dir, image_dir, flavors={VmRole.CLI: "minimal", VmRole.BROWSER: "minimal"}
    )
    boot: list[float] = []
    destroy: list[float] = []
    accel = ""
    try:
        for i in range(boots):
            t0 = time.monotonic()
            vm = await runtime.create(VmSpec(vm_id=f"bench-{i}", role=VmRole.CLI, user_id="b"))
            boot.append(time.monotonic() - t0)
            accel = vm.detail["accel"]
            async with await runtime.agent_client(vm.vm_id) as agent:
                await agent.ping()
            t0 = time.monotonic()
            await runtime.destroy(vm.vm_id)
            destroy.append(time.monotonic() - t0)
    finally:
        for left in await runtime.list():
            await runtime.destroy(left.vm_id)
    return {"accel": accel, "boot": boot, "destroy": destroy}


BROWSER_TIMEOUT_S = 300.0  # TCG: Chromium takes tens of seconds to start


async def browser_boot(vms_dir: Path, image_dir: Path) -> tuple[float, float]:
    """(create -> VNC banner, create -> Chromium on its start page) of one browser VM, in
    seconds. The second is when the agent's ping says Chromium is up (``browser``)."""
    runtime = QemuRuntime(
        vms_dir,
        image_dir,
        flavors={VmRole.CLI: "minimal", VmRole.BROWSER: "browser"},
        boot_timeout_s=BROWSER_TIMEOUT_S,
    )
    t0 = time.monotonic()
    try:
        vm = await runtime.create(VmSpec(vm_id="bench-browser", role=VmRole.BROWSER, user_id="b"))
        vnc = time.monotonic() - t0
        last: Exception | None = None
        while time.monotonic() - t0 < BROWSER_TIMEOUT_S:
            try:
                async with await runtime.agent_client(vm.vm_id) as agent:
                    if (await agent.ping()).get("browser"):
                        return vnc, time.monotonic() - t0
            except (RuntimeFailure, OSError, TimeoutError, ValueError, EOFError) as exc:
                last = exc
            await asyncio.sleep(0.5)
        raise RuntimeError(f"no start page in {BROWSER_TIMEOUT_S:g} s: {last!r}")
    finally:
        for left in await runtime.list():
            await runtime.destroy(left.vm_id)


def main(boots: int = 5) -> None:
    setup_logging("WARNING")
    image_dir = Settings(_env_file=None).image_dir
    build_image(image_dir, "minimal")
    with tempfile.TemporaryDirectory(prefix="airlock-bench-qemu-") as tmp:
        r = asyncio.run(run(boots, Path(tmp) / "vms", image_dir))
    boot = r["boot"]
    destroy = r["destroy"]
    assert isinstance(boot, list) and isinstance(destroy, list)
    print(f"\nqemu runtime, minimal image, {boots} boots one after another ({r['accel']})")
    print(
        f"  create -> agent ping  median {statistics.median(boot):.1f} s"
        f"  p95 {pct(boot, 95):.1f} s  (min {min(boot):.1f} s, max {max(boot):.1f} s)"
    )
    print(f"  destroy (QMP quit, kill, clean)  median {statistics.median(destroy) * 1000:.0f} ms")
    if find_image(image_dir, "browser") is None:
        print(
            "\nqemu runtime, browser image: skipped, not built "
            "(`airlock image build --flavor browser`, about 1.5 min and 1.2 GB)"
        )
        return
    with tempfile.TemporaryDirectory(prefix="airlock-bench-qemu-") as tmp:
        vnc, started = asyncio.run(browser_boot(Path(tmp) / "vms", image_dir))
    print(f"\nqemu runtime, browser image, one browser VM ({r['accel']})")
    print(f"  create -> agent ping and VNC banner  {vnc:.1f} s")
    print(f"  create -> Chromium up (the agent's ping)  {started:.1f} s")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--boots", type=int, default=5)
    main(parser.parse_args().boots)
