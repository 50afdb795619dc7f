"""The platform's identity: user JWTs from its identity provider, as bearer tokens.

Besides Airlock's own tokens (``services.tokens``), a deployment may trust the platform's
IdP (Supabase, Auth0, Keycloak, ...): a JWT it signed, for this audience, names the user in
one claim. Verification is PyJWT's (``jwt.decode``: signature, ``exp``/``nbf``/``iat`` with a
small leeway, ``iss``, ``aud``), with the algorithms pinned to an asymmetric list, so
``alg: none`` and an HS256 token "signed" with the public key never get as far as a key.

Keys come from the IdP's JWKS, fetched with httpx (never blocking the event loop, a few
seconds at most), cached, fetched again when the cache is old, and when a token names a
key id the cache does not hold (the IdP rotated its keys), at most once per
``refetch_interval`` so junk tokens cannot make Airlock hammer the IdP. A JWKS that cannot
be fetched or parsed is logged and answers 401; the keys held before stay in use.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import httpx
import jwt

from airlock.errors import InvalidInput, Unauthorized
from airlock.services.tokens import Principal, check_name

log = logging.getLogger("airlock.jwt")

FETCH_TIMEOUT_S = 5.0
MAX_JWKS_BYTES = 256 * 1024
MAX_TOKEN_CHARS = 16 * 1024


def looks_like_jwt(value: str) -> bool:
    """Three base64url parts: what a compact JWS looks like (Airlock's own start ``alk_``)."""
    return value.count(".") == 2 and not value.startswith("alk_")


@dataclass(frozen=True, slots=True)
class JwtConfig:
    jwks_url: str
    issuer: str
    audience: str
    user_claim: str = "sub"
    algorithms: tuple[str, ...] = ("RS256", "ES256")
    leeway: timedelta = timedelta(seconds=10)
    cache_for: timedelta = timedelta(minutes=5)
    refetch_interval: timedelta = timedelta(seconds=10)


class PlatformJwtVerifier:
    """Turns a platform JWT into a user ``Principal``; ``Unauthorized`` (401) otherwise."""

    def __init__(
        self,
        config: JwtConfig,
        *,
        http: httpx.AsyncClient | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self._http = http or httpx.AsyncClient(timeout=FETCH_TIMEOUT_S, trust_env=False)
        self._owns_http = http is None
        self._monotonic = monotonic
        self._keys: dict[str, jwt.PyJWK] = {}
        self._anonymous: list[jwt.PyJWK] = []  # keys without a kid
        self._fetched_at: float | None = None  # the last good fetch
        self._tried_at: float | None = None  # the last attempt, good or not
        self._lock = asyncio.Lock()
        self.fetches = 0

    async def close(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    async def authenticate(self, token: str) -> Principal:
        if len(token) > MAX_TOKEN_CHARS:
            raise Unauthorized("the bearer token is too long")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise Unauthorized("malformed bearer token") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.config.algorithms:
            # Before any key is looked at: "none", HS256 with the public key as the secret,
            # or anything else not pinned.
            raise Unauthorized(f"JWT algorithm {str(alg)[:20]!r} is not accepted")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise Unauthorized("malformed JWT key id")
        key = await self._key(kid)
        if key.algorithm_name != alg:
            raise Unauthorized(f"the JWT's key is not a {alg} key")
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key.key,
                algorithms=[alg],
                audience=self.config.audience,
                issuer=self.config.issuer,
                leeway=self.config.leeway,
                options={"require": ["exp", "iss", "aud"]},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthorized("the JWT has expired") from None
        except jwt.InvalidAudienceError:
            raise Unauthorized("the JWT is not for this audience") from None
        except jwt.InvalidIssuerError:
            raise Unauthorized("the JWT is from another issuer") from None
        except (jwt.PyJWTError, ValueError, TypeError) as exc:
            raise Unauthorized(f"invalid JWT: {type(exc).__name__}") from None
        user = claims.get(self.config.user_claim)
        if not isinstance(user, str):
            raise Unauthorized(f"the JWT has no {self.config.user_claim!r} claim naming a user")
        try:
            check_name(user)
        except InvalidInput:
            raise Unauthorized("the JWT's user is not a valid Airlock user id") from None
        return Principal("user", user, "jwt")

    async def _key(self, kid: str | None) -> jwt.PyJWK:
        """The key for ``kid``: from the cache while it is fresh; else (an old cache, or a
        key id it lacks) from a new fetch, at most once per ``refetch_interval``. A failed
        fetch leaves the cache as it was."""
        now = self._monotonic()
        found = self._find(kid)
        stale = (
            self._fetched_at is None
            or now - self._fetched_at > self.config.cache_for.total_seconds()
        )
        if (found is None or stale) and self._may_refetch(now):
            await self._refresh()
            found = self._find(kid)
        if found is None:
            raise Unauthorized("the JWT's signing key is not in the platform's JWKS")
        return found

    def _may_refetch(self, now: float) -> bool:
        return (
            self._tried_at is None
            or now - self._tried_at >= self.config.refetch_interval.total_seconds()
        )

    def _find(self, kid: str | None) -> jwt.PyJWK | None:
        if kid is not None:
            return self._keys.get(kid)
        candidates = [*self._keys.values(), *self._anonymous]
        return candidates[0] if len(candidates) == 1 else None  # no kid: only if unambiguous

    async def _refresh(self) -> None:
        """Fetch the JWKS once, however many requests wait for it (single flight)."""
        tried = self._tried_at
        async with self._lock:
            if self._tried_at != tried:
                return  # someone fetched while we waited
            self._tried_at = self._monotonic()
            self.fetches += 1
            try:
                async with asyncio.timeout(FETCH_TIMEOUT_S):  # in all, however slow the drip
                    keys = await self._fetch()
            except Exception as exc:
                log.warning("platform JWKS unusable, keeping %d key(s): %s", len(self._keys), exc)
                return
            self._keys = {k.key_id: k for k in keys if k.key_id}
            self._anonymous = [k for k in keys if not k.key_id]
            self._fetched_at = self._monotonic()
            log.info("platform JWKS fetched: %d key(s)", len(keys))

    async def _fetch(self) -> list[jwt.PyJWK]:
        body = bytearray()
        async with self._http.stream("GET", self.config.jwks_url) as response:
            if response.status_code != 200:
                raise ValueError(f"HTTP {response.status_code} from {self.config.jwks_url}")
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > MAX_JWKS_BYTES:
                    raise ValueError(f"the JWKS is larger than {MAX_JWKS_BYTES} bytes")
        data = json.loads(body)
        if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
            raise ValueError("the JWKS is not an object with a list of keys")
        keys = []
        for entry in data["keys"]:
            if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
                continue
            try:
                key = jwt.PyJWK(entry)
            except (jwt.PyJWTError, ValueError, TypeError, KeyError) as exc:
                log.info("JWKS key skipped: %s", exc)  # e.g. an algorithm we do not use
                continue
            if key.algorithm_name in self.config.algorithms or "alg" not in entry:
                keys.append(key)
        if not keys:
            raise ValueError("the JWKS has no usable signing key")
        return keys
