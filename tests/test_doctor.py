"""``airlock doctor`` asks the runtimes: every runtime's rows are shown, required only for
the configured one, and a row several runtimes check (``kvm``) as the configured one sees it.
Run as the real console script (``tests.test_cli.Cli``)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from airlock.runtimes.kvm_probe import kvm_problem
from tests.test_cli import Cli, cli

__all__ = ["cli"]  # the fixture, imported so pytest finds it here

SANDBOX_ROWS = {"bwrap", "Xvnc", "chromium", "controller uid", "user namespaces", "seccomp"}


def _checks(cli: Cli, runtime: str) -> dict[str, dict[str, Any]]:
    cli.env["AIRLOCK_RUNTIME"] = runtime
    report = json.loads(cli("doctor", "--json", ok=False).stdout)
    assert report["runtime"] == runtime
    return {c["name"]: c for c in report["checks"]}


@pytest.mark.parametrize("runtime", ["sandbox", "qemu", "firecracker"])
def test_every_runtime_is_asked_and_only_the_configured_one_is_required(
    cli: Cli, runtime: str
) -> None:
    checks = _checks(cli, runtime)
    assert {*SANDBOX_ROWS, "pasta", "qemu-system-x86_64", "firecracker", "kvm"} <= set(checks)
    for name in SANDBOX_ROWS:
        assert checks[name]["required"] is (runtime == "sandbox"), checks[name]
    assert checks["qemu-system-x86_64"]["required"] is (runtime == "qemu")
    assert checks["firecracker"]["required"] is (runtime == "firecracker")
    assert checks["pasta"]["required"] is False  # no runtime needs it
    assert checks[f"runtime {runtime}"]["required"] is True


def test_kvm_is_shown_once_as_the_configured_runtime_sees_it(cli: Cli) -> None:
    qemu = _checks(cli, "qemu")["kvm"]
    assert qemu["required"] is False  # qemu falls back to TCG
    assert "qemu" in qemu["detail"]
    firecracker = _checks(cli, "firecracker")["kvm"]
    assert firecracker["required"] is True  # Firecracker has no fallback
    problem = kvm_problem()
    assert firecracker["ok"] is (problem is None)
    if problem is not None:
        assert problem in firecracker["detail"] and firecracker["fix"]
