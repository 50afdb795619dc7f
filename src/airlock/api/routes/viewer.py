"""The viewer page and what it may call with its viewer token (http-api.md, "Identity").

A viewer token (the ``token`` in ``novncURL``) opens one session's viewer page and VNC
socket. Our extension: it also reads that session's events and sends its keepalive and
``complete``, because the page a person looks at has no bearer token. Nothing else accepts
it; a view-only token may not call ``complete``. Refusals are ``deps.verify_viewer_token``'s.

The page itself is static HTML (``api/web/viewer.html``): its script reads the session id
and token from its own URL. noVNC's ES modules are served from ``node_modules`` (installed
by ``scripts/setup.sh``); without them the page says that set-up did not run.
"""

from __future__ import annotations

import html
import json
from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import HTMLResponse, StreamingResponse

from airlock.api import schemas, sse, static
from airlock.api.deps import (
    CoreDep,
    SignerDep,
    ViewerClaims,
    ViewerSigner,
    verify_viewer_token,
)
from airlock.api.routes.sessions import SessionIdPath
from airlock.errors import NotFound, Unauthorized
from airlock.services import viewers
from airlock.services.core import Core
from airlock.store.tables import AuthSession, Credential, Vm

router = APIRouter(prefix="/api/auth/session/{sessionId}", tags=["viewer"])

TokenQuery = Annotated[
    str | None,
    Query(max_length=256, description="The viewer token from the session's novncURL."),
]

# The token is in the page's URL: never send it on as a Referer, never cache the page.
# Framed only by our own pages (the dashboard).
PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; frame-ancestors 'self'; base-uri 'none'; form-action 'none'",
}


async def viewed_session(
    core: Core, signer: ViewerSigner, session_id: str, token: str | None
) -> tuple[ViewerClaims, AuthSession, Vm | None]:
    """What a viewer token opens (``deps.verify_viewer_token``: 401 for a bad or expired
    token, 404 once the VM cannot be viewed), with the session and its VM."""
    claims = await verify_viewer_token(core, signer, session_id, token)
    session, vm = await core.sessions.get(claims.session_id, None)
    return claims, session, vm


def _page(status: int, title: str, message: str) -> HTMLResponse:
    """A plain page for a viewer that cannot be shown, in words a person understands."""
    body = static.MESSAGE_PAGE.format(title=html.escape(title), message=html.escape(message))
    return HTMLResponse(body, status_code=status, headers=PAGE_HEADERS)


@router.get(
    "/novnc",
    response_class=HTMLResponse,
    summary="The viewer page: the remote browser, live, with the session's status",
    responses=schemas.errors(400, 401, 404, 422, 429, 503, html=(401, 404, 503)),
)
async def viewer_page(
    session_id: SessionIdPath, core: CoreDep, signer: SignerDep, token: TokenQuery = None
) -> HTMLResponse:
    try:
        await viewed_session(core, signer, session_id, token)
    except (Unauthorized, NotFound) as exc:
        return _page(
            exc.status,
            "This viewer link does not work",
            "It has expired, or the login it belonged to is over. Open the viewer again "
            "from the dashboard, or start a new login there.",
        )
    if not static.novnc_installed():
        return _page(
            503,
            "The viewer is not installed",
            "Set-up did not run on this controller: noVNC is missing from node_modules. "
            "Run `make setup` (or scripts/setup.sh) in the Airlock checkout and reload.",
        )
    return HTMLResponse(static.read_page("viewer.html"), headers=PAGE_HEADERS)


@router.get(
    "/viewer/events",
    summary="Server-Sent Events for the viewer page (viewer token; our extension)",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"text/event-stream": {"schema": {"type": "string"}}}},
        **schemas.errors(400, 401, 404, 422, 429),
    },
)
async def viewer_events(
    session_id: SessionIdPath, core: CoreDep, signer: SignerDep, token: TokenQuery = None
) -> StreamingResponse:
    """As ``/events`` (the session at once and at every change, until its VM is gone),
    with ``novncURL`` left out: a viewer token does not hand out new viewer tokens here."""
    await viewed_session(core, signer, session_id, token)  # the token first: 401/404 here
    version = core.bus.version(session_id)  # then the version, before the read
    _, session, vm = await viewed_session(core, signer, session_id, token)

    async def read() -> schemas.SessionOut:
        session, vm, cred = await core.sessions.view(session_id, None)
        return _viewer_out(core, session, vm, cred)

    async def egress() -> str | None:
        return await egress_notice(core, session_id)

    return sse.response(
        sse.session_stream(
            core,
            session_id,
            version=version,
            first=await _view(core, session, vm),
            read=read,
            extras={"egress": egress},
        )
    )


async def _view(core: Core, session: AuthSession, vm: Vm | None) -> schemas.SessionOut:
    return _viewer_out(core, session, vm, await core.sessions.credential(session.id))


def _viewer_out(
    core: Core, session: AuthSession, vm: Vm | None, cred: Credential | None
) -> schemas.SessionOut:
    out = schemas.session_out(session, vm, cred, base_url=core.settings.base_url, viewer_token=None)
    return out.model_copy(update={"novncURL": None})


async def egress_notice(core: Core, session_id: str) -> str | None:
    """The ``egress`` event's data while the page's requests are being blocked, else None
    (the stream sends it when it changed)."""
    blocked, hosts = await core.egress.blocked(session_id)
    return json.dumps({"blocked": blocked, "hosts": hosts}) if blocked else None


@router.post(
    "/viewer/keepalive",
    response_model=schemas.KeepaliveOut,
    summary="The viewer page is visible: extend the VM's deadline (viewer token; our extension)",
    responses=schemas.errors(400, 401, 404, 409, 422, 429),
)
async def viewer_keepalive(
    session_id: SessionIdPath, core: CoreDep, signer: SignerDep, token: TokenQuery = None
) -> schemas.KeepaliveOut:
    """Presence only: a view-only token may send it too. No fresh token in the answer: a
    viewer token is never traded for a new one (after its TTL the open VNC socket still
    counts as presence)."""
    claims, _, _ = await viewed_session(core, signer, session_id, token)
    destroy_after = await viewers.keepalive(core, claims.session_id)
    return schemas.KeepaliveOut(destroyAfter=destroy_after)


@router.post(
    "/viewer/complete",
    response_model=schemas.CompleteOut,
    summary="The viewer page showed the outcome: destroy the VM now (viewer token; our extension)",
    responses=schemas.errors(400, 401, 403, 404, 409, 422, 429),
)
async def viewer_complete(
    session_id: SessionIdPath, core: CoreDep, signer: SignerDep, token: TokenQuery = None
) -> schemas.CompleteOut:
    claims, session, _ = await viewed_session(core, signer, session_id, token)
    session, vm = await viewers.complete(core, session, view_only=claims.view_only)
    return schemas.CompleteOut(session=await _view(core, session, vm))
