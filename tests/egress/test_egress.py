"""The egress proxy on a real Unix socket, in front of real loopback servers."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import stat
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from airlock.domain.egress_policy import Decision, EgressPolicy, HostRule, Verdict
from airlock.egress import EgressProxy
from tests.lifecycle_helpers import wait_for

TIMEOUT = 10
MakeProxy = Callable[..., Awaitable[EgressProxy]]


def allow(*items: str | tuple[str, int], to: int | None = None) -> EgressPolicy:
    """A policy allowing ``items`` (``"host"`` on 80, or ``(host, port)``), each led to
    ``127.0.0.1:to`` when ``to`` is given (names that exist only for the test)."""
    found = tuple(HostRule(i, 80) if isinstance(i, str) else HostRule(*i) for i in items)
    targets = tuple((r, ("127.0.0.1", to)) for r in found) if to is not None else ()
    return EgressPolicy("test", allow=found, targets=targets)


def local(name: str, port: int) -> EgressPolicy:
    """``name:port`` allowed and led to the loopback server on ``port``."""
    return allow((name, port), to=port)


@dataclass
class Upstream:
    """A loopback server that records what it was sent."""

    port: int
    requests: list[bytes] = field(default_factory=list)
    tasks: set[asyncio.Task[object]] = field(default_factory=set)


async def _serve(
    handler: Callable[[Upstream, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> AsyncIterator[tuple[asyncio.Server, Upstream]]:
    upstream = Upstream(port=0)

    async def wrapped(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        upstream.tasks.add(task)
        try:
            await handler(upstream, reader, writer)
        finally:
            writer.close()

    server = await asyncio.start_server(wrapped, "127.0.0.1", 0)
    upstream.port = server.sockets[0].getsockname()[1]
    yield server, upstream
    server.close()
    for task in list(upstream.tasks):
        task.cancel()
    await asyncio.gather(*upstream.tasks, return_exceptions=True)
    await server.wait_closed()


async def _echo(up: Upstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()


async def _http(up: Upstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers with a JSON echo of the request head and body, then reads on (to see whether
    anything after the request arrives) until the proxy closes."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    body = await reader.readexactly(length)
    up.requests.append(head + body)
    payload = json.dumps({"head": head.decode(), "body": body.decode()}).encode()
    writer.write(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: keep-alive\r\n"
        b"Keep-Alive: timeout=5\r\nContent-Length: " + str(len(payload)).encode() + b"\r\n\r\n"
    )
    writer.write(payload)
    await writer.drain()
    rest = await reader.read()  # EOF when the proxy half-closes or closes
    up.requests.append(rest)


@pytest.fixture
async def echo() -> AsyncIterator[Upstream]:
    async for _, upstream in _serve(_echo):
        yield upstream


@pytest.fixture
async def http_upstream() -> AsyncIterator[Upstream]:
    async for _, upstream in _serve(_http):
        yield upstream


@pytest.fixture
def sock_path(tmp_path: Path) -> Path:
    return tmp_path / "egress.sock"


@pytest.fixture
async def proxy_factory(sock_path: Path) -> AsyncIterator[MakeProxy]:
    proxies: list[EgressProxy] = []

    async def make(
        policy: EgressPolicy,
        head_timeout: float = 10.0,
        observer: Callable[[Verdict], None] | None = None,
    ) -> EgressProxy:
        proxy = EgressProxy(policy, vm_id="vm-test", head_timeout=head_timeout, observer=observer)
        await proxy.serve(sock_path)
        proxies.append(proxy)
        return proxy

    yield make
    for proxy in proxies:
        await proxy.close()


async def exchange(path: Path, data: bytes) -> bytes:
    """Send ``data`` and read the whole answer until the proxy closes."""
    reader, writer = await asyncio.open_unix_connection(path)
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(TIMEOUT):
            return await reader.read()
    finally:
        writer.close()


def exists(path: Path) -> bool:
    return path.exists()


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def split(response: bytes) -> tuple[dict[str, str], bytes]:
    head, _, body = response.partition(b"\r\n\r\n")
    headers = {}
    for line in head.decode().split("\r\n")[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return headers, body


async def test_socket_is_private_and_removed_on_close(sock_path: Path) -> None:
    proxy = EgressProxy(EgressPolicy("test"), vm_id="vm-1")
    await proxy.serve(sock_path)
    mode = os.stat(sock_path).st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o600
    assert [p.name for p in sock_path.parent.iterdir()] == ["egress.sock"]  # no temp left
    await proxy.close()
    assert not exists(sock_path)


async def test_a_stale_socket_is_replaced_but_a_file_is_not(sock_path: Path) -> None:
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(sock_path))
    stale.close()
    async with EgressProxy(EgressPolicy("test"), vm_id="vm-1") as proxy:
        await proxy.serve(sock_path)
        assert (
            status_of(await exchange(sock_path, b"CONNECT a.example:443 HTTP/1.1\r\n\r\n")) == 403
        )
    other = sock_path.with_name("plain-file")
    other.write_text("x")
    with pytest.raises(FileExistsError):
        await EgressProxy(EgressPolicy("test"), vm_id="vm-1").serve(other)


async def test_connect_to_an_allowed_host_tunnels_bytes_both_ways(
    proxy_factory: MakeProxy, sock_path: Path, echo: Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="airlock.egress")
    await proxy_factory(local("echo.test", echo.port))
    reader, writer = await asyncio.open_unix_connection(sock_path)
    writer.write(f"CONNECT echo.test:{echo.port} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    writer.write(b"hello")  # sent eagerly, before the answer, as TLS clients do
    await writer.drain()
    async with asyncio.timeout(TIMEOUT):
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ")
        assert await reader.readexactly(5) == b"hello"
        big = bytes(range(256)) * 4096  # 1 MiB, more than any buffer the proxy keeps
        writer.write(big)
        await writer.drain()
        assert await reader.readexactly(len(big)) == big
        writer.write_eof()
        assert await reader.read() == b""
    writer.close()
    await _wait_for(lambda: "allowed" in caplog.text)  # the proxy logs once it has closed
    line = next(r for r in caplog.records if "allowed" in r.getMessage())
    expected = len(big) + 5
    assert f"echo.test:{echo.port}" in line.getMessage()
    assert f"up={expected} down={expected}" in line.getMessage()
    assert "vm-test" in line.getMessage()


async def test_connect_to_a_host_not_on_the_allowlist_is_refused(
    proxy_factory: MakeProxy, sock_path: Path, echo: Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    await proxy_factory(local("echo.test", echo.port))
    answer = await exchange(sock_path, b"CONNECT evil.example:443 HTTP/1.1\r\n\r\n")
    assert status_of(answer) == 403
    _, body = split(answer)
    assert b"evil.example:443" in body and len(body) < 200
    # The right host on another port is not the same destination.
    answer = await exchange(
        sock_path, f"CONNECT echo.test:{echo.port + 1} HTTP/1.1\r\n\r\n".encode()
    )
    assert status_of(answer) == 403
    assert "evil.example:443 denied" in caplog.text
    assert "vm-test" in caplog.text


async def test_plain_http_goes_through_the_route_target_rewritten(
    proxy_factory: MakeProxy,
    sock_path: Path,
    http_upstream: Upstream,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="airlock.egress")
    await proxy_factory(allow(("idp.airlock.test", 4001), to=http_upstream.port))
    request = (
        b"GET http://IDP.airlock.test:4001/authorize?state=s3cr3t-query HTTP/1.1\r\n"
        b"Host: idp.airlock.test:4001\r\n"
        b"Proxy-Connection: keep-alive\r\n"
        b"Proxy-Authorization: Basic c2VjcmV0\r\n"
        b"Connection: keep-alive, X-Hop\r\n"
        b"X-Hop: drop me\r\n"
        b"Authorization: Bearer top-secret-token\r\n"
        b"Accept: text/html\r\n\r\n"
    )
    answer = await exchange(sock_path, request)
    assert status_of(answer) == 200
    headers, body = split(answer)
    assert headers["connection"] == "close"
    assert "keep-alive" not in headers
    seen = json.loads(body)["head"].split("\r\n")
    assert seen[0] == "GET /authorize?state=s3cr3t-query HTTP/1.1"
    names = [line.split(":")[0].lower() for line in seen[1:] if line]
    assert "proxy-connection" not in names and "proxy-authorization" not in names
    assert "x-hop" not in names
    assert "Host: idp.airlock.test:4001" in seen
    assert "Connection: close" in seen
    assert "Authorization: Bearer top-secret-token" in seen  # for the origin, not the log
    assert "Accept: text/html" in seen
    await _wait_for(lambda: "allowed" in caplog.text)
    assert "idp.airlock.test:4001" in caplog.text
    for secret in ("top-secret-token", "c2VjcmV0", "s3cr3t-query", "/authorize"):
        assert secret not in caplog.text


async def test_a_request_body_is_forwarded_exactly_and_nothing_after_it(
    proxy_factory: MakeProxy, sock_path: Path, http_upstream: Upstream
) -> None:
    await proxy_factory(local("up.test", http_upstream.port))
    body = b"grant_type=authorization_code&code=abc"
    smuggled = b"GET http://evil.example/ HTTP/1.1\r\nHost: evil.example\r\n\r\n"
    answer = await exchange(
        sock_path,
        f"POST http://up.test:{http_upstream.port}/token HTTP/1.1\r\n".encode()
        + b"Content-Type: application/x-www-form-urlencoded\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
        + smuggled,
    )
    assert status_of(answer) == 200
    assert json.loads(split(answer)[1])["body"] == body.decode()
    await _wait_for(lambda: len(http_upstream.requests) == 2)
    assert http_upstream.requests[1] == b""  # the pipelined request never reached upstream


async def test_plain_http_to_a_denied_host_gets_403(
    proxy_factory: MakeProxy, sock_path: Path, http_upstream: Upstream
) -> None:
    await proxy_factory(local("up.test", http_upstream.port))
    answer = await exchange(sock_path, b"GET http://evil.example/ HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status_of(answer) == 403
    assert split(answer)[0]["connection"] == "close"
    assert http_upstream.requests == []


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"garbage\r\n\r\n",
        b"GET /relative HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET https://a.example/ HTTP/1.1\r\n\r\n",
        b"CONNECT a.example HTTP/1.1\r\n\r\n",
        b"CONNECT a.example:99999 HTTP/1.1\r\n\r\n",
        b"CONNECT a_b!.example:443 HTTP/1.1\r\n\r\n",
        b"GET http://user:pw@a.example/ HTTP/1.1\r\n\r\n",
        b"GET http://a.example/ HTTP/2.0\r\n\r\n",
        b"GET http://a.example/ HTTP/1.1\r\nno colon here\r\n\r\n",
        b"GET http://a.example/ HTTP/1.1\r\nX: a\r\n folded\r\n\r\n",
        b"POST http://a.example/ HTTP/1.1\r\nContent-Length: 3\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n",
        b"POST http://a.example/ HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
        b"GET http://a.example/ HTTP/1.1\r\nHost: a",  # then EOF inside the head
    ],
)
async def test_malformed_requests_get_400(
    proxy_factory: MakeProxy, sock_path: Path, request_bytes: bytes
) -> None:
    await proxy_factory(allow("a.example", ("a.example", 443)))
    reader, writer = await asyncio.open_unix_connection(sock_path)
    writer.write(request_bytes)
    writer.write_eof()
    async with asyncio.timeout(TIMEOUT):
        answer = await reader.read()
    writer.close()
    assert status_of(answer) == 400


async def test_chunked_request_bodies_need_a_length(
    proxy_factory: MakeProxy, sock_path: Path
) -> None:
    await proxy_factory(allow("a.example"))
    answer = await exchange(
        sock_path, b"POST http://a.example/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    )
    assert status_of(answer) == 411


@pytest.mark.parametrize("size", [17 * 1024, 64 * 1024])
async def test_an_oversize_head_is_rejected(
    proxy_factory: MakeProxy, sock_path: Path, size: int
) -> None:
    await proxy_factory(allow("a.example"))
    many = b"".join(b"X-Filler-%d: %s\r\n" % (i, b"y" * 900) for i in range(size // 920))
    answer = await exchange(sock_path, b"GET http://a.example/ HTTP/1.1\r\n" + many + b"\r\n")
    assert status_of(answer) == 431
    one_line = b"GET http://a.example/ HTTP/1.1\r\nX-Big: " + b"z" * size + b"\r\n\r\n"
    assert status_of(await exchange(sock_path, one_line)) == 431


async def test_a_slow_request_head_times_out(proxy_factory: MakeProxy, sock_path: Path) -> None:
    await proxy_factory(allow("a.example"), head_timeout=0.2)
    reader, writer = await asyncio.open_unix_connection(sock_path)
    writer.write(b"GET http://a.example/ HTTP/1.1\r\n")  # and nothing more
    async with asyncio.timeout(TIMEOUT):
        answer = await reader.read()
    writer.close()
    assert status_of(answer) == 408
    # A connection that never says anything (a browser's preconnect) is closed quietly.
    reader, writer = await asyncio.open_unix_connection(sock_path)
    async with asyncio.timeout(TIMEOUT):
        assert await reader.read() == b""
    writer.close()


async def test_upstream_connect_failure_is_502(proxy_factory: MakeProxy, sock_path: Path) -> None:
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()  # nothing listens there now
    await proxy_factory(allow(("gone.airlock.test", 443), to=port))
    answer = await exchange(sock_path, b"CONNECT gone.airlock.test:443 HTTP/1.1\r\n\r\n")
    assert status_of(answer) == 502


async def test_close_ends_open_tunnels_and_leaves_no_task(sock_path: Path, echo: Upstream) -> None:
    before = asyncio.all_tasks()
    proxy = EgressProxy(local("echo.test", echo.port), vm_id="vm-close")
    await proxy.serve(sock_path)
    clients = []
    for _ in range(3):
        reader, writer = await asyncio.open_unix_connection(sock_path)
        writer.write(f"CONNECT echo.test:{echo.port} HTTP/1.1\r\n\r\n".encode())
        await writer.drain()
        async with asyncio.timeout(TIMEOUT):
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
        clients.append((reader, writer))
    idle_reader, idle_writer = await asyncio.open_unix_connection(sock_path)  # says nothing
    await _wait_for(lambda: proxy.active_connections == 4)

    await proxy.close()

    assert proxy.active_connections == 0
    for reader, writer in [*clients, (idle_reader, idle_writer)]:
        async with asyncio.timeout(TIMEOUT):
            assert await reader.read() == b""
        writer.close()
    leftover = asyncio.all_tasks() - before - echo.tasks
    assert not {t for t in leftover if not t.done()}, leftover
    assert not exists(sock_path)
    with pytest.raises(OSError):
        await asyncio.open_unix_connection(sock_path)


@pytest.mark.parametrize(
    "authority",
    [
        "127.0.0.1:{port}",
        "2130706433:{port}",  # 127.0.0.1 as a number
        "0x7f.1:{port}",
        "0177.0.0.1:{port}",
        "127.1:{port}",
        "[::1]:{port}",
        "[::ffff:127.0.0.1]:{port}",
    ],
)
async def test_ip_literals_are_denied_whatever_the_policy(
    proxy_factory: MakeProxy, sock_path: Path, echo: Upstream, authority: str
) -> None:
    """From the VM's side: the upstream really listens at that address and port, and the
    policy allows every name on that port; an address in any spelling still gets 403."""
    seen: list[Verdict] = []
    policy = EgressPolicy(
        "test",
        allow=(HostRule("*.test", echo.port),),
        targets=((HostRule("*.test", echo.port), ("127.0.0.1", echo.port)),),
        learn=True,
    )
    await proxy_factory(policy, observer=seen.append)
    dest = authority.format(port=echo.port)
    answer = await exchange(sock_path, f"CONNECT {dest} HTTP/1.1\r\n\r\n".encode())
    assert status_of(answer) == 403, answer
    answer = await exchange(sock_path, f"GET http://{dest}/ HTTP/1.1\r\n\r\n".encode())
    assert status_of(answer) == 403, answer
    assert [v.decision for v in seen] == [Decision.DENIED, Decision.DENIED]
    assert all(v.reason == "an IP address" for v in seen)
    assert echo.tasks == set()  # nothing ever connected upstream


async def test_a_name_that_resolves_to_loopback_is_refused(
    proxy_factory: MakeProxy, sock_path: Path, echo: Upstream
) -> None:
    """From the VM's side: learn mode (or a wildcard) allows a name, but the name leads to
    the controller's own loopback, where the echo server really listens: 403, never
    connected."""
    policy = EgressPolicy("test", allow=(HostRule("localhost", echo.port),), learn=True)
    await proxy_factory(policy)
    for name in ("localhost", "LocalHost."):
        answer = await exchange(sock_path, f"CONNECT {name}:{echo.port} HTTP/1.1\r\n\r\n".encode())
        assert status_of(answer) == 403, answer
        assert b"non-public address" in answer
    answer = await exchange(
        sock_path, f"GET http://localhost:{echo.port}/ HTTP/1.1\r\n\r\n".encode()
    )
    assert status_of(answer) == 403
    assert echo.tasks == set()


async def test_names_are_matched_normalised_and_wildcards_by_whole_labels(
    proxy_factory: MakeProxy, sock_path: Path, echo: Upstream
) -> None:
    seen: list[Verdict] = []
    policy = EgressPolicy(
        "test",
        allow=(HostRule("*.login.test", echo.port),),
        targets=((HostRule("*.login.test", echo.port), ("127.0.0.1", echo.port)),),
    )
    await proxy_factory(policy, observer=seen.append)
    for name in ("sso.login.test", "SSO.Login.TEST.", "a.b.login.test"):
        reader, writer = await asyncio.open_unix_connection(sock_path)
        writer.write(f"CONNECT {name}:{echo.port} HTTP/1.1\r\n\r\nping".encode())
        async with asyncio.timeout(TIMEOUT):
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200"), name
            assert await reader.readexactly(4) == b"ping"
        writer.close()
    for name in ("login.test", "login.test.evil.net", "evillogin.test", "sso.login.test.evil"):
        answer = await exchange(sock_path, f"CONNECT {name}:{echo.port} HTTP/1.1\r\n\r\n".encode())
        assert status_of(answer) == 403, name
    # A UTF-8 name is matched by its IDNA form.
    reader, writer = await asyncio.open_unix_connection(sock_path)
    writer.write(f"CONNECT bücher.login.test:{echo.port} HTTP/1.1\r\n\r\n".encode())
    async with asyncio.timeout(TIMEOUT):
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
    writer.close()
    assert seen[-1].host == "xn--bcher-kva.login.test"
    # An unknown port on an allowed name.
    assert (
        status_of(await exchange(sock_path, b"CONNECT sso.login.test:22 HTTP/1.1\r\n\r\n")) == 403
    )


async def test_browser_noise_is_denied_quietly(
    proxy_factory: MakeProxy, sock_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="airlock.egress")
    seen: list[Verdict] = []
    await proxy_factory(allow("a.example"), observer=seen.append)
    answer = await exchange(sock_path, b"CONNECT update.googleapis.com:443 HTTP/1.1\r\n\r\n")
    assert status_of(answer) == 403
    answer = await exchange(sock_path, b"CONNECT cdn.example:443 HTTP/1.1\r\n\r\n")
    assert status_of(answer) == 403
    await _wait_for(lambda: "cdn.example:443" in caplog.text)
    assert [v.decision for v in seen] == [Decision.NOISE, Decision.DENIED]
    levels = {
        r.getMessage().split()[3]: r.levelno for r in caplog.records if "CONNECT" in r.getMessage()
    }
    assert levels == {
        "update.googleapis.com:443": logging.DEBUG,
        "cdn.example:443": logging.WARNING,
    }


async def _wait_for(predicate: Callable[[], bool]) -> None:
    """A condition that another task on this loop makes true soon."""
    await wait_for(predicate, timeout=TIMEOUT, interval=0.01)


async def test_connections_beyond_the_cap_get_503(sock_path: Path) -> None:
    async with EgressProxy(allow("a.example"), vm_id="vm-cap", max_connections=1) as proxy:
        await proxy.serve(sock_path)
        _, holder = await asyncio.open_unix_connection(sock_path)  # holds the only slot
        await _wait_for(lambda: proxy.active_connections == 1)
        answer = await exchange(sock_path, b"GET http://a.example/ HTTP/1.1\r\n\r\n")
        assert status_of(answer) == 503
        holder.close()
