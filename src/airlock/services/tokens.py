"""API tokens: created by the CLI, shown once, kept as SHA-256 hashes.

A *user* token acts as its user; a *service* token (a trusted backend) acts for any user it
names. ``Principal.user_for`` is the one place that turns "who asks, for whom" into the
user whose things are read, so the identity rules of ``http-api.md`` live in one function.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from typing import Literal

from airlock.clock import Clock
from airlock.errors import Forbidden, InvalidInput, NotFound, Unauthorized
from airlock.store.db import Database
from airlock.store.tables import Token

TokenKind = Literal["user", "service"]
PREFIX = "alk_"
NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,127}"
_NAME = re.compile(NAME_PATTERN)  # fullmatch: "$" with match would take "alice\n"


def hash_token(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def check_name(name: str, what: str = "user id") -> str:
    if not _NAME.fullmatch(name):
        raise InvalidInput(
            f"invalid {what} {name[:40]!r}: use 1-128 letters, digits, '_', '.', '@' or '-'",
            code="invalid_name",
        )
    return name


@dataclass(frozen=True, slots=True)
class Principal:
    kind: TokenKind
    subject: str
    token_id: str

    @property
    def actor(self) -> str:
        return f"{self.kind}:{self.subject}"

    @property
    def is_service(self) -> bool:
        return self.kind == "service"

    def user_for(self, requested: str | None, *, required: bool = True) -> str | None:
        """The user this request acts for. A user token may only name itself (403
        otherwise); a service token names any user (and must, where ``required``)."""
        if self.kind == "user":
            if requested is not None and requested != self.subject:
                raise Forbidden("a user token cannot act for another user")
            return self.subject
        if requested is None:
            if required:
                raise InvalidInput("a service token must name userId", code="user_required")
            return None
        return check_name(requested)


@dataclass(frozen=True, slots=True)
class IssuedToken:
    token: Token
    value: str


class TokenService:
    def __init__(self, db: Database, clock: Clock) -> None:
        self.db = db
        self.clock = clock

    async def create(self, kind: TokenKind, subject: str, *, actor: str = "cli") -> IssuedToken:
        check_name(subject, "user id" if kind == "user" else "service name")
        value = PREFIX + secrets.token_urlsafe(32)
        now = self.clock.now()
        token = Token(
            id=secrets.token_hex(6),
            kind=kind,
            subject=subject,
            token_hash=hash_token(value),
            created_at=now,
            revoked_at=None,
        )
        async with self.db.transaction() as repo:
            repo.add_token(token)
            repo.add_event(
                at=now,
                kind="token",
                subject_id=token.id,
                cause="created",
                actor=actor,
                detail={"token_kind": kind, "subject": subject},
            )
        return IssuedToken(token, value)

    async def rotate(self, kind: TokenKind, subject: str, *, actor: str) -> IssuedToken:
        """A new token for ``subject``; every earlier one that ``actor`` created is revoked
        in the same transaction. ``serve --demo`` keeps one demo token this way: the one
        printed at the last start works, none printed before it does."""
        issued = await self.create(kind, subject, actor=actor)
        now = self.clock.now()
        async with self.db.transaction() as repo:
            for old in await repo.live_tokens_created_by(actor):
                if old.id != issued.token.id:
                    old.revoked_at = now
                    repo.add_event(
                        at=now, kind="token", subject_id=old.id, cause="revoked", actor=actor
                    )
        return issued

    async def list(self) -> list[Token]:
        async with self.db.read() as repo:
            return await repo.tokens()

    async def revoke(self, token_id: str) -> Token:
        now = self.clock.now()
        async with self.db.transaction() as repo:
            token = await repo.token(token_id)
            if token is None:
                raise NotFound(f"no token {token_id!r}", code="token_not_found")
            if token.revoked_at is None:
                token.revoked_at = now
                repo.add_event(
                    at=now, kind="token", subject_id=token.id, cause="revoked", actor="cli"
                )
            return token

    async def authenticate(self, value: str | None) -> Principal:
        if not value or not value.startswith(PREFIX) or len(value) > 200:
            raise Unauthorized("missing or malformed bearer token")
        digest = hash_token(value)
        async with self.db.read() as repo:
            token = await repo.token_by_hash(digest)
        if (
            token is None
            or token.revoked_at is not None
            or not hmac.compare_digest(token.token_hash, digest)
        ):
            raise Unauthorized("unknown or revoked token")
        kind: TokenKind = "service" if token.kind == "service" else "user"
        return Principal(kind, token.subject, token.id)
