"""Three controllers (``node-a/b/c``) as real ``airlock serve --demo`` processes on one
PostgreSQL database, each with its own data dir, ports and sandbox runtime, sharing the
cluster's one key file, started at the same instant on an empty database."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy.engine import URL

from airlock.vault import Vault
from tests.conftest import _admin, _run_in_thread
from tests.e2e.conftest import Server, free_port

NAMES = ("node-a", "node-b", "node-c")
# Short node times (the defaults are 2 s, 15 s and 5 min): a dead node is down after 2 s
# without a heartbeat and given up 4 s later.
NODE_TIMES = {"node_heartbeat_ms": 300, "node_lease_ms": 2000, "node_grace_ms": 4000}


@dataclass
class Node(Server):
    name: str = ""

    def launch(self) -> None:
        """Start the process; ``ready()`` waits for it."""
        log = self.data_dir.parent / f"{self.name}-{len(self.logs)}.log"
        self.logs.append(log)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "airlock", "serve", "--demo"],
            env=self.env,
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def ready(self, timeout: float = 60) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited: {self.all_logs()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            time.sleep(0.1)
        raise AssertionError(f"{self.name} did not get ready: {self.all_logs()[-3000:]}")

    def start(self) -> None:
        self.launch()
        self.ready()


@dataclass
class Cluster:
    nodes: dict[str, Node]
    db_url: str
    draining: set[str] = field(default_factory=set)

    def __getitem__(self, name: str) -> Node:
        return self.nodes[name]

    def only(self, *active: str) -> None:
        """Drain every node but ``active`` (and activate those), as an operator does with
        ``airlock nodes drain|activate``: placement then has no choice."""
        for name in self.nodes:
            if name in active and name in self.draining:
                self[name].cli("nodes", "activate", name)
                self.draining.discard(name)
            elif name not in active and name not in self.draining:
                self[name].cli("nodes", "drain", name)
                self.draining.add(name)

    def start_all(self) -> None:
        for node in self.nodes.values():  # at the same instant: nobody waits for anybody
            node.launch()
        for node in self.nodes.values():
            node.ready()


@pytest.fixture
def cluster_db(postgres_server_url: URL) -> Iterator[str]:
    """One empty PostgreSQL database for the whole cluster (a cluster is PostgreSQL only)."""
    server = postgres_server_url
    name = f"t_{secrets.token_hex(6)}"
    _run_in_thread(lambda: _admin(server, f'CREATE DATABASE "{name}"'))
    try:
        yield server.set(drivername="postgresql+asyncpg", database=name).render_as_string(
            hide_password=False
        )
    finally:
        _run_in_thread(lambda: _admin(server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def cluster_factory(cluster_db: str, tmp_path: Path) -> Iterator[Any]:
    made: list[Cluster] = []
    key_file = tmp_path / "cluster.key"
    Vault.open(key_file)  # the operator's one key file, copied to every host

    def make(**settings: Any) -> Cluster:
        nodes: dict[str, Node] = {}
        for i, name in enumerate(NAMES):
            data_dir = tmp_path / name / "data"
            data_dir.parent.mkdir(parents=True)
            port = free_port()
            env = {k: v for k, v in os.environ.items() if not k.startswith("AIRLOCK_")}
            values: dict[str, Any] = {
                "data_dir": data_dir,
                "database_url": cluster_db,
                "port": port,
                "demo_idp_port": free_port(),
                "node_name": name,
                "secret_key_file": key_file,
                "vm_uid_base": 1_900_000_000 + i * 100_000,
                "reconcile_interval_ms": 500,
                "log_json": "true",
                **NODE_TIMES,
                **settings,
            }
            env.update({f"AIRLOCK_{k.upper()}": str(v) for k, v in values.items()})
            nodes[name] = Node(
                env=env, data_dir=data_dir, log_path=tmp_path / f"{name}.log", port=port, name=name
            )
        cluster = Cluster(nodes, cluster_db)
        made.append(cluster)
        return cluster

    yield make
    for cluster in made:
        for node in cluster.nodes.values():
            node.stop()
        for node in cluster.nodes.values():
            runtime = node.runtime
            for vm in asyncio.run(runtime.list()):
                asyncio.run(runtime.destroy(vm.vm_id))


async def wait_json(
    client: httpx.AsyncClient, path: str, key: str, want: Any, timeout: float = 60
) -> Any:
    """GET ``path`` until its ``key`` is ``want``; the body."""
    deadline = time.monotonic() + timeout
    while True:
        body = (await client.get(path)).json()
        if body.get(key) == want:
            return body
        assert time.monotonic() < deadline, f"{path}: {key} is {body.get(key)!r}, not {want!r}"
        await asyncio.sleep(0.1)
