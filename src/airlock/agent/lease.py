"""The lease: the moment, on this VM's monotonic clock, at which it ends itself unless a
controller renews it first. Monotonic, so a wall-clock jump in the guest or on the host
neither kills it early nor keeps it alive. Standard library only."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Any

from airlock.agent.oparg import OpError

log = logging.getLogger("airlock.agent")

LEASE_FILE = "agent.lease"  # in the state dir: the boot lease, {"for_ms": n, "margin_ms": n}
MAX_LEASE_MS = 24 * 3600 * 1000


def lease_args(message: dict[str, Any]) -> tuple[int, int]:
    """``for_ms`` (1 ms to a day) and ``margin_ms`` (0 to a day, default 0), whole numbers."""

    def whole(name: str, minimum: int, default: int | None) -> int:
        value = message.get(name, default)
        if (
            isinstance(value, bool)
            or not isinstance(value, int)
            or not minimum <= value <= MAX_LEASE_MS
        ):
            raise OpError(
                "bad_request", f"{name} must be a whole number of ms, {minimum} to {MAX_LEASE_MS}"
            )
        return value

    return whole("for_ms", 1, None), whole("margin_ms", 0, 0)


def read_boot_lease(state_dir: Path) -> tuple[int, int] | None:
    """The lease the VM boots with, from ``agent.lease`` in the state dir (written by the
    runtime for browser VMs, or by the guest init from its config disk). A lease file it
    cannot read stops the agent: the VM would otherwise live forever."""
    path = state_dir / LEASE_FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    # Whatever the role: a browser VM whose image has no screen runs its agent as "cli"
    # (agent.guest), and it is leased all the same. The runtime leases only browser VMs.
    try:
        value = json.loads(raw)
        if not isinstance(value, dict):
            raise OpError("bad_request", "the lease must be a JSON object")
        return lease_args(value)
    except (ValueError, OpError) as exc:
        raise SystemExit(f"{LEASE_FILE} is not a lease: {exc}") from None


class Lease:
    """No end until ``set``; then ``run_out`` returns once the end passes with no renewal."""

    def __init__(self) -> None:
        self.end: float | None = None
        self._renewed = asyncio.Event()

    def set(self, for_ms: int, margin_ms: int) -> None:
        self.end = time.monotonic() + (for_ms + margin_ms) / 1000
        self._renewed.set()

    def ends_in_ms(self) -> int | None:
        if self.end is None:
            return None
        return max(0, round((self.end - time.monotonic()) * 1000))

    async def run_out(self) -> None:
        while True:
            assert self.end is not None
            remaining = self.end - time.monotonic()
            if remaining <= 0:
                return
            self._renewed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._renewed.wait(), remaining)
