"""The demo IdP's signing keys: RSA keys made per process, published as a JWKS.

Its ``id_token`` s are RS256 JWTs signed with the newest key (``kid`` in the header), so a
platform that trusts the IdP verifies them against ``/.well-known/jwks.json``, as one does
with Supabase, Auth0 or Keycloak. ``rotate`` makes a new key and keeps the last few
published, the way real IdPs roll keys over; tests use it, and ``sign`` to mint tokens with
the claims they need (an expired one, another audience) from the IdP's real keys.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

PUBLISHED = 3  # keys in the JWKS: the current one and the two before it


@dataclass(frozen=True, slots=True)
class _Key:
    kid: str
    private: rsa.RSAPrivateKey


class SigningKeys:
    def __init__(self) -> None:
        self._keys: list[_Key] = []
        self.jwks_served = 0  # how often the JWKS was fetched (tests check caching with it)
        self.rotate()

    def rotate(self) -> str:
        """A new signing key; the oldest published one is dropped past ``PUBLISHED``."""
        key = _Key(
            "demo-" + secrets.token_hex(6),
            rsa.generate_private_key(public_exponent=65537, key_size=2048),
        )
        self._keys = [key, *self._keys][:PUBLISHED]
        return key.kid

    @property
    def kid(self) -> str:
        return self._keys[0].kid

    def sign(self, claims: dict[str, Any], *, headers: dict[str, Any] | None = None) -> str:
        """An RS256 JWT of ``claims`` with the current key."""
        key = self._keys[0]
        return jwt.encode(
            claims, key.private, algorithm="RS256", headers={"kid": key.kid, **(headers or {})}
        )

    def jwks(self) -> dict[str, Any]:
        keys = []
        for key in self._keys:
            jwk = RSAAlgorithm.to_jwk(key.private.public_key(), as_dict=True)
            keys.append({**jwk, "kid": key.kid, "use": "sig", "alg": "RS256"})
        return {"keys": keys}
