"""``GET /api/nodes``: the controllers of this cluster, for operators' tools (service tokens
only: a node list says where every user's VMs run). ``airlock nodes`` reads the same."""

from __future__ import annotations

from fastapi import APIRouter

from airlock.api import schemas
from airlock.api.deps import CoreDep, PrincipalDep
from airlock.errors import Forbidden
from airlock.services.nodes import NodeView

router = APIRouter(prefix="/api/nodes", tags=["nodes"])


class NodeOut(schemas._Out):
    name: str
    state: str
    intent: str
    ready: bool
    internalURL: str
    publicURL: str
    browserCapacity: int
    cliCapacity: int
    browserInUse: int
    cliInUse: int
    version: str
    startedAt: schemas.UtcTime
    heartbeatAt: schemas.UtcTime


def node_out(node: NodeView) -> NodeOut:
    return NodeOut(
        name=node.name,
        state=node.state.value,
        intent=node.intent,
        ready=node.ready,
        internalURL=node.internal_url,
        publicURL=node.public_url,
        browserCapacity=node.browser_capacity,
        cliCapacity=node.cli_capacity,
        browserInUse=node.browser_in_use,
        cliInUse=node.cli_in_use,
        version=node.version,
        startedAt=node.started_at,
        heartbeatAt=node.heartbeat_at,
    )


@router.get(
    "",
    response_model=list[NodeOut],
    summary="The cluster's nodes: state (active, draining, down), capacity, heartbeat",
    responses=schemas.errors(*schemas.API_ERRORS),
)
async def list_nodes(core: CoreDep, principal: PrincipalDep) -> list[NodeOut]:
    if not principal.is_service:
        raise Forbidden("the node list is for service tokens", code="service_only")
    return [node_out(n) for n in await core.nodes.list()]
