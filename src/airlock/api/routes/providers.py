"""``/api/providers``: the login providers this controller can run."""

from __future__ import annotations

from fastapi import APIRouter

from airlock.api import schemas
from airlock.api.deps import CoreDep, PrincipalDep

router = APIRouter(prefix="/api", tags=["providers"])


@router.get(
    "/providers",
    response_model=list[schemas.ProviderOut],
    response_model_exclude_none=True,
    summary="Providers this controller can run, and why not where one cannot",
)
async def list_providers(core: CoreDep, principal: PrincipalDep) -> list[schemas.ProviderOut]:
    out = []
    for provider_id, provider in sorted(core.providers.items()):
        reason = provider.available()
        out.append(
            schemas.ProviderOut(
                id=provider_id,
                name=provider.name,
                available=reason is None,
                reason=reason,
                accounts=getattr(provider, "accounts", None),  # optional on a Provider
            )
        )
    return out
