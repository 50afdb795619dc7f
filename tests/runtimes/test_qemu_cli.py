"""The cli image booted by the ``qemu`` runtime (TCG here): the pinned vendor CLIs run in
the guest from where the providers run them, on the guest's own Node.js, and a fresh VM is
not logged in. One VM: each boot takes seconds under TCG."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from airlock.domain.vms import VmRole
from airlock.images.build import VendorClis, vendor_clis
from airlock.providers.base import RunOutcome
from airlock.providers.claude_code import ClaudeCodeProvider
from airlock.providers.codex import CodexProvider
from airlock.providers.gemini_cli import GeminiCliProvider
from airlock.runtimes.base import VmSpec
from airlock.runtimes.qemu import QemuRuntime
from tests.qemu_image import cli_image, image_dir

pytestmark = [pytest.mark.qemu, pytest.mark.timeout(900)]

CLI = {VmRole.CLI: "cli", VmRole.BROWSER: "cli"}
PINS = json.loads((Path(__file__).parents[2] / "vendor-clis" / "package.json").read_text())


@pytest.fixture
async def runtime(tmp_path: Path) -> AsyncIterator[QemuRuntime]:
    cli_image()
    rt = QemuRuntime(tmp_path / "vms", image_dir(), flavors=CLI, boot_timeout_s=120)
    yield rt
    for vm in await rt.list():
        await rt.destroy(vm.vm_id)
    assert not any((tmp_path / "vms").iterdir())


async def test_vendor_clis_run_in_the_cli_guest(runtime: QemuRuntime) -> None:
    host: VendorClis = vendor_clis()
    manifest = json.loads((cli_image().path / "manifest.json").read_text())
    assert manifest["vendor_clis"]["packages"] == PINS["dependencies"]
    assert manifest["vendor_clis"]["node"] == host.node_version

    t0 = time.monotonic()
    vm = await runtime.create(VmSpec(vm_id="c1", role=VmRole.CLI, user_id="alice"))
    print(f"cli image: boot to agent {time.monotonic() - t0:.1f} s ({vm.detail['accel']})")
    pins = PINS["dependencies"]
    expected = {
        ClaudeCodeProvider().binary: f"{pins['@anthropic-ai/claude-code']} (Claude Code)",
        CodexProvider().binary: f"codex-cli {pins['@openai/codex']}",
        GeminiCliProvider().binary: pins["@google/gemini-cli"],
    }
    async with await runtime.agent_client("c1") as agent:
        # node on PATH is the host's (>= 20: Gemini CLI), and the CLIs are on PATH too.
        which = await agent.run(
            ["sh", "-c", "node --version; for c in claude codex gemini; do command -v $c; done"],
            timeout_s=60,
        )
        assert which.exit_code == 0, which
        assert which.stdout.split() == [
            host.node_version,
            *(f"/usr/local/bin/{n}" for n in ("claude", "codex", "gemini")),
        ]
        for binary, version in expected.items():
            t = time.monotonic()
            # Gemini CLI parses its whole ~70 MB bundle first: about a minute under TCG.
            out = await agent.run([str(binary), "--version"], timeout_s=240)
            print(
                f"{binary.name} --version in the guest: {out.stdout.strip()!r} "
                f"({time.monotonic() - t:.1f} s)"
            )
            assert (out.exit_code, out.stdout.strip()) == (0, version), out
        # The provider's own offline check, on a VM nobody injected tokens into.
        check = CodexProvider().verification()
        status = await agent.run(check.argv, timeout_s=check.timeout_s)
    ok, why = check.judge(RunOutcome(status.exit_code, status.stdout, status.stderr))
    assert not ok and status.exit_code == 1 and "Not logged in" in why, why
