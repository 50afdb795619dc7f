"""The VNC socket and viewer tokens (http-api.md, "Auth sessions"; ``api.vnc_proxy`` does
the proxying).

``POST .../viewer-token`` is how support staff get a view-only viewer link: a service token
for any session, or the session's own user. It needs an API token, never a viewer token, so
a viewer token (expired or not) can never be traded for a new one.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, WebSocket, status
from pydantic import Field, StrictBool

from airlock.api import schemas
from airlock.api.deps import CoreDep, PrincipalDep, SignerDep
from airlock.api.routes.sessions import SessionIdPath, UserQuery
from airlock.api.vnc_proxy import serve_viewer
from airlock.errors import Conflict

router = APIRouter(prefix="/api/auth/session/{sessionId}", tags=["viewer"])


class ViewerTokenRequest(schemas._In):
    viewOnly: StrictBool = Field(
        False, description="A token whose VNC socket drops every input message (support)."
    )


class ViewerTokenOut(schemas._Out):
    token: str
    viewOnly: bool
    novncURL: str = Field(description="The viewer page with this token.")
    vncURL: str = Field(description="The VNC WebSocket with this token.")
    expiresAt: schemas.UtcTime


@router.post(
    "/viewer-token",
    status_code=status.HTTP_201_CREATED,
    response_model=ViewerTokenOut,
    summary="Mint a viewer token (view-only for support staff)",
    responses=schemas.errors(*schemas.API_ERRORS, 404, 409, 413),
)
async def viewer_token(
    session_id: SessionIdPath,
    core: CoreDep,
    signer: SignerDep,
    principal: PrincipalDep,
    body: ViewerTokenRequest | None = None,
    user_id: UserQuery = None,
) -> ViewerTokenOut:
    view_only = body.viewOnly if body is not None else False
    session, vm = await core.sessions.get(session_id, principal.user_for(user_id, required=False))
    if vm is None or not schemas.viewable(vm):
        raise Conflict(
            f"the browser VM of session {session_id} cannot be viewed "
            f"({vm.state if vm is not None else 'none'})",
            code="vm_not_viewable",
        )
    now = core.clock.now()
    token = signer.mint(session.id, vm.id, now=now, view_only=view_only)
    claims = signer.verify(token, session.id, vm.id, now=now)
    base = f"{core.settings.base_url}/api/auth/session/{session.id}"
    ws_base = "ws" + base.removeprefix("http")
    return ViewerTokenOut(
        token=token,
        viewOnly=view_only,
        novncURL=f"{base}/novnc?token={token}",
        vncURL=f"{ws_base}/vnc?token={token}",
        expiresAt=claims.expires_at,
    )


@router.websocket("/vnc")
async def vnc(
    ws: WebSocket,
    session_id: Annotated[str, Path(alias="sessionId")],
    token: Annotated[str | None, Query()] = None,
) -> None:
    """Binary RFB, proxied to the VM's VNC server; see ``api.vnc_proxy``.

    Neither the id nor the token is constrained here: a failed check before the handshake
    is an HTTP 403 that a page cannot read, so every refusal (a malformed id, a token too
    long) is ``verify_viewer_token``'s, after it, as close code 4401."""
    await serve_viewer(ws, session_id, token)
