"""The JSON the HTTP API speaks (http-api.md): request bodies, and the objects it answers.

Field names are the wire names (camelCase, ``novncURL`` as the original frontends spell
it), so the models read like the contract. Times are ISO 8601 UTC ending in ``Z``.
Request bodies forbid unknown fields and carry the same constraints the services check,
so bad input is refused before anything happens. The ``*_out`` functions turn store rows
into these models; they do no I/O.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PlainSerializer

from airlock.domain import viewers
from airlock.domain.vms import VmState
from airlock.errors import InvalidInput
from airlock.services.tokens import NAME_PATTERN, check_name
from airlock.store.tables import AuthSession, Credential, EgressHost, Event, Vm


def iso(value: datetime) -> str:
    """``2026-11-27T23:43:33.123Z``: UTC, milliseconds, ``Z``."""
    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


UtcTime = Annotated[datetime, PlainSerializer(iso, return_type=str, when_used="json")]


def _user_id(value: str) -> str:
    try:
        return check_name(value)
    except InvalidInput as exc:
        raise ValueError(exc.message) from None


UserId = Annotated[
    str, Field(max_length=128, pattern=f"^{NAME_PATTERN}$"), AfterValidator(_user_id)
]
ProviderId = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[a-z0-9_]+$")]
VmId = Annotated[str, Field(min_length=4, max_length=64, pattern=r"^vm-[A-Za-z0-9]{1,61}$")]

VIEWABLE = viewers.VIEWABLE  # VMs whose screen a person can still look at (else no novncURL)


class _Out(BaseModel):
    model_config = ConfigDict(populate_by_name=True)


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- errors -------------------------------------------------------------------------------
class ErrorDetail(_Out):
    code: str = Field(examples=["session_not_found"])
    message: str


class ErrorBody(_Out):
    error: ErrorDetail


def error_body(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


_RETRY_AFTER = {
    "Retry-After": {
        "description": "Seconds until asking again is worth it.",
        "schema": {"type": "integer", "minimum": 1},
    }
}
ERROR_TEXT = {
    400: "Bad input: a malformed id (`invalid_id`), user name or value, or a service token "
    "that names no user.",
    401: "Missing, malformed, unknown or revoked token (a viewer token where one is asked).",
    403: "A user token naming another user, or something this token may not do.",
    404: "No such session or VM for this caller (another user's is answered the same).",
    409: "Not allowed in the current state.",
    413: "Request body over 64 KiB.",
    422: "A body or query that does not validate (`invalid_request`), or unusable credentials.",
    429: "A per-user quota (`too_many_sessions`, `too_many_cli_vms`, `rate_limited`) or the "
    "per-client limit (`rate_limited`); see `Retry-After`.",
    503: "This controller is full (`at_capacity`, see `Retry-After`), or a provider or the "
    "VM runtime is unavailable.",
}


def errors(*statuses: int, html: tuple[int, ...] = ()) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a route: each status it can answer with the error shape (the
    ``html`` ones as a page, for the viewer page), ``Retry-After`` on 429 and 503."""
    out: dict[int | str, dict[str, Any]] = {}
    json_error = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
    for status in statuses:
        entry: dict[str, Any] = {"description": ERROR_TEXT[status]}
        if html:  # an HTML route: JSON errors are named as such, not as the route's type
            entry["content"] = dict(json_error)
            if status in html:
                entry["content"]["text/html"] = {"schema": {"type": "string"}}
        else:
            entry["model"] = ErrorBody
        if status in (429, 503):
            entry["headers"] = _RETRY_AFTER
        out[status] = entry
    return out


# What every /api route with an API token can answer, besides its own.
API_ERRORS = (400, 401, 403, 422, 429)


# --- requests -----------------------------------------------------------------------------
class StartRequest(_In):
    provider: ProviderId = Field(description="A provider id from GET /api/providers.")
    userId: UserId | None = Field(
        None, description="Required for service tokens; a user token may only name itself."
    )
    cliVmId: VmId | None = Field(
        None, description="The user's CLI VM that should receive the credentials."
    )


class CreateVmRequest(_In):
    role: Literal["cli"] = Field(description="Only CLI VMs are created directly.")
    userId: UserId | None = Field(
        None, description="Required for service tokens; a user token may only name itself."
    )


# --- VMs ----------------------------------------------------------------------------------
class VmOut(_Out):
    vmId: str
    role: str
    runtime: str
    state: str
    createdAt: UtcTime
    destroyAfter: UtcTime | None
    destroyedAt: UtcTime | None
    destroyReason: str | None


class VmDetail(VmOut):
    """A VM as ``/api/vms`` answers it: the session object's ``vm`` plus its owner."""

    userId: str
    lastError: str | None


def vm_out(vm: Vm) -> VmOut:
    return VmOut(
        vmId=vm.id,
        role=vm.role,
        runtime=vm.runtime,
        state=vm.state,
        createdAt=vm.created_at,
        destroyAfter=vm.destroy_after,
        destroyedAt=vm.destroyed_at,
        destroyReason=vm.destroy_reason,
    )


def vm_detail(vm: Vm) -> VmDetail:
    return VmDetail(**vm_out(vm).model_dump(), userId=vm.user_id, lastError=vm.last_error)


# --- sessions -----------------------------------------------------------------------------
class InjectedOut(_Out):
    vmId: str
    at: UtcTime
    verified: bool


class CredentialsSummary(_Out):
    captured: bool
    capturedAt: UtcTime | None
    injected: InjectedOut | None


class SessionOut(_Out):
    sessionId: str
    userId: str
    provider: str
    status: str
    failureReason: str | None
    createdAt: UtcTime
    updatedAt: UtcTime
    completedAt: UtcTime | None
    novncURL: str | None = Field(
        description="The viewer page, while the VM can be viewed (creating, running, "
        "draining); null otherwise."
    )
    eventsURL: str
    vm: VmOut | None
    credentials: CredentialsSummary


class CompleteOut(_Out):
    success: Literal[True] = True
    session: SessionOut


class KeepaliveOut(_Out):
    destroyAfter: UtcTime | None = Field(
        description="The browser VM's deadline after the extension; null when it has none."
    )


def injected_out(cred: Credential | None) -> InjectedOut | None:
    if cred is None or cred.injected_vm_id is None or cred.injected_at is None:
        return None
    return InjectedOut(
        vmId=cred.injected_vm_id, at=cred.injected_at, verified=bool(cred.injected_verified)
    )


def viewable(vm: Vm | None) -> bool:
    return vm is not None and VmState(vm.state) in VIEWABLE


def session_out(
    session: AuthSession,
    vm: Vm | None,
    cred: Credential | None,
    *,
    base_url: str,
    viewer_token: str | None,
) -> SessionOut:
    """The session object. ``viewer_token`` is only used while the VM is viewable."""
    path = f"{base_url}/api/auth/session/{session.id}"
    novnc = f"{path}/novnc?token={viewer_token or ''}" if viewable(vm) else None
    return SessionOut(
        sessionId=session.id,
        userId=session.user_id,
        provider=session.provider,
        status=session.status,
        failureReason=session.failure_reason,
        createdAt=session.created_at,
        updatedAt=session.updated_at,
        completedAt=session.completed_at,
        novncURL=novnc,
        eventsURL=f"{path}/events",
        vm=vm_out(vm) if vm is not None else None,
        credentials=CredentialsSummary(
            captured=cred is not None,
            capturedAt=cred.captured_at if cred is not None else None,
            injected=injected_out(cred),
        ),
    )


# --- credentials and timeline (our extensions) --------------------------------------------
class AccountOut(_Out):
    id: str | None = None
    email: str | None = None
    organization: str | None = None


class CredentialsOut(_Out):
    sessionId: str
    provider: str
    account: AccountOut
    scopes: list[str]
    plan: str | None
    expiresAt: UtcTime | None
    capturedAt: UtcTime
    injected: InjectedOut | None
    secret: dict[str, Any] | None = Field(
        None,
        description="The decrypted credentials: only with ?secrets=true, for service tokens, "
        "when AIRLOCK_CREDENTIAL_EXPORT=true. Every such read is recorded.",
    )


def credentials_out(cred: Credential, secret: dict[str, Any] | None = None) -> CredentialsOut:
    account = {k: v for k, v in (cred.account or {}).items() if k in AccountOut.model_fields}
    return CredentialsOut(
        sessionId=cred.session_id,
        provider=cred.provider,
        account=AccountOut(**account),
        scopes=list(cred.scopes or []),
        plan=cred.plan,
        expiresAt=cred.expires_at,
        capturedAt=cred.captured_at,
        injected=injected_out(cred),
        secret=secret,
    )


class TimelineEntry(_Out):
    at: UtcTime
    kind: str = Field(examples=["session", "vm", "credential", "egress"])
    from_: str | None = Field(alias="from")
    to: str | None
    cause: str
    actor: str


class EgressTimelineEntry(TimelineEntry):
    """An ``egress`` entry: one per host the policy denied (or learn mode let through)."""

    host: str = Field(description="host:port")
    count: int | None = Field(description="Connections to that host so far.")


def timeline_out(
    events: list[Event], egress_counts: dict[tuple[str, int, str], int] | None = None
) -> list[TimelineEntry]:
    """``egress_counts``: (host, port, decision) -> count, merged into the egress entries."""
    counts = egress_counts or {}
    out: list[TimelineEntry] = []
    for e in events:
        common: dict[str, Any] = {
            "at": e.at,
            "kind": e.kind,
            "from_": e.from_state,
            "to": e.to_state,
            "cause": e.cause,
            "actor": e.actor,
        }
        if e.kind != "egress":
            out.append(TimelineEntry(**common))
            continue
        name, port = str(e.detail.get("host", "")), int(e.detail.get("port", 0))
        count = counts.get((name, port, e.cause))
        out.append(EgressTimelineEntry(**common, host=f"{name}:{port}", count=count))
    return out


# --- egress -------------------------------------------------------------------------------
class EgressHostOut(_Out):
    host: str
    port: int
    decision: str = Field(
        examples=["denied"],
        description="denied: the page missed it; noise: the browser's own background traffic, "
        "denied quietly; learned: let through by learn mode; allowed (learn mode only).",
    )
    count: int
    first_at: UtcTime = Field(alias="firstAt")
    last_at: UtcTime = Field(alias="lastAt")


class EgressOut(_Out):
    session_id: str = Field(alias="sessionId")
    provider: str
    learn: bool = Field(description="The provider's policy is in learn mode.")
    denied: list[EgressHostOut] = Field(description="What the page was denied, first first.")
    noise: list[EgressHostOut] = Field(description="The browser's own traffic, denied quietly.")
    learned: list[EgressHostOut] = Field(description="Learn mode: outside the policy, let through.")


def egress_out(session: AuthSession, rows: list[EgressHost], *, learn: bool) -> EgressOut:
    def of(decision: str) -> list[EgressHostOut]:
        return [
            EgressHostOut(
                host=r.host,
                port=r.port,
                decision=r.decision,
                count=r.count,
                first_at=r.first_at,
                last_at=r.last_at,
            )
            for r in rows
            if r.decision == decision
        ]

    return EgressOut(
        session_id=session.id,
        provider=session.provider,
        learn=learn,
        denied=of("denied"),
        noise=of("noise"),
        learned=of("learned"),
    )


# --- providers ----------------------------------------------------------------------------
class ProviderOut(_Out):
    id: str
    name: str
    available: bool
    reason: str | None = Field(None, description="Why it is not available (absent if it is).")
    accounts: str | None = Field(
        None, description="Which accounts can log in, where the vendor limits that."
    )
