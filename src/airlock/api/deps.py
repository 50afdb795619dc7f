"""What routes depend on: the controller's ``Core``, the caller (a ``Principal`` from the
bearer token), and the viewer tokens that ``novncURL`` carries (``ViewerSigner``,
``verify_viewer_token``).

Identity rules live in ``services.tokens.Principal.user_for``; this module only turns the
``Authorization`` header into a principal (401 when it is missing or unknown).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.requests import HTTPConnection

from airlock.api.schemas import VIEWABLE
from airlock.domain.vms import VmState
from airlock.errors import InvalidInput, NotFound, Unauthorized
from airlock.services.core import Core
from airlock.services.platform_jwt import looks_like_jwt
from airlock.services.tokens import Principal
from airlock.vault import Vault

_bearer = HTTPBearer(
    auto_error=False,
    description="An Airlock API token (alk_...), or a user JWT of the platform's identity "
    "provider where AIRLOCK_JWT_JWKS_URL is set.",
)

VIEWER_KEY_LABEL = "airlock viewer-token v1"


def get_core(request: HTTPConnection) -> Core:
    core = getattr(request.app.state, "core", None)
    if not isinstance(core, Core):
        raise RuntimeError("the app's lifespan has not started: no Core on app.state")
    return core


def get_viewer_signer(request: HTTPConnection) -> ViewerSigner:
    signer = getattr(request.app.state, "viewer_signer", None)
    if not isinstance(signer, ViewerSigner):
        raise RuntimeError("the app's lifespan has not started: no viewer signer")
    return signer


CoreDep = Annotated[Core, Depends(get_core)]


async def get_principal(
    core: CoreDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    """The caller; ``Unauthorized`` (401) when the token is missing, malformed or unknown."""
    return await authenticate_bearer(core, credentials.credentials if credentials else None)


async def authenticate_bearer(core: Core, value: str | None) -> Principal:
    """An Airlock token (``alk_...``), or, where the platform's IdP is trusted
    (``AIRLOCK_JWT_JWKS_URL``), one of its user JWTs: either way a user principal whose
    user id the same identity rules apply to."""
    if value and core.platform_jwt is not None and looks_like_jwt(value):
        return await core.platform_jwt.authenticate(value)
    return await core.tokens.authenticate(value)


PrincipalDep = Annotated[Principal, Depends(get_principal)]


@dataclass(frozen=True, slots=True)
class ViewerClaims:
    """What a valid viewer token grants: this session's viewer, on this VM, until
    ``expires_at``; with ``view_only`` the VNC proxy drops every input message."""

    session_id: str
    vm_id: str
    view_only: bool
    expires_at: datetime


class ViewerSigner:
    """Short-lived viewer tokens: ``{expiry ms}.{mode}.{hmac}``, the HMAC-SHA256 over
    (session id, VM id, expiry, mode), mode ``f`` (full) or ``v`` (view-only).

    The keys are derived from the vault's key file (``Vault.derive``) at every mint and
    verify, not once at start: the vault reloads a replaced key file, so ``airlock vault
    rotate`` reaches a running controller's viewer tokens at once (a token signed with a
    key the rotation dropped stops opening the viewer). Controllers sharing one database
    and key file verify each other's tokens. The current key signs; every key verifies
    (tokens minted before a rotation stay valid until they expire or their key is
    dropped). A token carries no user: it opens one session's viewer, for one VM, until
    it expires, and nothing else accepts it, so no route can trade it for a fresh one."""

    def __init__(self, vault: Vault, ttl: timedelta) -> None:
        self._vault = vault
        self.ttl = ttl
        if any(len(k) < 32 for k in self._keys()):
            raise ValueError("viewer tokens need 256-bit keys")

    @classmethod
    def from_vault(cls, vault: Vault, ttl: timedelta) -> ViewerSigner:
        return cls(vault, ttl)

    def _keys(self) -> list[bytes]:
        return self._vault.derive(VIEWER_KEY_LABEL)

    def _mac(self, key: bytes, session_id: str, vm_id: str, expiry: int, mode: str) -> str:
        msg = f"viewer:{session_id}:{vm_id}:{expiry}:{mode}".encode()
        digest = hmac.new(key, msg, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()

    def mint(self, session_id: str, vm_id: str, *, now: datetime, view_only: bool = False) -> str:
        expiry = _ms(now + self.ttl)
        mode = "v" if view_only else "f"
        return f"{expiry}.{mode}.{self._mac(self._keys()[0], session_id, vm_id, expiry, mode)}"

    def verify(self, token: str, session_id: str, vm_id: str, *, now: datetime) -> ViewerClaims:
        """The token's claims; ``Unauthorized`` when it is malformed, forged, for another
        session or VM (all the same answer), or expired (checked after the signature, so
        only a genuine token learns that it expired)."""
        expiry_text, mode, mac = _split(token)
        expiry = int(expiry_text)
        if not any(
            hmac.compare_digest(mac, self._mac(key, session_id, vm_id, expiry, mode))
            for key in self._keys()
        ):
            raise Unauthorized("invalid viewer token", code="invalid_viewer_token")
        if expiry <= _ms(now):
            raise Unauthorized(
                "the viewer token has expired: open the viewer again from the session",
                code="viewer_token_expired",
            )
        expires_at = datetime.fromtimestamp(expiry / 1000, UTC)
        return ViewerClaims(session_id, vm_id, mode == "v", expires_at)


def _ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


# ASCII digits only (str.isdigit takes "²", which int() refuses), a mode, a base64url MAC.
_TOKEN = re.compile(r"([0-9]{1,15})\.([fv])\.([A-Za-z0-9_-]{40,48})")
MAX_VIEWER_TOKEN = 256


def _split(token: str) -> tuple[str, str, str]:
    match = _TOKEN.fullmatch(token) if len(token) <= MAX_VIEWER_TOKEN else None
    if match is None:
        raise Unauthorized("invalid viewer token", code="invalid_viewer_token")
    return match.group(1), match.group(2), match.group(3)


async def verify_viewer_token(
    core: Core, signer: ViewerSigner, session_id: str, token: str | None
) -> ViewerClaims:
    """What the viewer page and the VNC socket call first: the claims of ``token`` for
    ``session_id``. ``Unauthorized`` (401) when the token is missing, malformed, forged,
    for another session or VM, or expired; ``NotFound`` (404) when the session does not
    exist or its VM can no longer be viewed (destroying, destroyed, lost, retained): a
    token never outlives its VM."""
    if not token:
        raise Unauthorized("a viewer token is required (?token=)", code="invalid_viewer_token")
    _split(token)  # a malformed token is refused before any database read
    try:
        session, vm = await core.sessions.get(session_id, None)
    except (NotFound, InvalidInput):
        raise Unauthorized("invalid viewer token", code="invalid_viewer_token") from None
    if session.vm_id is None:
        raise Unauthorized("invalid viewer token", code="invalid_viewer_token")
    claims = signer.verify(token, session.id, session.vm_id, now=core.clock.now())
    if vm is None or VmState(vm.state) not in VIEWABLE:
        state = vm.state if vm is not None else "gone"
        raise NotFound(
            f"the browser VM of session {session_id} is {state}: nothing to view",
            code="vm_not_viewable",
        )
    return claims


SignerDep = Annotated[ViewerSigner, Depends(get_viewer_signer)]
