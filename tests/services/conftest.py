"""A real controller core (real database, real sandbox runtime) per test, with short
lifecycle durations, and a guarantee that no sandbox outlives the test."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from airlock.clock import Clock
from airlock.runtimes.sandbox import SandboxRuntime
from airlock.services.core import Core
from airlock.settings import Settings
from tests.lifecycle_helpers import loops_asleep

CoreFactory = Callable[..., Awaitable[Core]]

FAST = {
    "grace_success_ms": 1500,
    "grace_failure_ms": 800,
    "max_drain_ms": 4000,
    "login_timeout_ms": 60_000,
    "idle_extension_ms": 2000,
    "reconcile_interval_ms": 500,
}


@pytest.fixture
async def make_core(db_url: str, tmp_path: Path) -> AsyncIterator[CoreFactory]:
    """``await make_core(**settings)``; ``node="b"`` makes a second host's controller (its
    own data dir and node name) on the same database, with the cluster's one key file
    (a controller with another one refuses to start: ``services.nodes``);
    ``clock=ManualClock()`` makes one whose deadlines and periods move only when the test
    advances that clock."""
    cores: list[Core] = []
    data_dirs: set[Path] = set()

    async def factory(
        *, start: bool = True, node: str = "a", clock: Clock | None = None, **overrides: Any
    ) -> Core:
        values = {"demo_idp_port": 4999, **FAST, **overrides}
        data_dir = tmp_path / f"data-{node}"
        data_dirs.add(data_dir)
        settings = Settings(
            _env_file=None,
            data_dir=data_dir,
            database_url=db_url,
            node_name=f"node-{node}",
            secret_key_file=tmp_path / "cluster.key",
            **values,
        )
        core = Core(settings, demo=True, clock=clock)
        cores.append(core)
        if start:
            await core.start()
            await loops_asleep(core.clock)
        else:
            await core.open()
        return core

    yield factory
    for core in cores:
        await core.close()
    for data_dir in data_dirs:
        leftover = SandboxRuntime(data_dir / "vms")
        for vm in await leftover.list():
            await leftover.destroy(vm.vm_id)
        assert [vm.vm_id for vm in await leftover.list()] == []
