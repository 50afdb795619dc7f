"""Who the client is, and how much it may ask without an API token.

``client_key``: the client's address from the connection, or, when the connection comes
from a proxy named in ``AIRLOCK_TRUSTED_PROXIES``, from ``X-Forwarded-For`` (read from the
right: the first address that is not a trusted proxy is the client; anything that does not
parse ends the walk). A missing, junk or spoofed header never fails a request: it only
decides which bucket is charged. IPv6 clients are keyed by their /64, which one host
usually holds whole.

``ClientRateLimit`` (ASGI middleware) gives each client a token bucket
(``domain.ratelimit``) for what anyone can call: routes outside ``/api`` (operations,
the dashboard page; its static files are not counted), the viewer-token routes (the
viewer page, its events, keepalive and complete, the VNC socket), ``/api`` requests
without a bearer token, and refused bearer tokens (each 401 is charged after the fact).
A request with a valid API token is never charged: per-user quotas govern those; nor is a
peer node's request to ``/internal`` with a valid node credential (a refused one is charged
like a refused token, on the socket too). Past the limit: 429 with ``Retry-After``, or, on
the VNC socket, close code 4429 after the handshake (a page cannot read a refused handshake).
The table of buckets is bounded: clients whose bucket is full again are forgotten, and past
``MAX_CLIENTS`` the least recently seen go first.
"""

from __future__ import annotations

import ipaddress
import itertools
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from airlock.api.schemas import error_body
from airlock.domain.ratelimit import Bucket, is_full, take

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

MAX_CLIENTS = 10_000
MAX_FORWARDED_HOPS = 32  # a longer chain is junk: the walk stops there
_VIEWER_ROUTE = re.compile(r"^/api/auth/session/[^/]*/(novnc|vnc|viewer/)")


def parse_networks(text: str) -> tuple[Network, ...]:
    """``"10.0.0.0/8, 127.0.0.1"`` -> networks; ``ValueError`` naming a bad entry."""
    out = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            out.append(ipaddress.ip_network(part, strict=False))
        except ValueError:
            raise ValueError(f"not an address or network: {part!r}") from None
    return tuple(out)


def _address(text: str) -> Address | None:
    try:
        address = ipaddress.ip_address(text.strip())
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _trusted(address: Address, trusted: Iterable[Network]) -> bool:
    return any(address.version == net.version and address in net for net in trusted)


def _key(address: Address) -> str:
    if isinstance(address, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


def client_key(scope: Scope, trusted: tuple[Network, ...]) -> str:
    client = scope.get("client")
    peer = _address(str(client[0])) if client else None
    if peer is None:
        return f"peer:{client[0] if client else 'unknown'}"[:80]  # a Unix socket, a test
    if not trusted or not _trusted(peer, trusted):
        return _key(peer)
    hops: list[str] = []
    for name, value in scope.get("headers", ()):
        if name.lower() == b"x-forwarded-for":
            hops.extend(value.decode("latin-1").split(","))
    candidate = peer
    for hop in reversed(hops[-MAX_FORWARDED_HOPS:]):
        address = _address(hop)
        if address is None:
            break  # junk: believe nothing further left
        candidate = address
        if not _trusted(address, trusted):
            break
    return _key(candidate)


class ClientLimiter:
    """Buckets by client key, bounded (see the module docstring)."""

    def __init__(
        self,
        per_minute: int,
        *,
        max_clients: int = MAX_CLIENTS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate = per_minute / 60.0
        self.burst = float(per_minute)
        self.max_clients = max_clients
        self.clock = clock
        self._buckets: OrderedDict[str, Bucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def hit(self, key: str) -> int | None:
        """Charge one request; ``None`` when allowed, else the seconds to wait."""
        now = self.clock()
        bucket, wait = take(self._buckets.get(key), now=now, rate=self.rate, burst=self.burst)
        self._buckets[key] = bucket
        self._buckets.move_to_end(key)
        self._forget(now)
        return wait

    def _forget(self, now: float) -> None:
        while len(self._buckets) > self.max_clients:
            self._buckets.popitem(last=False)
        # The least recently seen first: once one of those is not full, stop looking.
        for key, bucket in list(itertools.islice(self._buckets.items(), 8)):
            if not is_full(bucket, now=now, rate=self.rate, burst=self.burst):
                break
            del self._buckets[key]


def _exempt(scope: Scope) -> bool:
    """The viewer's and dashboard's static files: a file read each, and one page load
    fetches some sixty (noVNC's modules), so counting them would cut a person off first."""
    path: str = scope.get("path", "")
    return path.startswith("/static/") and scope.get("method") in ("GET", "HEAD")


def _limited_up_front(scope: Scope) -> bool:
    path: str = scope.get("path", "")
    token_route = path.startswith("/api/") or path.startswith("/internal/")
    if not token_route or _VIEWER_ROUTE.match(path):
        return True
    return not any(name.lower() == b"authorization" for name, _ in scope.get("headers", ()))


class ClientRateLimit:
    def __init__(
        self, app: ASGIApp, *, limiter: ClientLimiter | None, trusted: tuple[Network, ...]
    ) -> None:
        self.app = app
        self.limiter = limiter
        self.trusted = trusted

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.limiter is None or scope["type"] not in ("http", "websocket") or _exempt(scope):
            await self.app(scope, receive, send)
            return
        limiter = self.limiter
        key = client_key(scope, self.trusted)
        if _limited_up_front(scope):
            wait = limiter.hit(key)
            if wait is not None:
                await _refuse(scope, receive, send, wait)
                return
            await self.app(scope, receive, send)
            return

        async def charge_refusals(message: Message) -> None:
            start = ("http.response.start", "websocket.http.response.start")
            if message["type"] in start and message.get("status") == 401:
                limiter.hit(key)  # a wrong token costs like no token
            await send(message)

        await self.app(scope, receive, charge_refusals)


async def _refuse(scope: Scope, receive: Receive, send: Send, wait: int) -> None:
    message = f"too many requests from this address; retry in {wait} s"
    if scope["type"] == "websocket":
        await receive()  # websocket.connect
        offered = scope.get("subprotocols", ())
        await send(
            {"type": "websocket.accept", "subprotocol": "binary" if "binary" in offered else None}
        )
        await send({"type": "websocket.close", "code": 4429, "reason": "rate_limited"})
        return
    response = JSONResponse(
        error_body("rate_limited", message),
        status_code=429,
        headers={"Retry-After": str(wait), "Cache-Control": "no-store"},
    )
    await response(scope, receive, send)
