"""Small helpers every part of ``Repo`` shares."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime

from sqlalchemy.ext.asyncio import AsyncSession


class Rows:
    """What each part of ``Repo`` works with: one transaction's session, whether it is
    PostgreSQL, and this controller's node."""

    session: AsyncSession
    postgres: bool
    node: str


def lock_key(name: str) -> int:
    """A stable signed 64-bit advisory-lock key for ``name`` (PostgreSQL's bigint)."""
    digest = hashlib.sha256(f"airlock-quota:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def aware(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value
