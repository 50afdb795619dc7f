"""``airlock nodes``: the controllers of a cluster on one database.

``ls`` shows each node's state (``active``, ``draining``, or ``down`` when its heartbeat is
older than ``AIRLOCK_NODE_LEASE_MS``), what it holds and when it last answered. ``drain
NAME``: no new VMs go there, what runs there finishes normally (before an upgrade or a
removal); ``activate NAME`` undoes it. Both read and write the database directly, as the
rest of the CLI does, so they work from any host of the cluster.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from airlock.api import schemas
from airlock.cli_common import JsonOpt, err, load_settings, out, print_json, with_core
from airlock.domain.nodes import NodeState
from airlock.services.core import Core
from airlock.services.nodes import NodeView

nodes_app = typer.Typer(help="The cluster's nodes (one controller per host).", no_args_is_help=True)

NameArg = Annotated[str, typer.Argument(help="The node's name (AIRLOCK_NODE_NAME).")]


async def preflight(core: Core) -> None:
    """Nothing beyond ``Core.open()``: the migrations and the cluster key check."""


def _json(node: NodeView) -> dict[str, Any]:
    return {
        "name": node.name,
        "state": node.state.value,
        "intent": node.intent,
        "ready": node.ready,
        "internalURL": node.internal_url,
        "publicURL": node.public_url,
        "browserInUse": node.browser_in_use,
        "browserCapacity": node.browser_capacity,
        "cliInUse": node.cli_in_use,
        "cliCapacity": node.cli_capacity,
        "version": node.version,
        "startedAt": schemas.iso(node.started_at),
        "heartbeatAt": schemas.iso(node.heartbeat_at),
    }


@nodes_app.command("ls")
def nodes_ls(as_json: JsonOpt = False) -> None:
    """Every node: state, VMs held of capacity, version, last heartbeat."""

    async def action(core: Core) -> tuple[list[NodeView], Any]:
        return await core.nodes.list(), core.clock.now()

    nodes, now = with_core(load_settings(), action)
    if as_json:
        print_json([_json(n) for n in nodes])
        return
    if not nodes:
        err.print("no nodes have registered (no controller has started on this database)")
        return
    table = Table("name", "state", "browser VMs", "CLI VMs", "version", "heartbeat", "internal URL")
    for n in nodes:
        state = n.state.value + ("" if n.ready or n.state is NodeState.DOWN else " (starting)")
        age = (now - n.heartbeat_at).total_seconds()
        table.add_row(
            n.name,
            state,
            f"{n.browser_in_use}/{n.browser_capacity}",
            f"{n.cli_in_use}/{n.cli_capacity}",
            n.version,
            f"{age:.0f} s ago",
            n.internal_url,
        )
    out.print(table)


def _set(name: str, intent: NodeState, as_json: bool) -> None:
    node = with_core(load_settings(), lambda core: core.nodes.set_intent(name, intent, actor="cli"))
    if as_json:
        print_json(_json(node))
    else:
        out.print(f"node {node.name}: {node.intent} (now {node.state.value})")


@nodes_app.command("drain")
def nodes_drain(name: NameArg, as_json: JsonOpt = False) -> None:
    """No new VMs go to NAME; what runs there finishes normally."""
    _set(name, NodeState.DRAINING, as_json)


@nodes_app.command("activate")
def nodes_activate(name: NameArg, as_json: JsonOpt = False) -> None:
    """NAME takes new VMs again (after a drain)."""
    _set(name, NodeState.ACTIVE, as_json)
