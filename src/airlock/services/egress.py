"""One egress proxy per live browser VM, listening on a Unix socket in the VM's state dir.

The socket lives inside the directory the runtime binds into the VM, so a restarted
controller can bind a fresh socket at the same path and the running VM sees it.
"""

from __future__ import annotations

import logging
from pathlib import Path

from airlock.egress import EgressProxy
from airlock.providers.base import Route

log = logging.getLogger("airlock.egress")


class EgressManager:
    def __init__(self) -> None:
        self._proxies: dict[str, EgressProxy] = {}

    async def start(self, vm_id: str, socket_path: Path, routes: list[Route]) -> None:
        await self.stop(vm_id)
        proxy = EgressProxy(routes, vm_id=vm_id)
        await proxy.serve(socket_path)
        self._proxies[vm_id] = proxy

    async def stop(self, vm_id: str) -> None:
        proxy = self._proxies.pop(vm_id, None)
        if proxy is not None:
            await proxy.close()

    def __contains__(self, vm_id: str) -> bool:
        return vm_id in self._proxies

    async def close(self) -> None:
        for vm_id in list(self._proxies):
            await self.stop(vm_id)
