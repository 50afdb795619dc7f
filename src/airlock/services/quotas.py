"""The quota check inside a start's transaction: lock, count, ask ``domain.quotas``, and
turn a refusal into the error the API answers (429 for the user's limits, 503 for a full
node, both with ``Retry-After``)."""

from __future__ import annotations

import logging
from datetime import timedelta

from airlock.clock import Clock
from airlock.domain.quotas import Limits, Refusal, Scope, StartKind, decide
from airlock.errors import AirlockError, TooManyRequests, Unavailable
from airlock.store.repo import Repo

log = logging.getLogger("airlock.quotas")


async def check(
    repo: Repo,
    kind: StartKind,
    *,
    user_id: str,
    limits: Limits,
    clock: Clock,
    login_timeout: timedelta,
) -> Refusal | None:
    """Take the quota locks (held until ``repo``'s transaction ends: the caller inserts
    its row in the same transaction), count, decide. The time is read once the locks are
    held: a start that waited for them behind others must not count from before their
    rows (its ``Retry-After`` came out a second past the 10-minute login deadline)."""
    await repo.lock_quota(user_id)
    now = clock.now()
    usage = await repo.quota_usage(user_id, now=now, login_timeout=login_timeout)
    refusal = decide(kind, usage, limits, now)
    if refusal is not None:
        log.info(
            "start refused: %s",
            refusal.code,
            extra={"user_id": user_id, "kind": kind, "scope": refusal.scope},
        )
    return refusal


def error(refusal: Refusal) -> AirlockError:
    cls = TooManyRequests if refusal.scope is Scope.USER else Unavailable
    return cls(refusal.message, code=refusal.code, retry_after=refusal.retry_after_s)
