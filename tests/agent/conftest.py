"""A real guest agent in a minimal bubblewrap harness (not the sandbox runtime): its own pid
and network namespace, so its ports (3128, 9222) and /tmp never touch the host's."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

import airlock
from airlock.agent.client import AgentClient
from airlock.agent.protocol import MAX_MESSAGE
from tests.lifecycle_helpers import wait_for

BWRAP = shutil.which("bwrap")
XVNC = shutil.which("Xvnc")
CHROMIUM = "/usr/lib/chromium/chromium" if os.path.exists("/usr/lib/chromium/chromium") else None
HOME = "/tmp/home"
PACKAGE_ROOT = str(Path(airlock.__file__).resolve().parent.parent)


@dataclass
class AgentHarness:
    state_dir: Path
    secret: str
    proc: asyncio.subprocess.Process
    log: Path

    async def open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_unix_connection(
            str(self.state_dir / "agent.sock"), limit=MAX_MESSAGE + 1
        )

    async def client(self) -> AgentClient:
        reader, writer = await self.open()
        return await AgentClient.connect(reader, writer, self.secret, timeout_s=20)


StartAgent = Callable[..., Awaitable[AgentHarness]]


@pytest.fixture
async def start_agent(tmp_path: Path) -> AsyncIterator[StartAgent]:
    if BWRAP is None:
        pytest.skip("bwrap is not installed")
    started: list[AgentHarness] = []

    async def start(
        role: str = "cli", *extra: str, lease: dict[str, object] | str | None = None
    ) -> AgentHarness:
        state_dir = tmp_path / f"st{len(started)}"
        state_dir.mkdir(mode=0o700)
        secret = secrets.token_urlsafe(32)
        (state_dir / "agent.secret").write_text(secret + "\n")
        if lease is not None:  # the boot lease, as a runtime writes it
            (state_dir / "agent.lease").write_text(
                lease if isinstance(lease, str) else json.dumps(lease)
            )
        log = tmp_path / f"agent{len(started)}.log"
        argv = [
            BWRAP,
            "--unshare-pid",
            "--unshare-net",
            "--die-with-parent",  # a test harness, unlike a runtime's VM, dies with the test
            "--ro-bind",
            "/",
            "/",
            "--dev",
            "/dev",
            "--proc",
            "/proc",
            "--tmpfs",
            "/tmp",
            # Python and the checkout again, on top of the fresh /tmp (a CI clone may be there)
            "--ro-bind",
            sys.prefix,
            sys.prefix,
            "--ro-bind",
            str(PACKAGE_ROOT),
            str(PACKAGE_ROOT),
            "--tmpfs",
            "/run",
            "--bind",
            str(state_dir),
            "/run/airlock",
            "--dir",
            HOME,
            "--setenv",
            "HOME",
            HOME,
            "--setenv",
            "PYTHONPATH",
            PACKAGE_ROOT,
            sys.executable,
            "-m",
            "airlock.agent.server",
            "--state-dir",
            "/run/airlock",
            "--role",
            role,
            "--xvnc",
            XVNC or "Xvnc",
            "--chromium",
            CHROMIUM or "chromium",
            *extra,
        ]
        out = os.open(log, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out
            )
        finally:
            os.close(out)
        harness = AgentHarness(state_dir, secret, proc, log)
        started.append(harness)

        async def listening() -> bool:
            with contextlib.suppress(OSError):
                _, writer = await harness.open()
                writer.close()
                return True
            if proc.returncode is not None:
                raise AssertionError(f"agent exited:\n{log.read_text()}")
            return False

        try:
            await wait_for(listening, timeout=10, interval=0.01)
        except AssertionError as exc:
            raise AssertionError(f"agent did not start ({exc}):\n{log.read_text()}") from None
        return harness

    yield start
    for harness in started:
        if harness.proc.returncode is None:
            harness.proc.kill()
        await harness.proc.wait()
