"""``/api/vms``: CLI VMs and browser VMs (http-api.md, "VMs").

A VM row is never deleted, so ``GET /api/vms/{vmId}`` answers a destroyed VM with its
tombstone (state, reason, time). Another user's VM is a 404 exactly like a missing one.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, status

from airlock.api import schemas
from airlock.api.deps import CoreDep, PrincipalDep
from airlock.domain.vms import VmRole, VmState

router = APIRouter(prefix="/api/vms", tags=["vms"])

VmIdPath = Annotated[str, Path(alias="vmId", description="vm- and letters or digits.")]
UserQuery = Annotated[
    str | None,
    Query(
        alias="userId",
        max_length=128,
        description="Service tokens: whose VMs. User tokens: only their own name.",
    ),
]


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=schemas.VmDetail,
    summary="Create a long-lived CLI VM for the user (answers once it runs)",
)
async def create_vm(
    body: schemas.CreateVmRequest, core: CoreDep, principal: PrincipalDep
) -> schemas.VmDetail:
    user_id = principal.user_for(body.userId)
    assert user_id is not None  # required=True: a service token must name the user
    vm = await core.vms.create_cli(user_id=user_id, actor=principal.actor)
    return schemas.vm_detail(vm)


@router.get("", response_model=list[schemas.VmDetail], summary="The caller's VMs, newest first")
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
    "/{vmId}", response_model=schemas.VmDetail, summary="One VM, also after it was destroyed"
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
)
async def delete_vm(
    vm_id: VmIdPath, core: CoreDep, principal: PrincipalDep, user_id: UserQuery = None
) -> schemas.VmDetail:
    vm = await core.vms.delete(
        vm_id, user_id=principal.user_for(user_id, required=False), actor=principal.actor
    )
    return schemas.vm_detail(vm)
