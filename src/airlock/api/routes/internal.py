"""``/internal``: what a node's peers call on it (``services.node_link``), never a user.

- ``WS /internal/vms/{vmId}/{kind}``, kind ``vnc`` or ``agent``: a stream to a VM this node holds,
  relayed byte for byte (the VNC proxy and the agent client run on the calling node).
- ``POST /internal/vms/{vmId}/destroy``: destroy a VM this node holds, now.
- ``POST /internal/boots``: a VM was placed on this node: its boot queue looks now.

Each needs a node credential for exactly that VM and purpose (``Authorization: Bearer``),
minted with the cluster key by a registered node. A user's API token, a viewer token, a
forged or expired credential, one for another VM or purpose: 401 in the usual error shape
(on the socket as the handshake's answer), and nothing is opened. A VM this node does not
hold: 404.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Annotated

from fastapi import APIRouter, Path, Request, WebSocket
from fastapi.responses import JSONResponse
from pydantic import Field
from starlette.websockets import WebSocketDisconnect

from airlock.api import schemas
from airlock.api.deps import CoreDep, get_core
from airlock.domain.vms import DestroyReason
from airlock.errors import AirlockError, InvalidInput, NotFound, Unauthorized
from airlock.services.core import Core
from airlock.services.node_link import CHUNK, KINDS, splice_until_either_ends
from airlock.services.vms import check_vm_id

router = APIRouter(prefix="/internal", tags=["internal"])

VmIdPath = Annotated[str, Path(alias="vmId", max_length=64)]


def _bearer(headers: object) -> str | None:
    value = getattr(headers, "get", lambda _k: None)("authorization")
    if not isinstance(value, str) or not value.lower().startswith("bearer "):
        return None
    return value[7:].strip()


async def _registered(core: Core, token: str | None, purpose: str) -> str:
    peer = core.node_credentials.verify(token, purpose)
    async with core.db.read() as repo:
        registered = await repo.node_row(peer)
    if registered is None:
        raise Unauthorized(f"node {peer} is not registered", code="invalid_node_credential")
    return peer


async def _peer(core: Core, token: str | None, purpose: str, vm_id: str) -> str:
    """The calling node, after its credential and the VM are checked."""
    check_vm_id(vm_id)
    peer = await _registered(core, token, purpose)
    async with core.db.read() as repo:
        vm = await repo.vm(vm_id)
    if vm is None or (vm.node and vm.node != core.settings.node_name):
        raise NotFound(
            f"{vm_id} is not held by node {core.settings.node_name}", code="vm_not_found"
        )
    return peer


@router.websocket("/vms/{vmId}/{kind}")
async def relay(ws: WebSocket, vm_id: VmIdPath, kind: str) -> None:
    core = get_core(ws)
    try:
        if kind not in KINDS:
            raise NotFound(f"no stream {kind[:20]!r} (vnc or agent)", code="not_found")
        await _peer(core, _bearer(ws.headers), f"{kind}:{vm_id}", vm_id)
        opener = core.runtime.open_vnc if kind == "vnc" else core.runtime.open_agent
        reader, writer = await opener(vm_id)
    except AirlockError as exc:
        body = schemas.error_body(exc.code, exc.message)
        await ws.send_denial_response(JSONResponse(body, status_code=exc.status))
        return
    await ws.accept()

    async def inbound() -> None:  # the peer -> the VM
        with contextlib.suppress(WebSocketDisconnect):
            while True:
                message = await ws.receive()
                if message["type"] == "websocket.disconnect":
                    return
                data = message.get("bytes") or (message.get("text") or "").encode()
                writer.write(data)
                await writer.drain()

    async def outbound() -> None:  # the VM -> the peer
        while data := await reader.read(CHUNK):
            await ws.send_bytes(data)

    try:
        await splice_until_either_ends(inbound(), outbound())
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await ws.close()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(2):
                await writer.wait_closed()


@router.post(
    "/boots",
    summary="A peer placed a VM here: look for it now (node credential; peers only)",
    responses=schemas.errors(401, 429),
)
async def boots(request: Request, core: CoreDep) -> JSONResponse:
    await _registered(core, _bearer(request.headers), "boots")
    core.boot_queue.poke()
    return JSONResponse({"poked": True})


class DestroyRequest(schemas._In):
    reason: str = Field(max_length=32)
    actor: str = Field(max_length=160)


@router.post(
    "/vms/{vmId}/destroy",
    summary="Destroy a VM this node holds, now (node credential; peers only)",
    responses=schemas.errors(400, 401, 404, 422, 429),
)
async def destroy(
    vm_id: VmIdPath, body: DestroyRequest, request: Request, core: CoreDep
) -> JSONResponse:
    await _peer(core, _bearer(request.headers), f"destroy:{vm_id}", vm_id)
    try:
        reason = DestroyReason(body.reason)
    except ValueError:
        raise InvalidInput(f"unknown destroy reason {body.reason!r}") from None
    destroyed = await core.scheduler.destroy_now(vm_id, reason=reason, actor=body.actor)
    return JSONResponse({"vmId": vm_id, "destroyed": destroyed})
