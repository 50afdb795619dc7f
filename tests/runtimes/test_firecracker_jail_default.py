"""The firecracker runtime the controller builds runs each Firecracker under its jailer, as
an unprivileged uid/gid, by default (a root controller; the runtime itself is tested against
the API double in test_firecracker.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from airlock.runtimes.confine import UID_COUNT
from airlock.runtimes.firecracker import FirecrackerRuntime
from airlock.services.core import make_runtime
from airlock.settings import Settings

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="only a root controller jails")


async def test_firecracker_is_jailed_as_an_unprivileged_uid_by_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    firecracker = bin_dir / "firecracker"  # a program by that name; the jailer is absent
    firecracker.write_text("#!/bin/sh\nexit 0\n")
    firecracker.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    settings = Settings(
        _env_file=None, runtime="firecracker", data_dir=tmp_path / "data", vm_uid_base=300_000
    )
    runtime = make_runtime(settings)
    assert isinstance(runtime, FirecrackerRuntime) and runtime.jail is not None
    assert runtime.jail.exec_file == str(firecracker)
    assert runtime.jail.uid == runtime.jail.gid == 300_000 + UID_COUNT - 1
    argv = runtime.jail.argv("vm1", None)
    assert argv[argv.index("--uid") + 1] == str(300_000 + UID_COUNT - 1)
    assert any(p.startswith("jailer not found") for p in await runtime.check())
