"""``airlock nodes ls|drain|activate``, run as the installed command on a data dir whose
database two controllers registered in."""

from __future__ import annotations

import asyncio

from airlock.services.core import Core
from airlock.settings import Settings
from tests.test_cli import Cli, cli  # noqa: F401  (the fixture)


def _register(on: Cli, *names: str) -> None:
    async def run() -> None:
        for name in names:
            core = Core(
                Settings(
                    _env_file=None,
                    data_dir=on.data_dir,
                    node_name=name,
                    node_internal_url=f"http://{name}.internal:4000",
                )
            )
            try:
                await core.open()
                await core.nodes.register(ready=True)
            finally:
                await core.close()

    asyncio.run(run())


def test_nodes_ls_drain_activate(cli: Cli) -> None:  # noqa: F811
    # These runs take seconds each on a loaded machine: no heartbeat runs between them.
    cli.env["AIRLOCK_NODE_LEASE_MS"] = "3600000"
    empty = cli("nodes", "ls")
    assert "no nodes have registered" in empty.stderr and empty.stdout == ""
    _register(cli, "node-a", "node-b")
    listed = {n["name"]: n for n in cli.json("nodes", "ls")}
    assert set(listed) == {"node-a", "node-b"}
    assert listed["node-b"]["state"] == "active"
    assert listed["node-b"]["internalURL"] == "http://node-b.internal:4000"
    table = cli("nodes", "ls").stdout
    assert "node-a" in table and "active" in table and "http://node-b.internal:4000" in table

    drained = cli("nodes", "drain", "node-b")
    assert "node-b: draining" in drained.stdout
    assert {n["name"]: n["state"] for n in cli.json("nodes", "ls")}["node-b"] == "draining"
    assert cli.json("nodes", "activate", "node-b")["state"] == "active"

    unknown = cli("nodes", "drain", "node-zz", ok=False)
    assert unknown.returncode == 1 and "no node 'node-zz'" in unknown.stderr
    assert {n["name"] for n in cli.json("nodes", "ls")} == {"node-a", "node-b"}
