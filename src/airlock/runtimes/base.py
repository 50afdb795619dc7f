"""The one protocol every VM runtime implements, and the values it passes around.

A runtime is told *what* to run (a ``VmSpec``) and answers with streams to the VM: the
guest agent's channel and the VM's VNC server. It never decides *when* a VM dies; the
services do, from durable deadlines. Each VM keeps a labelled state directory
``{vms_dir}/{vm_id}/`` so that a restarted controller finds what it started (``list``).
"""

from __future__ import annotations

import asyncio
import builtins
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

from airlock.domain.vms import VmRole

Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@dataclass(frozen=True, slots=True)
class VmSpec:
    """What to boot. ``egress_socket`` is a Unix socket on the host where the controller's
    egress proxy listens for this VM; the runtime carries it into the VM and the agent
    offers it on ``127.0.0.1:{EGRESS_PORT}`` inside.

    ``lease_ms`` (browser VMs): the boot lease. Unless a controller renews it (the agent's
    ``lease`` op), the VM ends itself ``lease_ms + lease_margin_ms`` after its agent
    starts; the runtime hands it to the agent as ``agent.lease``. None: no lease."""

    vm_id: str
    role: VmRole
    user_id: str
    screen: tuple[int, int] = (1280, 800)
    egress_socket: Path | None = None
    labels: dict[str, str] = field(default_factory=dict)
    lease_ms: int | None = None
    lease_margin_ms: int = 0

    @property
    def boot_lease(self) -> dict[str, int] | None:
        """The boot lease as the agent reads it (``agent.lease``), or None."""
        if self.lease_ms is None:
            return None
        return {"for_ms": self.lease_ms, "margin_ms": self.lease_margin_ms}


@dataclass(frozen=True, slots=True)
class RunningVm:
    """One VM the runtime really runs, as ``list()`` finds it (after a crash too)."""

    vm_id: str
    role: VmRole
    pid: int | None
    state_dir: Path
    detail: dict[str, str] = field(default_factory=dict)  # e.g. {"accel": "tcg"}


@runtime_checkable
class Runtime(Protocol):
    """A VM backend. Every method is safe to call again after a controller restart."""

    name: str

    async def create(self, spec: VmSpec) -> RunningVm:
        """Boot the VM and return once its guest agent answers. Raises RuntimeFailure;
        on failure it leaves nothing behind (the state dir is removed)."""
        ...

    async def destroy(self, vm_id: str) -> bool:
        """Stop the VM and remove every file it had. Idempotent: destroying a VM that is
        gone is success. Returns whether anything was still running."""
        ...

    async def list(self) -> list[RunningVm]:
        """What really runs now, found from state dirs and live processes, so a restarted
        controller can adopt its VMs and reap orphans. Raises RuntimeFailure when it
        cannot tell (the reconciler then does nothing that round)."""
        ...

    async def open_agent(self, vm_id: str) -> Stream:
        """A fresh, authenticated stream to the VM's guest agent (see ``agent.client``)."""
        ...

    async def open_vnc(self, vm_id: str) -> Stream:
        """A fresh stream to the VM's VNC server (RFB), for the controller's VNC proxy."""
        ...

    async def check(self) -> builtins.list[str]:
        """Problems that stop this runtime from working here (missing binaries, ...)."""
        ...
