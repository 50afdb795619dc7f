"""A token bucket, as a pure function: the per-client request limit (``api.clients``).

A bucket holds up to ``burst`` tokens and refills at ``rate`` tokens a second; a request
takes one. Time is an argument (seconds on any monotonic clock), so the arithmetic is
tested without waiting.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Bucket:
    tokens: float
    at: float  # when ``tokens`` was true


def take(
    bucket: Bucket | None, *, now: float, rate: float, burst: float
) -> tuple[Bucket, int | None]:
    """The bucket after one request at ``now``, and ``None`` when the request may go
    ahead, else the whole seconds until a token is back (the answer's ``Retry-After``).
    A refused request takes nothing. ``None`` for a bucket: a client not seen lately
    (full)."""
    if bucket is None:
        tokens = burst
    else:
        tokens = min(burst, bucket.tokens + max(0.0, now - bucket.at) * rate)
    if tokens >= 1.0:
        return Bucket(tokens - 1.0, now), None
    return Bucket(tokens, now), max(1, math.ceil((1.0 - tokens) / rate))


def is_full(bucket: Bucket, *, now: float, rate: float, burst: float) -> bool:
    """A full bucket is the same as none: it may be forgotten."""
    return bucket.tokens + max(0.0, now - bucket.at) * rate >= burst
