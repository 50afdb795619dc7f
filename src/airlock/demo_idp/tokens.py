"""The demo IdP's token store: codes, access and refresh tokens, and the grants they belong to.

A *grant* is one sign-in of the user into the client: the code it starts with, and every
access and refresh token exchanged for it since. Refresh tokens rotate: each refresh returns
a new one and retires the old; a retired one that comes back means someone kept a copy, so
the whole grant is revoked (RFC 9700 4.14.2, as Auth0 and Okta do). A replayed code revokes
its grant too (RFC 6749 4.1.2).

Each grant keeps counters (refreshes accepted and refused, retired refresh tokens seen
again) and why and when it was revoked, for the admin routes the tests read (``demo_idp.app``),
and an operator can revoke a grant there, as a vendor's "sign out everywhere" does. RFC 7662
introspection answers whether a token is still active without using it up: Airlock's
scheduled check asks it about the refresh token a CLI VM holds.
"""

from __future__ import annotations

import hmac
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

CODE_TTL = 60.0
ACCESS_TTL = 3600
REFRESH_TTL = 30 * 24 * 3600
MAX_ENTRIES = 10_000  # per table: the demo's memory stays bounded whatever callers do
SCOPES_SUPPORTED = ("openid", "profile", "email", "offline_access")

_VERIFIER = re.compile(r"[A-Za-z0-9._~-]{43,128}")  # RFC 7636 4.1

T = TypeVar("T")


class Expiring(Generic[T]):
    """A dict whose entries expire and whose size is capped (oldest go first)."""

    def __init__(self, clock: Callable[[], float], max_entries: int = MAX_ENTRIES) -> None:
        self._clock = clock
        self._max = max_entries
        self._items: dict[str, tuple[float, T]] = {}

    def put(self, key: str, value: T, ttl: float) -> None:
        now = self._clock()
        for old in [k for k, (expires, _) in self._items.items() if expires <= now]:
            del self._items[old]
        self._items.pop(key, None)  # a put again is the newest, not evicted first
        while len(self._items) >= self._max:
            del self._items[next(iter(self._items))]
        self._items[key] = (now + ttl, value)

    def get(self, key: str) -> T | None:
        item = self._items.get(key)
        if item is None:
            return None
        if item[0] <= self._clock():
            del self._items[key]
            return None
        return item[1]

    def pop(self, key: str) -> T | None:
        value = self.get(key)
        self._items.pop(key, None)
        return value

    def expires_at(self, key: str) -> float | None:
        item = self._items.get(key)
        return item[0] if item is not None and item[0] > self._clock() else None

    def values(self) -> list[T]:
        now = self._clock()
        return [value for expires, value in self._items.values() if expires > now]

    def __len__(self) -> int:
        return len(self._items)


class OAuthError(Exception):
    """An RFC 6749 5.2 error response from the token endpoint."""

    def __init__(self, error: str, description: str, status: int = 400) -> None:
        super().__init__(description)
        self.error = error
        self.description = description
        self.status = status


@dataclass(frozen=True, slots=True)
class Code:
    client_id: str
    redirect_uri: str
    code_challenge: str
    scope: str
    nonce: str | None
    grant: str


@dataclass(frozen=True, slots=True)
class Token:
    client_id: str
    scope: str
    grant: str


@dataclass(slots=True)
class Grant:
    """One sign-in and what became of it; no token values."""

    id: str
    client_id: str
    created_at: float
    refreshes_accepted: int = 0
    refreshes_refused: int = 0
    reused_refresh_tokens: int = 0  # retired refresh tokens presented again
    revoked_at: float | None = None
    revoked_reason: str | None = None  # refresh_token_reuse, code_replay, admin

    def to_json(self) -> dict[str, Any]:
        return {
            "grant": self.id,
            "clientId": self.client_id,
            "createdAt": self.created_at,
            "refreshesAccepted": self.refreshes_accepted,
            "refreshesRefused": self.refreshes_refused,
            "reusedRefreshTokens": self.reused_refresh_tokens,
            "revoked": self.revoked_at is not None,
            "revokedAt": self.revoked_at,
            "revokedReason": self.revoked_reason,
        }


IdTokenSigner = Callable[[str, str, str | None, int], str]  # client, grant, nonce, now


class TokenStore:
    """Everything about tokens the server remembers, each table bounded and expiring."""

    def __init__(
        self,
        clock: Callable[[], float],
        sign_id_token: IdTokenSigner,
        *,
        access_ttl: int = ACCESS_TTL,
        refresh_ttl: int = REFRESH_TTL,
    ) -> None:
        self._clock = clock
        self._sign_id_token = sign_id_token
        self.access_ttl = access_ttl
        self.refresh_ttl = refresh_ttl
        self.codes = Expiring[Code](clock)
        self.used_codes = Expiring[str](clock)  # code -> grant, to revoke on replay
        self.access_tokens = Expiring[Token](clock)
        self.refresh_tokens = Expiring[Token](clock)
        self.rotated = Expiring[str](clock)  # a retired refresh token -> grant
        self.grants = Expiring[Grant](clock)
        # Totals over every grant, kept when a grant's record expires.
        self.totals = {"refreshesAccepted": 0, "refreshesRefused": 0, "reusedRefreshTokens": 0}

    # --- codes and tokens -------------------------------------------------------------
    def new_code(
        self, client_id: str, redirect_uri: str, code_challenge: str, scope: str, nonce: str | None
    ) -> str:
        """A code for a user who just signed in: the start of a new grant."""
        code = secrets.token_urlsafe(32)
        grant = secrets.token_urlsafe(12)
        self.codes.put(
            code, Code(client_id, redirect_uri, code_challenge, scope, nonce, grant), CODE_TTL
        )
        return code

    def exchange_code(
        self, form: dict[str, str], challenge_of: Callable[[str], str]
    ) -> dict[str, Any]:
        code_value = required(form, "code")
        redirect_uri = required(form, "redirect_uri")
        verifier = required(form, "code_verifier")
        code = self.codes.pop(code_value)  # single use, whatever happens next
        if code is None:
            replayed = self.used_codes.get(code_value)
            if replayed is not None:
                self.revoke(replayed, "code_replay")
                raise OAuthError("invalid_grant", "authorization code already used")
            raise OAuthError("invalid_grant", "authorization code unknown or expired")
        self.used_codes.put(code_value, code.grant, self.refresh_ttl)
        if code.client_id != form["client_id"]:
            raise OAuthError("invalid_grant", "code was issued to another client")
        if code.redirect_uri != redirect_uri:
            raise OAuthError("invalid_grant", "redirect_uri does not match the authorization")
        if not _VERIFIER.fullmatch(verifier):
            raise OAuthError("invalid_request", "code_verifier is malformed")
        if not hmac.compare_digest(challenge_of(verifier), code.code_challenge):
            raise OAuthError("invalid_grant", "code_verifier does not match code_challenge")
        self.grants.put(
            code.grant, Grant(code.grant, code.client_id, self._clock()), self.refresh_ttl
        )
        return self._issue(code.client_id, code.scope, code.grant, code.nonce)

    def refresh(
        self, form: dict[str, str], normalise_scope: Callable[[str], str | None]
    ) -> dict[str, Any]:
        value = required(form, "refresh_token")
        current = self.refresh_tokens.get(value)
        if current is None:
            replayed = self.rotated.get(value)
            if replayed is not None:  # a retired token came back: someone has a copy
                self._count(replayed, "reusedRefreshTokens")
                self._count(replayed, "refreshesRefused")
                self.revoke(replayed, "refresh_token_reuse")
                raise OAuthError("invalid_grant", "refresh token already used")
            raise OAuthError("invalid_grant", "refresh token unknown or expired")
        if self.revoked(current.grant):
            self._count(current.grant, "refreshesRefused")
            raise OAuthError("invalid_grant", "this grant has been revoked")
        if current.client_id != form["client_id"]:
            raise OAuthError("invalid_grant", "refresh token was issued to another client")
        scope = current.scope
        if "scope" in form:
            asked = normalise_scope(form["scope"])
            if asked is None or not set(asked.split()) <= set(current.scope.split()):
                raise OAuthError("invalid_scope", "a refresh cannot widen the scope")
            scope = asked
        self.refresh_tokens.pop(value)
        self.rotated.put(value, current.grant, self.refresh_ttl)
        self._count(current.grant, "refreshesAccepted")
        return self._issue(current.client_id, scope, current.grant, None)

    def _issue(self, client: str, scope: str, grant: str, nonce: str | None) -> dict[str, Any]:
        now = int(self._clock())
        access_token = secrets.token_urlsafe(32)
        refresh_token = secrets.token_urlsafe(48)
        self.access_tokens.put(access_token, Token(client, scope, grant), self.access_ttl)
        self.refresh_tokens.put(refresh_token, Token(client, scope, grant), self.refresh_ttl)
        record = self.grants.get(grant)
        if record is not None:  # a grant lives as long as its newest refresh token
            self.grants.put(grant, record, self.refresh_ttl)
        body: dict[str, Any] = {
            "access_token": access_token,
            "token_type": "Bearer",
            "expires_in": self.access_ttl,
            "refresh_token": refresh_token,
            # Not in RFC 6749, but common (GitHub, Azure AD): when the refresh token ends.
            "refresh_token_expires_in": self.refresh_ttl,
            "scope": scope,
        }
        if "openid" in scope.split():
            body["id_token"] = self._sign_id_token(client, grant, nonce, now)
        return body

    def access_grant(self, value: str) -> str | None:
        """The grant of a live access token whose grant is not revoked, else None."""
        record = self.access_tokens.get(value)
        if record is None or self.revoked(record.grant):
            return None
        return record.grant

    def introspect(self, form: dict[str, str]) -> dict[str, Any]:
        """RFC 7662 2.2: whether ``token`` is active, without using it. A public client
        names itself and may ask only about its own tokens."""
        value = required(form, "token")
        hint = form.get("token_type_hint")
        tables = [("refresh_token", self.refresh_tokens), ("access_token", self.access_tokens)]
        if hint == "access_token":
            tables.reverse()
        for kind, table in tables:
            record = table.get(value)
            if record is None:
                continue
            if record.client_id != form["client_id"] or self.revoked(record.grant):
                return {"active": False}
            expires = table.expires_at(value)
            return {
                "active": True,
                "token_type": kind,
                "client_id": record.client_id,
                "scope": record.scope,
                "exp": int(expires) if expires is not None else None,
                "sid": record.grant,
            }
        return {"active": False}

    # --- grants ------------------------------------------------------------------------
    def revoked(self, grant: str) -> bool:
        record = self.grants.get(grant)
        return record is not None and record.revoked_at is not None

    def revoke(self, grant: str, reason: str) -> Grant | None:
        """Every token of ``grant`` stops working; the first reason is kept."""
        record = self.grants.get(grant)
        if record is None:
            return None
        if record.revoked_at is None:
            record.revoked_at, record.revoked_reason = self._clock(), reason
        return record

    def _count(self, grant: str, counter: str) -> None:
        self.totals[counter] += 1
        record = self.grants.get(grant)
        if record is None:
            return
        if counter == "refreshesAccepted":
            record.refreshes_accepted += 1
        elif counter == "refreshesRefused":
            record.refreshes_refused += 1
        else:
            record.reused_refresh_tokens += 1


def required(form: dict[str, str], name: str) -> str:
    value = form.get(name)
    if not value:
        raise OAuthError("invalid_request", f"{name} is required")
    return value
