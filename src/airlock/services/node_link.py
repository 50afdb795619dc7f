"""The internal link between the nodes of a cluster, and the runtime every route uses.

Every route works on every controller: what needs a VM (its VNC server, its guest agent,
its destroy) is relayed to the node that holds it. The controller that got the request
opens the stream on the holder over a WebSocket to the holder's internal URL
(``/internal/vms/{vmId}/{vnc|agent}``) and hands the caller an ordinary stream pair, so the
VNC proxy, the handoff and the CLI check do not know whether the VM is here or there.

The link is authenticated with a *node credential*, never a user's token: ``{node}.{expiry
ms}.{mac}``, the HMAC-SHA256 over (node, purpose, expiry) with a key derived from the
cluster's one vault key file (``Vault.derive``), where the purpose names the VM and what
is asked of it (``vnc:vm-..``, ``agent:vm-..``, ``destroy:vm-..``). It lives for
``CREDENTIAL_TTL``; the holder also checks that the node it names is registered. A peer
without the cluster's key cannot mint one; a captured one opens that VM's stream only,
for a minute.
"""

from __future__ import annotations

import asyncio
import base64
import builtins
import contextlib
import hashlib
import hmac
import logging
import re
import socket
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta

import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException

from airlock.aio import TaskOwner
from airlock.clock import Clock
from airlock.errors import RuntimeFailure, Unauthorized
from airlock.runtimes.base import RunningVm, Runtime, Stream, VmSpec
from airlock.store.db import Database
from airlock.vault import Vault

log = logging.getLogger("airlock.node_link")

NODE_KEY_LABEL = "airlock node-link v1"
CREDENTIAL_TTL = timedelta(seconds=60)
CONNECT_TIMEOUT_S = 10.0
CHUNK = 256 * 1024
MAX_FRAME = 4 * 1024 * 1024
KINDS = ("vnc", "agent")

_CREDENTIAL = re.compile(r"([A-Za-z0-9][A-Za-z0-9_.@-]{0,127})\.([0-9]{1,15})\.([A-Za-z0-9_-]{43})")


class NodeCredentials:
    """Mints and checks node credentials with the cluster key (see the module doc)."""

    def __init__(self, vault: Vault, node: str, clock: Clock) -> None:
        self._vault = vault
        self.node = node
        self.clock = clock

    def _mac(self, key: bytes, node: str, purpose: str, expiry: int) -> str:
        msg = f"node-link:{node}:{purpose}:{expiry}".encode()
        digest = hmac.new(key, msg, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()

    def mint(self, purpose: str) -> str:
        expiry = _ms(self.clock.now() + CREDENTIAL_TTL)
        key = self._vault.derive(NODE_KEY_LABEL)[0]
        return f"{self.node}.{expiry}.{self._mac(key, self.node, purpose, expiry)}"

    def verify(self, value: str | None, purpose: str) -> str:
        """The node that minted ``value`` for ``purpose``; ``Unauthorized`` for anything
        else (missing, malformed, forged, for another purpose, expired)."""
        match = _CREDENTIAL.fullmatch(value or "") if len(value or "") <= 256 else None
        if match is None:
            raise Unauthorized("a node credential is required", code="invalid_node_credential")
        node, expiry_text, mac = match.groups()
        expiry = int(expiry_text)
        if not any(
            hmac.compare_digest(mac, self._mac(key, node, purpose, expiry))
            for key in self._vault.derive(NODE_KEY_LABEL)
        ):
            raise Unauthorized("invalid node credential", code="invalid_node_credential")
        if expiry <= _ms(self.clock.now()):
            raise Unauthorized("the node credential has expired", code="invalid_node_credential")
        return node


def _ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def _ws_url(internal_url: str, path: str) -> str:
    base = internal_url.rstrip("/")
    if base.startswith("https://"):
        return "wss://" + base.removeprefix("https://") + path
    return "ws://" + base.removeprefix("http://") + path


class NodeLink:
    """The client side: streams to a VM on another node, and its remote destroy."""

    def __init__(self, credentials: NodeCredentials, tasks: TaskOwner) -> None:
        self.credentials = credentials
        self.tasks = tasks

    async def open_stream(self, internal_url: str, vm_id: str, kind: str) -> Stream:
        """A stream pair to ``kind`` of ``vm_id`` on the node at ``internal_url``: a local
        socket pair, one end handed back, the other pumped to the WebSocket by an owned
        task that ends when either side closes."""
        token = self.credentials.mint(f"{kind}:{vm_id}")
        url = _ws_url(internal_url, f"/internal/vms/{vm_id}/{kind}")
        try:
            ws = await connect(
                url,
                additional_headers={"Authorization": f"Bearer {token}"},
                compression=None,
                max_size=MAX_FRAME,
                open_timeout=CONNECT_TIMEOUT_S,
                ping_interval=None,
            )
        except InvalidStatus as exc:
            body = exc.response.body.decode(errors="replace")[:300] if exc.response.body else ""
            raise RuntimeFailure(
                f"the node holding {vm_id} refused its {kind} stream "
                f"({exc.response.status_code}): {body}"
            ) from None
        except (OSError, WebSocketException, TimeoutError) as exc:
            raise RuntimeFailure(
                f"the node holding {vm_id} ({internal_url}) cannot be reached: {exc}"
            ) from None
        ours, theirs = socket.socketpair()
        try:
            reader, writer = await asyncio.open_connection(sock=ours)
            far_reader, far_writer = await asyncio.open_connection(sock=theirs)
        except BaseException:
            ours.close()
            theirs.close()
            await ws.close()
            raise
        self.tasks.spawn(_pump(ws, far_reader, far_writer), name=f"relay:{kind}:{vm_id}")
        return reader, writer

    async def destroy(self, internal_url: str, vm_id: str, *, reason: str, actor: str) -> bool:
        """Ask the holder to destroy ``vm_id`` now; whether it did. Raises RuntimeFailure
        when the holder cannot be reached or refuses."""
        token = self.credentials.mint(f"destroy:{vm_id}")
        try:
            async with httpx.AsyncClient(timeout=CONNECT_TIMEOUT_S * 3) as client:
                answer = await client.post(
                    f"{internal_url.rstrip('/')}/internal/vms/{vm_id}/destroy",
                    json={"reason": reason, "actor": actor},
                    headers={"Authorization": f"Bearer {token}"},
                )
        except httpx.HTTPError as exc:
            raise RuntimeFailure(f"the node holding {vm_id} cannot be reached: {exc}") from None
        if answer.status_code != 200:
            raise RuntimeFailure(
                f"the node holding {vm_id} refused its destroy ({answer.status_code})"
            )
        return bool(answer.json().get("destroyed"))

    async def poke(self, internal_url: str) -> None:
        """Tell a node that a VM was placed on it (best effort: its boot queue also looks on
        a timer, so a lost poke only delays the boot)."""
        token = self.credentials.mint("boots")
        try:
            async with httpx.AsyncClient(timeout=CONNECT_TIMEOUT_S) as client:
                await client.post(
                    f"{internal_url.rstrip('/')}/internal/boots",
                    headers={"Authorization": f"Bearer {token}"},
                )
        except httpx.HTTPError as exc:
            log.info("poke of %s failed: %s", internal_url, exc)


async def _pump(
    ws: ClientConnection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    async def inbound() -> None:  # the far node -> our caller
        with contextlib.suppress(ConnectionClosed):
            async for message in ws:
                writer.write(message if isinstance(message, bytes) else message.encode())
                await writer.drain()

    async def outbound() -> None:  # our caller -> the far node
        while data := await reader.read(CHUNK):
            await ws.send(data)

    await splice_until_either_ends(inbound(), outbound())
    writer.close()
    with contextlib.suppress(Exception):
        await ws.close()
    with contextlib.suppress(Exception):
        await writer.wait_closed()


async def splice_until_either_ends(*directions: Awaitable[None]) -> None:
    """Run both directions of a relay; when one ends (or fails), cancel the other."""
    tasks = [asyncio.ensure_future(d) for d in directions]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class RoutedRuntime:
    """The local runtime, with streams routed to the node that holds the VM: a VM of this
    node (or one with no node, from before nodes existed) is opened here, any other
    through the node link. Create, destroy and list stay local: only the holder acts."""

    def __init__(
        self,
        local: Runtime,
        *,
        db: Database,
        link: NodeLink,
        node: str,
        internal_url: Callable[[str], Awaitable[str | None]],
    ) -> None:
        self.local = local
        self.name = local.name
        self.db = db
        self.link = link
        self.node = node
        self._internal_url = internal_url

    async def create(self, spec: VmSpec) -> RunningVm:
        return await self.local.create(spec)

    async def destroy(self, vm_id: str) -> bool:
        return await self.local.destroy(vm_id)

    async def list(self) -> builtins.list[RunningVm]:
        return await self.local.list()

    async def check(self) -> builtins.list[str]:
        return await self.local.check()

    async def holder(self, vm_id: str) -> str | None:
        """The internal URL of the node holding ``vm_id`` when that is not this node."""
        async with self.db.read() as repo:
            vm = await repo.vm(vm_id)
        if vm is None or not vm.node or vm.node == self.node:
            return None
        url = await self._internal_url(vm.node)
        if url is None:
            raise RuntimeFailure(f"{vm_id} is on node {vm.node}, which is not registered")
        return url

    async def open_agent(self, vm_id: str) -> Stream:
        url = await self.holder(vm_id)
        if url is None:
            return await self.local.open_agent(vm_id)
        return await self.link.open_stream(url, vm_id, "agent")

    async def open_vnc(self, vm_id: str) -> Stream:
        url = await self.holder(vm_id)
        if url is None:
            return await self.local.open_vnc(vm_id)
        return await self.link.open_stream(url, vm_id, "vnc")
