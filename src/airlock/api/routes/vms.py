"""``/api/vms``: CLI VMs and browser VMs (http-api.md, "VMs").

A VM row is never deleted, so ``GET /api/vms/{vmId}`` answers a destroyed VM with its
tombstone (state, reason, time). Another user's VM is a 404 exactly like a missing one.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, status
from pydantic import BaseModel, ConfigDict, Field, StrictBool

from airlock.api import schemas
from airlock.api.deps import CoreDep, PrincipalDep
from airlock.domain.vms import VmRole, VmState
from airlock.services.handoff import Injection
from airlock.services.tokens import NAME_PATTERN

router = APIRouter(prefix="/api/vms", tags=["vms"])

VM_ID_PATTERN = r"^vm-[A-Za-z0-9]{1,61}$"
VmIdPath = Annotated[
    str,
    Path(
        alias="vmId",
        pattern=VM_ID_PATTERN,
        min_length=4,
        max_length=64,
        description="vm- and 1-61 ASCII letters or digits.",
    ),
]
UserQuery = Annotated[
    str | None,
    Query(
        alias="userId",
        max_length=128,
        pattern=f"^{NAME_PATTERN}$",
        description="Service tokens: whose VMs. User tokens: only their own name.",
    ),
]


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=schemas.VmDetail,
    summary="Create a long-lived CLI VM for the user (answers once it runs)",
    responses=schemas.errors(*schemas.API_ERRORS, 413, 503),
)
async def create_vm(
    body: schemas.CreateVmRequest, core: CoreDep, principal: PrincipalDep
) -> schemas.VmDetail:
    user_id = principal.user_for(body.userId)
    assert user_id is not None  # required=True: a service token must name the user
    vm = await core.vms.create_cli(user_id=user_id, actor=principal.actor)
    return schemas.vm_detail(vm)


@router.get(
    "",
    response_model=list[schemas.VmDetail],
    summary="The caller's VMs, newest first",
    responses=schemas.errors(*schemas.API_ERRORS),
)
async def list_vms(
    core: CoreDep,
    principal: PrincipalDep,
    user_id: UserQuery = None,
    role: Annotated[VmRole | None, Query()] = None,
    state: Annotated[VmState | None, Query()] = None,
) -> list[schemas.VmDetail]:
    vms = await core.vms.list(
        principal.user_for(user_id, required=False),
        role=role.value if role is not None else None,
        state=state.value if state is not None else None,
    )
    return [schemas.vm_detail(vm) for vm in vms]


@router.get(
    "/{vmId}",
    response_model=schemas.VmDetail,
    summary="One VM, also after it was destroyed",
    responses=schemas.errors(*schemas.API_ERRORS, 404),
)
async def get_vm(
    vm_id: VmIdPath, core: CoreDep, principal: PrincipalDep, user_id: UserQuery = None
) -> schemas.VmDetail:
    vm = await core.vms.get(vm_id, principal.user_for(user_id, required=False))
    return schemas.vm_detail(vm)


@router.delete(
    "/{vmId}",
    response_model=schemas.VmDetail,
    summary="Destroy a VM (its owner or a service token); idempotent",
    responses=schemas.errors(*schemas.API_ERRORS, 404, 503),
)
async def delete_vm(
    vm_id: VmIdPath, core: CoreDep, principal: PrincipalDep, user_id: UserQuery = None
) -> schemas.VmDetail:
    vm = await core.vms.delete(
        vm_id, user_id=principal.user_for(user_id, required=False), actor=principal.actor
    )
    return schemas.vm_detail(vm)


class InjectRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    provider: str = Field(min_length=1, max_length=64)
    userId: str | None = Field(None, max_length=128)
    force: StrictBool = Field(
        False,
        description="Move the login even when the VM that holds it cannot be reached (the "
        "vault's newest version goes in; a stale copy may remain there).",
    )


class InjectOut(BaseModel):
    vmId: str
    provider: str
    sessionId: str = Field(description="The login whose credentials were injected.")
    injected: schemas.InjectedOut
    check: str = Field(description="Which check verified the login, and why it is the best.")
    result: str
    files: list[str]
    movedFrom: str | None = Field(
        None,
        description="The CLI VM the login was taken from (its files removed there); null "
        "when it came from the vault or was already here.",
    )
    version: int = Field(description="The login's version now in this VM (1: the capture).")
    otherHolders: list[str] = Field(
        description="VMs that may still hold a stale copy of this login: only after a "
        "forced move from a holder that could not be reached."
    )
    notice: str | None = Field(
        None, description="Set when a stale copy may remain elsewhere (a forced move)."
    )


def _inject_out(i: Injection) -> InjectOut:
    return InjectOut(
        vmId=i.vm_id,
        provider=i.provider,
        sessionId=i.session_id,
        injected=schemas.InjectedOut(vmId=i.vm_id, at=i.at, verified=i.verified),
        check=i.check,
        result=i.summary,
        files=i.files,
        movedFrom=i.moved_from,
        version=i.version,
        otherHolders=i.other_holders,
        notice=i.notice,
    )


@router.post(
    "/{vmId}/credentials",
    response_model=InjectOut,
    summary="Log a CLI VM in with the user's login for a provider (a move if another VM holds it)",
    responses=schemas.errors(*schemas.API_ERRORS, 404, 409, 413, 503),
)
async def inject_credentials(
    vm_id: VmIdPath, body: InjectRequest, core: CoreDep, principal: PrincipalDep
) -> InjectOut:
    user_id = principal.user_for(body.userId)
    assert user_id is not None
    await core.vms.get(vm_id, user_id)  # 404 for a foreign or malformed id, before anything
    injection = await core.handoff.inject_latest(
        vm_id=vm_id,
        user_id=user_id,
        provider_id=body.provider,
        actor=principal.actor,
        force=body.force,
    )
    return _inject_out(injection)
