"""The per-client limit on what anyone may call (``api.clients``): viewer-token routes,
operations and requests without a valid API token; ``X-Forwarded-For`` believed only from
``AIRLOCK_TRUSTED_PROXIES``; junk headers never crash anything; memory stays bounded."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from airlock.api.clients import ClientLimiter, client_key, parse_networks
from airlock.domain.ratelimit import take
from tests.api.conftest import BASE_URL, Api, ApiFactory
from tests.api.live import serve
from tests.api.test_errors import assert_error


def client_from(api: Api, address: str) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=api.app, client=(address, 40000))
    return httpx.AsyncClient(transport=transport, base_url=BASE_URL)


def assert_limited(r: httpx.Response) -> None:
    assert_error(r, 429, "rate_limited")
    assert r.headers["Retry-After"].isdigit() and int(r.headers["Retry-After"]) >= 1


def test_the_bucket_refills_at_its_rate() -> None:
    bucket, wait = take(None, now=0.0, rate=1.0, burst=2.0)
    assert wait is None
    bucket, wait = take(bucket, now=0.0, rate=1.0, burst=2.0)
    assert wait is None
    bucket, wait = take(bucket, now=0.25, rate=1.0, burst=2.0)
    assert wait == 1  # 0.25 of a token back: 0.75 s more, rounded up
    bucket, wait = take(bucket, now=1.0, rate=1.0, burst=2.0)
    assert wait is None
    bucket, wait = take(bucket, now=100.0, rate=1.0, burst=2.0)
    assert wait is None and bucket.tokens == 1.0  # never more than the burst


async def test_unauthenticated_and_viewer_routes_are_limited_per_client(
    make_api: ApiFactory,
) -> None:
    api = await make_api(client_requests_per_minute=5)
    session, _ = await api.add_session("alice")
    paths = ["/healthz", f"/api/auth/session/{session.id}/viewer/events", "/api/providers"]
    async with client_from(api, "198.51.100.7") as one, client_from(api, "198.51.100.8") as two:
        for i in range(5):
            r = await one.get(paths[i % 3], params={"token": "1.f." + "A" * 43})
            assert r.status_code in (200, 401), r.text
        for path in paths:
            assert_limited(await one.get(path))
        # Static files are not counted (a page load fetches dozens); another address has
        # its own bucket; a valid API token is never charged.
        assert (await one.get("/static/app/style.css")).status_code == 200
        assert (await two.get("/healthz")).status_code == 200
        for _ in range(10):
            r = await one.get("/api/providers", headers=api.auth("alice"))
            assert r.status_code == 200
    assert await api.counts() == (1, 1)


async def test_refused_bearer_tokens_are_charged(make_api: ApiFactory) -> None:
    api = await make_api(client_requests_per_minute=3)
    async with client_from(api, "198.51.100.9") as guesser:
        for _ in range(3):
            r = await guesser.get("/api/vms", headers={"Authorization": "Bearer alk_guess"})
            assert_error(r, 401, "unauthorized")
        assert_limited(await guesser.get("/healthz"))
        assert_limited(await guesser.get("/api/vms"))


async def test_forwarded_for_is_believed_only_from_trusted_proxies(make_api: ApiFactory) -> None:
    api = await make_api(client_requests_per_minute=2, trusted_proxies="10.0.0.0/8, ::1")
    async with client_from(api, "10.1.2.3") as proxy, client_from(api, "203.0.113.5") as direct:
        # Behind the proxy, each real client has its own bucket.
        for client in ("192.0.2.1", "192.0.2.2"):
            for _ in range(2):
                r = await proxy.get("/healthz", headers={"X-Forwarded-For": client})
                assert r.status_code == 200
            assert_limited(await proxy.get("/healthz", headers={"X-Forwarded-For": client}))
        # A client cannot name itself anew: only the hop the proxy added counts.
        spoofed = {"X-Forwarded-For": "192.0.2.77, 192.0.2.1"}
        assert_limited(await proxy.get("/healthz", headers=spoofed))
        # From an untrusted peer the header is ignored altogether.
        for i in range(2):
            r = await direct.get("/healthz", headers={"X-Forwarded-For": f"192.0.2.{100 + i}"})
            assert r.status_code == 200
        assert_limited(await direct.get("/healthz", headers={"X-Forwarded-For": "192.0.2.200"}))


JUNK = [
    b"",
    b"garbage",
    b"1.2.3.4.5",
    b"::::",
    b"\xff\xfe\x00\x01",
    b"1.2.3.4, not-an-ip, 5.6.7.8",
    b"[::1]:80",
    b"unknown",
    b"," * 10_000,
    b"999.999.999.999",
    b"fe80::1%eth0",
    b"1.2.3.4" + b", 10.0.0.1" * 500,
]


@pytest.mark.parametrize("value", JUNK)
async def test_junk_forwarded_for_never_crashes(make_api: ApiFactory, value: bytes) -> None:
    api = await make_api(trusted_proxies="10.0.0.0/8,127.0.0.1")
    for peer in ("10.9.9.9", "203.0.113.1"):
        async with client_from(api, peer) as client:
            headers = [(b"X-Forwarded-For", value), (b"X-Forwarded-For", b"2001:db8::1")]
            assert (await client.get("/healthz", headers=headers)).status_code == 200
            r = await client.get("/api/vms", headers=[(b"X-Forwarded-For", value)])
            assert_error(r, 401, "unauthorized")


def test_client_keys() -> None:
    trusted = parse_networks("10.0.0.0/8")

    def key(peer: str, *xff: bytes) -> str:
        scope = {"client": (peer, 1), "headers": [(b"x-forwarded-for", v) for v in xff]}
        return client_key(scope, trusted)

    assert key("203.0.113.1", b"192.0.2.1") == "203.0.113.1"
    assert key("10.0.0.2", b"192.0.2.1") == "192.0.2.1"
    assert key("10.0.0.2", b"192.0.2.1, 10.0.0.9") == "192.0.2.1"  # two proxies
    assert key("10.0.0.2", b"junk, 192.0.2.1") == "192.0.2.1"  # junk ends the walk
    assert key("10.0.0.2", b"192.0.2.1, junk") == "10.0.0.2"
    assert key("10.0.0.2") == "10.0.0.2"
    # One IPv6 host holds a /64; an IPv4-mapped address is the IPv4 one.
    assert key("2001:db8:1:2::5") == key("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert key("::ffff:198.51.100.1") == "198.51.100.1"
    assert client_key({"client": None, "headers": []}, trusted).startswith("peer:")
    with pytest.raises(ValueError, match="not an address"):
        parse_networks("10.0.0.0/8, nonsense")


def test_the_table_of_clients_is_bounded() -> None:
    now = [0.0]
    limiter = ClientLimiter(60, max_clients=100, clock=lambda: now[0])
    for i in range(5000):
        limiter.hit(f"198.51.{i // 256}.{i % 256}")
    assert len(limiter) <= 100
    now[0] += 120  # every bucket full again: forgotten as clients come and go
    for i in range(20):
        limiter.hit(f"192.0.2.{i}")
    assert len(limiter) <= 100


async def test_the_vnc_socket_is_limited_with_a_close_code(make_api: ApiFactory) -> None:
    api = await make_api(client_requests_per_minute=2)
    session, _ = await api.add_session("alice")
    async with serve(api.app, lifespan=False) as url:
        ws = "ws" + url.removeprefix("http") + f"/api/auth/session/{session.id}/vnc?token=x"
        codes = []
        for _ in range(3):
            async with connect(ws, subprotocols=["binary"]) as conn:  # type: ignore[list-item]
                with pytest.raises(ConnectionClosed):
                    await conn.recv()
                assert conn.close_code is not None
                codes.append((conn.close_code, conn.close_reason))
    assert codes == [(4401, "invalid_viewer_token")] * 2 + [(4429, "rate_limited")]


async def test_bad_trusted_proxies_are_refused_at_start(make_api: ApiFactory) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="not an address or network"):
        await make_api(trusted_proxies="10.0.0.0/8, office")


async def test_junk_forwarded_for_over_a_real_server(make_api: ApiFactory) -> None:
    """The bytes as a client sends them, through uvicorn's own parser, from a trusted peer."""
    api = await make_api(trusted_proxies="127.0.0.1")
    async with serve(api.app, lifespan=False) as url:
        host, port = url.removeprefix("http://").split(":")
        for value in JUNK[1:]:
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(
                b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                b"X-Forwarded-For: " + value.replace(b"\x00", b"") + b"\r\n\r\n"
            )
            await writer.drain()
            answer = await reader.read()
            writer.close()
            await writer.wait_closed()
            status = answer.split(b"\r\n", 1)[0]
            # Either the server's parser refuses the header (400) or the app answers: never 5xx.
            assert status in (b"HTTP/1.1 200 OK", b"HTTP/1.1 400 Bad Request"), answer[:200]
