"""``/api/auth``: auth sessions (http-api.md, "Auth sessions").

Each route: check who asks and for whom (``Principal.user_for``), call ``SessionService``,
serialize. Another user's session is a 404 exactly like a missing one, because the service
is asked with the caller's user id. The viewer page (``/novnc``) and what it calls with its
viewer token are ``routes.viewer``; the VNC WebSocket (``/vnc``) is ``routes.vnc``.
"""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Path, Query, status
from fastapi.responses import StreamingResponse
from pydantic import SerializeAsAny

from airlock.api import schemas, sse
from airlock.api.deps import CoreDep, PrincipalDep, SignerDep, ViewerSigner
from airlock.domain.sessions import SessionStatus
from airlock.errors import NotFound
from airlock.services.core import Core
from airlock.services.tokens import NAME_PATTERN, Principal
from airlock.store.tables import AuthSession, Credential, Vm

log = logging.getLogger("airlock.api")

router = APIRouter(prefix="/api/auth", tags=["auth sessions"])

UserQuery = Annotated[
    str | None,
    Query(
        alias="userId",
        max_length=128,
        pattern=f"^{NAME_PATTERN}$",
        description="Service tokens: whose session. User tokens: only their own name.",
    ),
]
SESSION_ID_PATTERN = r"^[0-9a-f]{32}$"
SessionIdPath = Annotated[
    str,
    Path(
        alias="sessionId",
        pattern=SESSION_ID_PATTERN,
        min_length=32,
        max_length=32,
        description="32 lower-case hex digits, as POST /start answered it.",
    ),
]
StatusQuery = Annotated[SessionStatus | None, Query(alias="status")]


def _reader(principal: Principal, user_id: str | None) -> str | None:
    """Whose sessions may be read: the user's own, or (service tokens) any, or the one
    named."""
    return principal.user_for(user_id, required=False)


def _out(
    core: Core,
    signer: ViewerSigner,
    session: AuthSession,
    vm: Vm | None,
    cred: Credential | None,
) -> schemas.SessionOut:
    token = (
        signer.mint(session.id, vm.id, now=core.clock.now())
        if schemas.viewable(vm) and vm is not None
        else None
    )
    return schemas.session_out(
        session, vm, cred, base_url=core.settings.base_url, viewer_token=token
    )


async def _session_view(
    core: Core, signer: ViewerSigner, session_id: str, user_id: str | None
) -> schemas.SessionOut:
    session, vm, cred = await core.sessions.view(session_id, user_id)
    return _out(core, signer, session, vm, cred)


@router.post(
    "/start",
    status_code=status.HTTP_201_CREATED,
    response_model=schemas.SessionOut,
    summary="Start a login: create a session and its browser VM",
    responses=schemas.errors(*schemas.API_ERRORS, 404, 413, 503),
)
async def start(
    body: schemas.StartRequest, core: CoreDep, signer: SignerDep, principal: PrincipalDep
) -> schemas.SessionOut:
    user_id = principal.user_for(body.userId)
    assert user_id is not None  # required=True: a service token must name the user
    session, vm = await core.sessions.start(
        user_id=user_id, provider_id=body.provider, actor=principal.actor, cli_vm_id=body.cliVmId
    )
    return _out(core, signer, session, vm, None)


@router.get(
    "/sessions",
    response_model=list[schemas.SessionOut],
    summary="The caller's sessions, newest first",
    responses=schemas.errors(*schemas.API_ERRORS),
)
async def list_sessions(
    core: CoreDep,
    signer: SignerDep,
    principal: PrincipalDep,
    user_id: UserQuery = None,
    status_filter: StatusQuery = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> list[schemas.SessionOut]:
    rows = await core.sessions.list(
        _reader(principal, user_id),
        status_filter.value if status_filter is not None else None,
        limit=limit,
    )
    creds = await core.sessions.credentials_of([s.id for s, _ in rows])
    return [_out(core, signer, s, vm, creds.get(s.id)) for s, vm in rows]


@router.get(
    "/session/{sessionId}",
    response_model=schemas.SessionOut,
    summary="One session",
    responses=schemas.errors(*schemas.API_ERRORS, 404),
)
async def get_session(
    session_id: SessionIdPath,
    core: CoreDep,
    signer: SignerDep,
    principal: PrincipalDep,
    user_id: UserQuery = None,
) -> schemas.SessionOut:
    return await _session_view(core, signer, session_id, _reader(principal, user_id))


@router.get(
    "/session/{sessionId}/events",
    summary="Server-Sent Events: the session at every change",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"text/event-stream": {"schema": {"type": "string"}}}},
        **schemas.errors(*schemas.API_ERRORS, 404),
    },
)
async def session_events(
    session_id: SessionIdPath,
    core: CoreDep,
    signer: SignerDep,
    principal: PrincipalDep,
    user_id: UserQuery = None,
) -> StreamingResponse:
    """``event: session`` with the session JSON at once and after every change, a comment
    line every 15 s to keep proxies from closing an idle stream, and the end of the stream
    once the VM is gone (destroyed or lost), after its final state was sent (``api.sse``)."""
    reader = _reader(principal, user_id)
    version = core.bus.version(session_id)  # before the read: no change falls in between
    first = await _session_view(core, signer, session_id, reader)  # 404 before streaming
    # (The caller is authenticated and the id well-formed by now; the bus records nothing
    # until the stream waits, and forgets the session when its last waiter leaves.)
    return sse.response(
        sse.session_stream(
            core,
            session_id,
            version=version,
            first=first,
            read=lambda: _session_view(core, signer, session_id, reader),
        )
    )


@router.post(
    "/session/{sessionId}/keepalive",
    response_model=schemas.KeepaliveOut,
    summary="A person is still here: extend the browser VM's deadline",
    responses=schemas.errors(*schemas.API_ERRORS, 404, 409),
)
async def keepalive(
    session_id: SessionIdPath, core: CoreDep, principal: PrincipalDep, user_id: UserQuery = None
) -> schemas.KeepaliveOut:
    destroy_after = await core.sessions.keepalive(session_id, _reader(principal, user_id))
    return schemas.KeepaliveOut(destroyAfter=destroy_after)


@router.post(
    "/session/{sessionId}/complete",
    response_model=schemas.CompleteOut,
    summary="The frontend has what it needs: destroy the browser VM now",
    responses=schemas.errors(*schemas.API_ERRORS, 404, 409),
)
async def complete(
    session_id: SessionIdPath,
    core: CoreDep,
    signer: SignerDep,
    principal: PrincipalDep,
    user_id: UserQuery = None,
) -> schemas.CompleteOut:
    session, vm = await core.sessions.complete(
        session_id, _reader(principal, user_id), principal.actor
    )
    cred = await core.sessions.credential(session.id)
    return schemas.CompleteOut(session=_out(core, signer, session, vm, cred))


@router.delete(
    "/session/{sessionId}",
    response_model=schemas.SessionOut,
    summary="Cancel the session (if not over) and destroy its VM",
    responses=schemas.errors(*schemas.API_ERRORS, 404),
)
async def cancel(
    session_id: SessionIdPath,
    core: CoreDep,
    signer: SignerDep,
    principal: PrincipalDep,
    user_id: UserQuery = None,
) -> schemas.SessionOut:
    session, vm = await core.sessions.cancel(
        session_id, _reader(principal, user_id), principal.actor
    )
    cred = await core.sessions.credential(session.id)
    return _out(core, signer, session, vm, cred)


@router.get(
    "/session/{sessionId}/credentials",
    response_model=schemas.CredentialsOut,
    response_model_exclude_none=False,
    summary="What was captured (metadata; secret values only when exported)",
    responses=schemas.errors(*schemas.API_ERRORS, 404),
)
async def credentials(
    session_id: SessionIdPath,
    core: CoreDep,
    principal: PrincipalDep,
    user_id: UserQuery = None,
    include_secrets: Annotated[
        bool,
        Query(
            alias="secrets",
            description="Include the decrypted values. Service tokens only, and only when "
            "AIRLOCK_CREDENTIAL_EXPORT=true; each read is recorded in the timeline.",
        ),
    ] = False,
) -> schemas.CredentialsOut:
    session, _ = await core.sessions.get(session_id, _reader(principal, user_id))
    cred = await core.sessions.credential(session.id)
    if cred is None:
        raise NotFound(
            f"no credentials captured for session {session_id}", code="credentials_not_found"
        )
    if not include_secrets:
        return schemas.credentials_out(cred)
    secret = await core.sessions.export_secret(
        session,
        cred,
        actor=principal.actor,
        is_service=principal.is_service,
        export_enabled=core.settings.credential_export,
    )
    return schemas.credentials_out(cred, secret)


@router.get(
    "/session/{sessionId}/timeline",
    response_model=list[SerializeAsAny[schemas.TimelineEntry]],
    summary="The session's audit trail: every transition of it and its VM (our extension)",
    responses=schemas.errors(*schemas.API_ERRORS, 404),
)
async def timeline(
    session_id: SessionIdPath, core: CoreDep, principal: PrincipalDep, user_id: UserQuery = None
) -> list[schemas.TimelineEntry]:
    session, _ = await core.sessions.get(session_id, _reader(principal, user_id))
    counts = {(r.host, r.port, r.decision): r.count for r in await core.egress.hosts(session.id)}
    return schemas.timeline_out(await core.sessions.events(session), counts)
