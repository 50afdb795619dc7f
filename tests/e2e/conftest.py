"""The e2e tier: a real ``airlock serve --demo`` process, real sandboxes, real Chromium.

``serve`` starts the controller as a subprocess with its own data dir and free ports and
waits for ``/healthz``; ``restart`` and ``kill9`` act on it; on teardown every sandbox it
left is destroyed, so no test leaks a VM.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from airlock.runtimes.sandbox import SandboxRuntime
from tests.lifecycle_helpers import wait_for_blocking

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    """One controller process and the environment it (and its CLI) runs with."""

    env: dict[str, str]
    data_dir: Path
    log_path: Path
    port: int
    proc: subprocess.Popen[bytes] | None = None
    logs: list[Path] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def runtime(self) -> SandboxRuntime:
        return SandboxRuntime(self.data_dir / "vms")

    def cli(self, *args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "airlock", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    def start(self) -> None:
        log = self.data_dir.parent / f"server-{len(self.logs)}.log"
        self.logs.append(log)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "airlock", "serve", "--demo"],
            env=self.env,
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        proc = self.proc

        def healthy() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"server exited: {log.read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                return httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200
            return False

        try:
            wait_for_blocking(healthy, timeout=30, interval=0.1)
        except AssertionError as exc:
            if "server exited" in str(exc):
                raise
            tail = log.read_text()[-3000:]
            raise AssertionError(f"server did not answer /healthz: {tail}") from None

    def kill9(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def all_logs(self) -> str:
        return "".join(p.read_text(errors="replace") for p in self.logs if p.exists())


@pytest.fixture
def server_factory(db_url: str, tmp_path: Path) -> Iterator[Any]:
    servers: list[Server] = []

    def make(**settings: Any) -> Server:
        data_dir = tmp_path / "data"
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("AIRLOCK_")}
        env.update(
            {
                "AIRLOCK_DATA_DIR": str(data_dir),
                "AIRLOCK_DATABASE_URL": db_url,
                "AIRLOCK_PORT": str(port),
                "AIRLOCK_DEMO_IDP_PORT": str(free_port()),
                "AIRLOCK_LOG_JSON": "true",
                "AIRLOCK_LOG_LEVEL": "DEBUG",
            }
        )
        env.update({f"AIRLOCK_{k.upper()}": str(v) for k, v in settings.items()})
        server = Server(env=env, data_dir=data_dir, log_path=tmp_path / "server.log", port=port)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()
    if servers:
        runtime = servers[0].runtime
        for vm in asyncio.run(runtime.list()):
            asyncio.run(runtime.destroy(vm.vm_id))
