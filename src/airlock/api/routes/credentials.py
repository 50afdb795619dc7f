"""``/api/credentials``: the caller's logins (grants) and their health, never their secrets.

A login is one account's sign-in with one provider; it has at most one holder (a CLI VM, or
the vault) and a state kept by the scheduled health check (``services.credential_health``).
``/events`` streams the list again whenever one of them changes state.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from airlock.api import schemas
from airlock.api.deps import CoreDep, PrincipalDep
from airlock.domain.grants import GrantState
from airlock.services.core import Core
from airlock.services.credential_health import bus_key
from airlock.services.tokens import NAME_PATTERN
from airlock.store.tables import Grant, GrantVersion

router = APIRouter(prefix="/api/credentials", tags=["credentials"])

SSE_WAKE_S = 5.0  # re-read at least this often: other controllers' changes
SSE_HEARTBEAT_S = 15.0
SSE_MAX_S = 600.0  # a stream ends after this; EventSource reconnects (``retry``), a proxy
# or a forgotten client does not hold it forever

UserQuery = Annotated[
    str | None,
    Query(
        alias="userId",
        max_length=128,
        pattern=f"^{NAME_PATTERN}$",
        description="Service tokens: whose logins (all users' without it). User tokens: only "
        "their own name.",
    ),
]


class VersionOut(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    version: int
    source: str = Field(description="capture, sync (the CLI refreshed it) or move.")
    createdAt: schemas.UtcTime
    vmId: str | None = Field(description="The VM it was read back from, if any.")
    supersededAt: schemas.UtcTime | None
    wipedAt: schemas.UtcTime | None = Field(description="When its secret was wiped (audit only).")


class CredentialOut(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    grantId: str
    userId: str
    provider: str
    providerName: str = Field(description="The vendor's name for people (Claude Code, ...).")
    account: str = Field(description="The account's email or id, as the login says; may be ''.")
    holderVmId: str | None = Field(description="The CLI VM that holds it; null: the vault.")
    sessionId: str | None = Field(description="The login session that captured it.")
    state: GrantState
    stateReason: str | None
    stateChangedAt: schemas.UtcTime | None
    accessExpiresAt: schemas.UtcTime | None
    refreshExpiresAt: schemas.UtcTime | None = Field(
        description="The refresh token's end where the files say it."
    )
    lastRefreshSeenAt: schemas.UtcTime | None = Field(
        description="When a refresh by the CLI was last synced back."
    )
    lastCheckedAt: schemas.UtcTime | None = Field(
        description="When the CLI's status check last ran for it."
    )
    createdAt: schemas.UtcTime
    currentVersion: int
    versions: list[VersionOut]


_LIST = TypeAdapter(list[CredentialOut])


def credential_out(core: Core, grant: Grant, versions: list[GrantVersion]) -> CredentialOut:
    provider = core.providers.get(grant.provider)
    return CredentialOut(
        grantId=grant.id,
        userId=grant.user_id,
        provider=grant.provider,
        providerName=provider.name if provider is not None else grant.provider,
        account=grant.account,
        holderVmId=grant.holder_vm_id,
        sessionId=grant.session_id,
        state=_state(grant.state),
        stateReason=grant.state_reason,
        stateChangedAt=grant.state_changed_at,
        accessExpiresAt=grant.access_expires_at,
        refreshExpiresAt=grant.refresh_expires_at,
        lastRefreshSeenAt=grant.last_refresh_seen_at,
        lastCheckedAt=grant.last_checked_at,
        createdAt=grant.created_at,
        currentVersion=grant.current_version,
        versions=[
            VersionOut(
                version=v.version,
                source=v.source,
                createdAt=v.created_at,
                vmId=v.vm_id,
                supersededAt=v.superseded_at,
                wipedAt=v.wiped_at,
            )
            for v in sorted(versions, key=lambda v: v.version)
        ],
    )


def _state(value: str) -> GrantState:
    try:
        return GrantState(value)
    except ValueError:
        return GrantState.NEEDS_LOGIN  # an unknown state is nothing to rely on


async def _logins(core: Core, user_id: str | None) -> list[CredentialOut]:
    async with core.db.read() as repo:
        grants = await repo.grants(user_id=user_id)
        versions = await repo.grant_versions([g.id for g in grants])
    by: dict[str, list[GrantVersion]] = {}
    for v in versions:
        by.setdefault(v.grant_id, []).append(v)
    return [credential_out(core, g, by.get(g.id, [])) for g in grants]


@router.get(
    "",
    response_model=list[CredentialOut],
    summary="The caller's logins: provider, account, holder VM, state, expiries, versions",
    responses=schemas.errors(*schemas.API_ERRORS),
)
async def list_credentials(
    core: CoreDep,
    principal: PrincipalDep,
    user_id: UserQuery = None,
    state: Annotated[GrantState | None, Query()] = None,
) -> list[CredentialOut]:
    logins = await _logins(core, principal.user_for(user_id, required=False))
    return [c for c in logins if state is None or c.state is state]


@router.get(
    "/events",
    summary="Server-Sent Events: the caller's logins again whenever one changes state",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"text/event-stream": {"schema": {"type": "string"}}}},
        **schemas.errors(*schemas.API_ERRORS),
    },
)
async def credential_events(
    core: CoreDep, principal: PrincipalDep, user_id: UserQuery = None
) -> StreamingResponse:
    """``event: credentials`` with the list at once and after every change of it (a login
    that needs attention among them), a comment line every 15 s; it ends after 10 minutes
    (EventSource reconnects). A user's stream; a service token names the user."""
    user = principal.user_for(user_id)
    assert user is not None
    return StreamingResponse(
        _stream(core, user),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


async def _stream(core: Core, user_id: str) -> AsyncIterator[str]:
    loop = asyncio.get_running_loop()
    key = bus_key(user_id)
    last: bytes | None = None
    last_write = started = loop.time()
    yield "retry: 2000\n\n"
    while loop.time() - started < SSE_MAX_S:
        version = core.bus.version(key)  # before the read: no change falls in between
        body = _LIST.dump_json(await _logins(core, user_id), by_alias=True)
        if body != last:
            last, last_write = body, loop.time()
            yield f"event: credentials\ndata: {body.decode()}\n\n"
        elif loop.time() - last_write >= SSE_HEARTBEAT_S:
            last_write = loop.time()
            yield ": keepalive\n\n"
        await core.bus.wait(
            key, version, min(SSE_WAKE_S, max(0.0, started + SSE_MAX_S - loop.time()))
        )
