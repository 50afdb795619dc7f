"""Operations: ``/healthz`` (the process answers), ``/readyz`` (the database and the
runtime answer), ``/metrics`` (Prometheus text). No token: these are for probes and
scrapers, and say nothing about any user.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from airlock.api import schemas
from airlock.api.deps import CoreDep
from airlock.domain.grants import GrantState
from airlock.domain.vms import VmRole, VmState

log = logging.getLogger("airlock.api")

router = APIRouter(tags=["operations"])

READY_TIMEOUT_S = 5.0


@router.get("/healthz", summary="The process is up", responses=schemas.errors(429))
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="The database and the VM runtime answer",
    responses={
        **schemas.errors(429),
        503: {"model": schemas.ErrorBody, "description": "A dependency does not answer."},
    },
)
async def readyz(core: CoreDep) -> JSONResponse:
    checks: dict[str, str] = {}
    for name, probe in (("database", core.db.ping()), ("runtime", core.runtime.list())):
        try:
            await asyncio.wait_for(probe, READY_TIMEOUT_S)
            checks[name] = "ok"
        except Exception as exc:
            log.warning("readiness check %s failed: %s", name, exc)
            checks[name] = f"failed: {type(exc).__name__}"
    if all(v == "ok" for v in checks.values()):
        return JSONResponse({"status": "ready", "checks": checks})
    failing = ", ".join(k for k, v in checks.items() if v != "ok")
    body: dict[str, Any] = {
        "error": {"code": "not_ready", "message": f"not ready: {failing} did not answer"},
        "checks": checks,
    }
    return JSONResponse(body, status_code=503)


@router.get(
    "/metrics",
    summary="Prometheus metrics (text format)",
    response_class=Response,
    responses={
        200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}},
        **schemas.errors(429),
    },
)
async def metrics(core: CoreDep) -> Response:
    async with core.db.read() as repo:
        counts = await repo.count_vms()
        logins = await repo.count_grants()
    gauge = core.metrics.vms
    gauge.clear()
    # Every role and state is exported, zeros included, so a series does not vanish
    # when its last VM leaves that state.
    for role in VmRole:
        for state in VmState:
            gauge.labels(role.value, state.value).set(0)
    for role_name, state_name, n in counts:
        gauge.labels(role_name, state_name).set(n)
    by_state = core.metrics.credentials
    by_state.clear()
    for provider in core.providers:
        for grant_state in GrantState:
            by_state.labels(provider, grant_state.value).set(0)
    for provider, state_name, n in logins:
        by_state.labels(provider, state_name).set(n)
    return Response(core.metrics.render(), media_type=CONTENT_TYPE_LATEST)
