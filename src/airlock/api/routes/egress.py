"""``GET /api/auth/session/{sessionId}/egress``: which hosts the session's browser VM was
denied (and, in learn mode, let through), how often, by the egress policy (our extension).

The session's owner (user token) or a service token; another user's session is a 404, as
everywhere. A thin route: ``EgressManager`` writes what is pending and reads the rows.
"""

from __future__ import annotations

from fastapi import APIRouter

from airlock.api import schemas
from airlock.api.deps import CoreDep, PrincipalDep
from airlock.api.routes.sessions import SessionIdPath, UserQuery, _reader

router = APIRouter(prefix="/api/auth", tags=["auth sessions"])


@router.get(
    "/session/{sessionId}/egress",
    response_model=schemas.EgressOut,
    summary="Hosts the egress policy denied this session, counted (our extension)",
    responses=schemas.errors(*schemas.API_ERRORS, 404),
)
async def session_egress(
    session_id: SessionIdPath, core: CoreDep, principal: PrincipalDep, user_id: UserQuery = None
) -> schemas.EgressOut:
    session, _ = await core.sessions.get(session_id, _reader(principal, user_id))
    policy = core.egress.policies.get(session.provider)
    rows = await core.egress.hosts(session.id)
    return schemas.egress_out(session, rows, learn=bool(policy and policy.learn))
