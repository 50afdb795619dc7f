"""What routes depend on: the controller's ``Core``, the caller (a ``Principal`` from the
bearer token), and the viewer-token signer that ``novncURL`` carries.

Identity rules live in ``services.tokens.Principal.user_for``; this module only turns the
``Authorization`` header into a principal (401 when it is missing or unknown).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import time
from pathlib import Path
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from airlock.services.core import Core
from airlock.services.tokens import Principal

_bearer = HTTPBearer(auto_error=False, description="An Airlock API token (alk_...).")

VIEWER_TOKEN_TTL_S = 15 * 60


def get_core(request: Request) -> Core:
    core = getattr(request.app.state, "core", None)
    if not isinstance(core, Core):
        raise RuntimeError("the app's lifespan has not started: no Core on app.state")
    return core


def get_viewer_signer(request: Request) -> ViewerSigner:
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
    return await core.tokens.authenticate(credentials.credentials if credentials else None)


PrincipalDep = Annotated[Principal, Depends(get_principal)]


class ViewerSigner:
    """Short-lived viewer tokens: ``{expiry}.{hmac}`` over (session id, VM id, expiry),
    keyed by ``viewer.key`` in the data dir (32 random bytes, created 0600). A token opens
    one session's viewer, for one VM, until it expires; nothing else accepts it."""

    def __init__(self, key: bytes, ttl_s: int = VIEWER_TOKEN_TTL_S) -> None:
        self._key = key
        self.ttl_s = ttl_s

    @classmethod
    def open(cls, path: Path) -> ViewerSigner:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "wb") as f:
                f.write(secrets.token_bytes(32))
        key = path.read_bytes()
        if len(key) != 32:
            raise RuntimeError(f"{path} must hold 32 bytes; delete it to make a new one")
        return cls(key)

    def _mac(self, session_id: str, vm_id: str, expiry: int) -> str:
        msg = f"viewer:{session_id}:{vm_id}:{expiry}".encode()
        digest = hmac.new(self._key, msg, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()

    def mint(self, session_id: str, vm_id: str, *, now: float | None = None) -> str:
        expiry = int(now if now is not None else time.time()) + self.ttl_s
        return f"{expiry}.{self._mac(session_id, vm_id, expiry)}"

    def verify(self, token: str, session_id: str, vm_id: str, *, now: float | None = None) -> bool:
        expiry_text, _, mac = token.partition(".")
        if not expiry_text.isdigit() or len(expiry_text) > 12 or not mac:
            return False
        expiry = int(expiry_text)
        if expiry < (now if now is not None else time.time()):
            return False
        return hmac.compare_digest(mac, self._mac(session_id, vm_id, expiry))


SignerDep = Annotated[ViewerSigner, Depends(get_viewer_signer)]
