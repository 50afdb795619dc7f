"""The egress proxy: the only way out of a browser VM.

A browser VM has no network but loopback. Its Chromium (``--proxy-server``) and its login
programs (``HTTPS_PROXY``) talk to ``127.0.0.1:3128`` inside the VM, which the guest agent
forwards to a Unix socket on the host where one ``EgressProxy`` per VM listens. The proxy
lets a connection through only where that VM's ``EgressPolicy`` (``domain.egress_policy``:
host rules, wildcards, SSO bundles, learn mode) allows it, optionally mapping a name that
exists only for Airlock (the demo IdP's ``*.airlock.test``) to a real address, tells its
``observer`` every decision (the controller counts denials per session), and logs every
connection: a denial as a warning, the browser's own known background noise quietly.

It speaks just enough HTTP/1.1 to be a forward proxy: ``CONNECT host:port`` for TLS tunnels
and absolute-form requests (``GET http://host:port/path``) for plain HTTP, one request per
connection (``Connection: close`` both ways), so that every request is checked against the
policy and nothing is smuggled behind a first, allowed one. It never logs request lines,
headers or bodies: they may carry authorization codes and tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import re
import secrets
import socket
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from airlock.domain.egress_policy import (
    Decision,
    EgressPolicy,
    Verdict,
    is_ip_literal,
    normalise_host,
)

log = logging.getLogger("airlock.egress")

MAX_HEAD = 16 * 1024  # request head (request line + headers), bytes
MAX_RESPONSE_HEAD = 64 * 1024  # upstream response head for plain-HTTP requests, bytes
CHUNK = 64 * 1024  # one read while piping; with drain() this bounds what we buffer

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_IP_TEXT = re.compile(r"[0-9a-fx.:%]{1,64}")  # what an IP literal in any spelling is made of
_BAD_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
# Hop-by-hop headers (RFC 9110 7.6.1) and the proxy's own: never forwarded.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
_REASONS = {
    400: "Bad Request",
    403: "Forbidden",
    408: "Request Timeout",
    411: "Length Required",
    431: "Request Header Fields Too Large",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


class _Reject(Exception):
    """Answer the client with ``status`` and close; ``reason`` is for the log only."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(slots=True)
class _Request:
    method: str
    host: str
    port: int
    target: str  # origin-form for plain HTTP, empty for CONNECT
    headers: list[tuple[str, str]]
    length: int = 0  # request body bytes (Content-Length) for plain HTTP


@dataclass(slots=True)
class _Conn:
    """What one connection did, for its log line."""

    started: float
    method: str = "-"
    dest: str = "-"
    decision: str = "-"
    status: int = 0
    up: int = 0  # client -> upstream, bytes
    down: int = 0  # upstream -> client, bytes
    note: str = ""
    head_bytes: int = 0  # of the request head read so far
    last_activity: float = field(default_factory=time.monotonic)


class EgressProxy:
    """One browser VM's forward proxy on a Unix socket, allowing what ``policy`` allows.

    ``await serve(path)`` binds and returns once listening; connections are then handled in
    tasks this object owns until ``await close()``, which stops the listener, cancels every
    connection and removes the socket file. Also an async context manager for ``close``.
    """

    def __init__(
        self,
        policy: EgressPolicy,
        *,
        vm_id: str,
        observer: Callable[[Verdict], None] | None = None,
        head_timeout: float = 10.0,
        connect_timeout: float = 10.0,
        idle_timeout: float = 300.0,
        max_connections: int = 256,
        max_head: int = MAX_HEAD,
    ) -> None:
        self.vm_id = vm_id
        self.policy = policy
        self._observer = observer
        self._head_timeout = head_timeout
        self._connect_timeout = connect_timeout
        self._idle_timeout = idle_timeout
        self._max_connections = max_connections
        self._max_head = max_head
        self._server: asyncio.AbstractServer | None = None
        self._path: Path | None = None
        self._inode: tuple[int, int] | None = None
        self._tasks: set[asyncio.Task[None]] = set()  # one per connection, ours
        self._handlers: set[asyncio.Task[Any]] = set()  # asyncio's server tasks awaiting ours
        self._closing = False

    @property
    def path(self) -> Path | None:
        return self._path

    @property
    def active_connections(self) -> int:
        return len(self._tasks)

    async def serve(self, path: Path) -> None:
        """Listen on ``path`` (mode 0600) and return. A stale socket there is replaced."""
        if self._server is not None or self._closing:
            raise RuntimeError("this EgressProxy has already been started")
        sock, inode = _bind_unix(path)
        try:
            self._server = await asyncio.start_unix_server(
                self._handle, sock=sock, limit=self._max_head
            )
        except BaseException:
            sock.close()
            _unlink_if(path, inode)
            raise
        self._path, self._inode = path, inode
        log.info(
            "egress proxy for vm %s (%s) listening, allowing %s",
            self.vm_id,
            self.policy.provider,
            self.policy.describe(),
            extra={"vm_id": self.vm_id},
        )
        if self.policy.learn:
            log.warning(
                "egress LEARN MODE for vm %s (%s): every host name is allowed and recorded",
                self.vm_id,
                self.policy.provider,
                extra={"vm_id": self.vm_id, "egress": "learn"},
            )

    async def close(self) -> None:
        """Stop listening, cancel and await every connection, remove the socket file."""
        self._closing = True
        if self._server is not None:
            self._server.close()
        # Only tasks not done yet: one cancelled before it ever ran never ran its clean-up,
        # so it stays in the set, and waiting on it again would spin here forever.
        while pending := {t for t in self._tasks | self._handlers if not t.done()}:
            for task in self._tasks:
                task.cancel()
            await asyncio.wait(pending)
        self._tasks.clear()
        self._handlers.clear()
        if self._server is not None:
            await self._server.wait_closed()
        if self._path is not None and self._inode is not None:
            _unlink_if(self._path, self._inode)
            self._inode = None

    async def __aenter__(self) -> EgressProxy:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- one connection ------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """asyncio's server runs this in a task of its own. The work runs in a task we own,
        which ``close()`` cancels: cancelling the server's task trips a Python 3.11 bug
        (``StreamReaderProtocol`` calls ``exception()`` on the cancelled task)."""
        handler = asyncio.current_task()
        if self._closing or handler is None:
            writer.close()
            return
        work = asyncio.create_task(self._connection(reader, writer), name=f"egress:{self.vm_id}")
        self._tasks.add(work)
        work.add_done_callback(self._tasks.discard)  # even if cancelled before it ran
        self._handlers.add(handler)
        try:
            await asyncio.wait([work])
        finally:
            self._handlers.discard(handler)
            if not work.done():
                work.cancel()  # the loop is shutting down under us
            elif not work.cancelled() and (exc := work.exception()) is not None:
                log.error("egress vm=%s: connection handler failed", self.vm_id, exc_info=exc)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = _Conn(started=time.monotonic())
        try:
            if len(self._tasks) > self._max_connections:
                raise _Reject(503, "too many connections")
            await self._serve_one(reader, writer, conn)
        except _Reject as exc:
            conn.status = exc.status
            conn.note = exc.reason
            if conn.decision == "-":
                conn.decision = "rejected"
            await _send_error(writer, exc.status, exc.reason if exc.status == 403 else None)
        except (OSError, asyncio.IncompleteReadError, TimeoutError):
            conn.note = "connection lost"
        except asyncio.CancelledError:
            conn.note = "closed with the proxy"
            raise
        finally:
            current = asyncio.current_task()
            if current is not None:
                self._tasks.discard(current)
            writer.close()
            self._log(conn)
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def _log(self, conn: _Conn) -> None:
        """One line per connection: never a path, header or body, they may hold secrets."""
        if conn.decision == "-" and conn.method == "-" and not conn.status:
            return  # connected and left without a word
        failed = conn.decision not in ("allowed", "learned") or conn.status >= 500
        level = logging.WARNING if failed else logging.INFO
        if conn.decision == Decision.NOISE:
            level = logging.DEBUG  # the browser's own background traffic: counted, not warned
        log.log(
            level,
            "egress vm=%s %s %s %s status=%d up=%d down=%d ms=%d%s",
            self.vm_id,
            conn.method,
            conn.dest,
            conn.decision,
            conn.status,
            conn.up,
            conn.down,
            (time.monotonic() - conn.started) * 1000,
            f" ({conn.note})" if conn.note else "",
            extra={
                "vm_id": self.vm_id,
                "egress_dest": conn.dest,
                "egress": conn.decision,
                "bytes_up": conn.up,
                "bytes_down": conn.down,
            },
        )

    async def _serve_one(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: _Conn
    ) -> None:
        try:
            async with asyncio.timeout(self._head_timeout):
                lines = await _read_head(reader, self._max_head, conn)
        except TimeoutError:
            if not conn.head_bytes:
                return  # an idle (pre)connection: close it quietly, answer nothing
            raise _Reject(408, "no complete request head in time") from None
        if lines is None:
            return  # connected and closed without a word: nothing to do or log
        request = _parse_request(lines)
        conn.method = request.method
        conn.dest = f"{request.host}:{request.port}"
        verdict = self.policy.decide(request.host, request.port)
        conn.decision = verdict.decision.value
        if self._observer is not None:
            try:
                self._observer(verdict)
            except Exception:  # counting must never break the connection
                log.exception("egress vm=%s: the observer failed", self.vm_id)
        if verdict.decision not in (Decision.ALLOWED, Decision.LEARNED):
            raise _Reject(403, f"{conn.dest} is denied by the egress policy: {verdict.reason}")
        if verdict.decision is Decision.LEARNED:
            conn.note = "learn mode"
        target = self.policy.target(verdict.host, request.port)
        mapped = target != (verdict.host, request.port)
        try:
            async with asyncio.timeout(self._connect_timeout):
                if not mapped:  # a real name: connect to the address we checked
                    target = await _public_address(verdict.host, request.port)
                up_reader, up_writer = await asyncio.open_connection(
                    target[0], target[1], limit=MAX_RESPONSE_HEAD
                )
        except TimeoutError:
            raise _Reject(504, "upstream connect timed out") from None
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            raise _Reject(502, f"upstream connect failed: {reason}") from None
        try:
            if request.method == "CONNECT":
                writer.write(b"HTTP/1.1 200 Connection Established\r\n\r\n")
                await writer.drain()
                conn.status = 200
                await self._tunnel(reader, writer, up_reader, up_writer, conn)
            else:
                await self._forward(request, reader, writer, up_reader, up_writer, conn)
        finally:
            up_writer.close()
            with contextlib.suppress(Exception):
                await up_writer.wait_closed()

    async def _tunnel(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        up_reader: asyncio.StreamReader,
        up_writer: asyncio.StreamWriter,
        conn: _Conn,
    ) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(self._pipe(reader, up_writer, conn, upstream=True), name="egress-up")
            group.create_task(
                self._pipe(up_reader, writer, conn, upstream=False), name="egress-down"
            )

    async def _forward(
        self,
        request: _Request,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        up_reader: asyncio.StreamReader,
        up_writer: asyncio.StreamWriter,
        conn: _Conn,
    ) -> None:
        up_writer.write(_upstream_head(request))
        await up_writer.drain()
        # The body goes up while the answer is awaited: an upstream may answer early (an
        # error, or 100 Continue that the client waits for before sending the body).
        body = asyncio.create_task(
            self._send_body(reader, up_writer, request.length, conn), name="egress-body"
        )
        try:
            while True:  # interim 1xx responses pass through, then the final one
                try:
                    head = await self._read_response_head(up_reader)
                except _Reject:
                    if conn.down:
                        raise ConnectionResetError from None  # the client has a partial answer
                    raise
                status = _status_of(head)
                if status is None or status == 101:
                    raise _Reject(502, "upstream sent an unusable response")
                data = _downstream_head(head, final=status >= 200)
                writer.write(data)
                await writer.drain()
                conn.down += len(data)
                if status >= 200:
                    conn.status = status
                    break
            length = _response_length(request.method, status, head)
            await self._pipe(up_reader, writer, conn, upstream=False, length=length)
        finally:
            body.cancel()
            await asyncio.wait([body])

    async def _send_body(
        self,
        reader: asyncio.StreamReader,
        up_writer: asyncio.StreamWriter,
        length: int,
        conn: _Conn,
    ) -> None:
        """Exactly ``length`` bytes: whatever follows is not this request's and is dropped."""
        remaining = length
        with contextlib.suppress(OSError):
            while remaining > 0:
                data = await self._read_idle(reader, min(CHUNK, remaining), conn)
                if not data:
                    return
                remaining -= len(data)
                conn.up += len(data)
                up_writer.write(data)
                await up_writer.drain()

    async def _read_response_head(self, up_reader: asyncio.StreamReader) -> list[str]:
        try:
            async with asyncio.timeout(self._idle_timeout):
                lines = await _read_head(up_reader, MAX_RESPONSE_HEAD)
        except TimeoutError:
            raise _Reject(504, "upstream did not answer in time") from None
        except _Reject as exc:
            raise _Reject(502, f"upstream response: {exc.reason}") from None
        if lines is None:
            raise _Reject(502, "upstream closed without answering")
        return lines

    async def _read_idle(self, src: asyncio.StreamReader, size: int, conn: _Conn) -> bytes:
        """Read up to ``size`` bytes; b"" at EOF or once the connection (both directions)
        has been idle for ``idle_timeout``."""
        while True:
            try:
                async with asyncio.timeout(self._idle_timeout):
                    data = await src.read(size)
            except TimeoutError:
                if time.monotonic() - conn.last_activity >= self._idle_timeout:
                    return b""
                continue
            conn.last_activity = time.monotonic()
            return data

    async def _pipe(
        self,
        src: asyncio.StreamReader,
        dst: asyncio.StreamWriter,
        conn: _Conn,
        *,
        upstream: bool,
        length: int | None = None,
    ) -> None:
        """Copy until EOF (or ``length`` bytes) with bounded reads and drain(), then
        half-close ``dst``."""
        remaining = length
        with contextlib.suppress(OSError):
            while remaining is None or remaining > 0:
                size = CHUNK if remaining is None else min(CHUNK, remaining)
                data = await self._read_idle(src, size, conn)
                if not data:
                    break
                dst.write(data)
                await dst.drain()
                if upstream:
                    conn.up += len(data)
                else:
                    conn.down += len(data)
                if remaining is not None:
                    remaining -= len(data)
            if dst.can_write_eof():
                dst.write_eof()
            else:
                dst.close()


async def _public_address(host: str, port: int) -> tuple[str, int]:
    """The address to connect to for an allowed name, resolved here once (no second lookup
    for a rebinding DNS to answer differently). A name that resolves to loopback,
    link-local (cloud metadata), multicast, unspecified or reserved space is refused: a
    wildcard rule or learn mode must not lead into the controller's host or its cloud.
    Private ranges stay reachable (an operator's internal identity provider)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    if not infos:
        raise OSError(f"{host} does not resolve")
    for *_, sockaddr in infos:
        address = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        mapped = getattr(address, "ipv4_mapped", None)
        checked = mapped or address
        if (
            checked.is_loopback
            or checked.is_link_local
            or checked.is_multicast
            or checked.is_unspecified
            or checked.is_reserved
        ):
            raise _Reject(403, f"{host}:{port} resolves to a non-public address ({address})")
    first = infos[0][4]
    return str(first[0]), int(first[1])


# --- HTTP/1.1 parsing: small, strict, bounded ------------------------------------------


async def _read_head(
    reader: asyncio.StreamReader, limit: int, conn: _Conn | None = None
) -> list[str] | None:
    """The lines of one message head, or None on a clean EOF before any byte."""
    lines: list[str] = []
    total = 0
    while True:
        try:
            raw = await reader.readline()
        except ValueError:  # a line longer than the stream's limit
            raise _Reject(431, "request head too large") from None
        if not raw:
            if total == 0:
                return None
            raise _Reject(400, "connection closed inside the request head")
        total += len(raw)
        if conn is not None:
            conn.head_bytes = total
        if total > limit:
            raise _Reject(431, "request head too large")
        if not raw.endswith(b"\n"):
            raise _Reject(400, "connection closed inside the request head")
        if raw in (b"\r\n", b"\n"):
            if lines:
                return lines
            continue  # RFC 9112 2.2: ignore empty lines before the request line
        try:
            line = raw.decode("latin-1").removesuffix("\n").removesuffix("\r")
        except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes every byte
            raise _Reject(400, "undecodable request head") from None
        lines.append(line)


def _parse_request(lines: list[str]) -> _Request:
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise _Reject(400, "malformed request line")
    method, target, version = parts
    if not _TOKEN.fullmatch(method) or version not in ("HTTP/1.0", "HTTP/1.1"):
        raise _Reject(400, "malformed request line")
    headers = _parse_headers(lines[1:])
    if method == "CONNECT":
        host, port = _parse_authority(target, default_port=None)
        return _Request(method, host, port, "", headers)
    if not target.lower().startswith("http://"):
        raise _Reject(400, "a proxy request needs an absolute http:// URL or CONNECT")
    try:
        url = urlsplit(target)
    except ValueError:
        raise _Reject(400, "malformed request URL") from None
    if "@" in url.netloc:
        raise _Reject(400, "credentials in the request URL")
    if _BAD_VALUE.search(target) or " " in target or "#" in target:
        raise _Reject(400, "malformed request URL")
    host, port = _parse_authority(url.netloc, default_port=80)
    origin = url.path or "/"
    if url.query:
        origin += "?" + url.query
    return _Request(method, host, port, origin, headers, _content_length(headers))


def _parse_headers(lines: list[str]) -> list[tuple[str, str]]:
    headers: list[tuple[str, str]] = []
    for line in lines:
        name, sep, value = line.partition(":")
        if not sep or not _TOKEN.fullmatch(name):  # also refuses obs-fold (leading space)
            raise _Reject(400, "malformed header line")
        value = value.strip(" \t")
        if _BAD_VALUE.search(value):
            raise _Reject(400, "control character in a header value")
        headers.append((name, value))
    return headers


def _parse_authority(authority: str, *, default_port: int | None) -> tuple[str, int]:
    if authority.startswith("["):
        host_part, bracket, rest = authority[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise _Reject(400, "malformed host")
        port_part = rest[1:] if rest else None
        host = _normalise_host(host_part)
    else:
        host_part, colon, port_text = authority.rpartition(":")
        if not colon:
            host_part, port_part = authority, None
        else:
            port_part = port_text
        host = _normalise_host(host_part)
    if host is None:
        raise _Reject(400, "malformed host")
    if port_part is None:
        if default_port is None:
            raise _Reject(400, "CONNECT needs host:port")
        return host, default_port
    if not port_part.isascii() or not port_part.isdigit() or not 0 < int(port_part) < 65536:
        raise _Reject(400, "malformed port")
    return host, int(port_part)


def _normalise_host(host: str) -> str | None:
    """A normalised name (``domain.egress_policy.normalise_host``: IDNA, case, trailing
    dot), an IP literal as text (the policy denies it: a 403, not a 400), or None if it is
    neither. The head was read as latin-1: a UTF-8 name is decoded back first."""
    try:
        text = host.encode("latin-1").decode("utf-8")
    except UnicodeDecodeError:
        return None
    if _BAD_VALUE.search(text) or " " in text or not text.strip():
        return None
    name = normalise_host(text)
    if name is not None:
        return name
    if is_ip_literal(text):
        literal = text.strip().lower().removesuffix(".")
        try:
            return str(ipaddress.ip_address(literal))
        except ValueError:
            return literal if _IP_TEXT.fullmatch(literal) else None
    return None


def _content_length(headers: list[tuple[str, str]]) -> int:
    lengths = {v for k, v in headers if k.lower() == "content-length"}
    chunked = any(k.lower() == "transfer-encoding" for k, _ in headers)
    if chunked and lengths:
        raise _Reject(400, "both Content-Length and Transfer-Encoding")
    if chunked:
        raise _Reject(411, "request bodies need a Content-Length")
    if not lengths:
        return 0
    if len(lengths) > 1:
        raise _Reject(400, "conflicting Content-Length headers")
    (value,) = lengths
    if not value.isascii() or not value.isdigit():
        raise _Reject(400, "malformed Content-Length")
    return int(value)


def _connection_tokens(headers: list[tuple[str, str]]) -> set[str]:
    return {
        token.strip().lower()
        for name, value in headers
        if name.lower() in ("connection", "proxy-connection")
        for token in value.split(",")
    }


def _upstream_head(request: _Request) -> bytes:
    """Origin-form request line, hop-by-hop and Proxy-* headers dropped, our Host and
    ``Connection: close`` set."""
    drop = _HOP_BY_HOP | _connection_tokens(request.headers) | {"host"}
    host = request.host if ":" not in request.host else f"[{request.host}]"
    lines = [
        f"{request.method} {request.target} HTTP/1.1",
        f"Host: {host}" + ("" if request.port == 80 else f":{request.port}"),
    ]
    lines += [
        f"{name}: {value}"
        for name, value in request.headers
        if name.lower() not in drop and not name.lower().startswith("proxy-")
    ]
    lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _status_of(head: list[str]) -> int | None:
    parts = head[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        return None
    status = int(parts[1])
    return status if 100 <= status <= 599 else None


def _response_length(method: str, status: int, head: list[str]) -> int | None:
    """The body length of a response (RFC 9112 6.3), or None for "until the upstream
    closes" (chunked or unframed: ``Connection: close`` makes the upstream close)."""
    if method == "HEAD" or status in (204, 304):
        return 0
    headers = _parse_headers(head[1:])
    if any(name.lower() == "transfer-encoding" for name, _ in headers):
        return None
    lengths = {value for name, value in headers if name.lower() == "content-length"}
    if len(lengths) != 1:
        return None
    (value,) = lengths
    return int(value) if value.isascii() and value.isdigit() else None


def _downstream_head(head: list[str], *, final: bool) -> bytes:
    """The upstream response head, with ``Connection: close`` on the final response."""
    if not final:
        return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1")
    try:
        headers = _parse_headers(head[1:])
    except _Reject:
        raise _Reject(502, "upstream sent malformed headers") from None
    drop = (_HOP_BY_HOP - {"transfer-encoding", "trailer"}) | _connection_tokens(headers)
    lines = [head[0]]
    lines += [f"{name}: {value}" for name, value in headers if name.lower() not in drop]
    lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def _send_error(writer: asyncio.StreamWriter, status: int, detail: str | None) -> None:
    body = f"{status} {_REASONS.get(status, 'Error')}" + (f": {detail}" if detail else "")
    data = (body + "\n").encode()
    head = (
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(data)}\r\n"
        "Connection: close\r\n\r\n"
    )
    with contextlib.suppress(ConnectionError):
        writer.write(head.encode() + data)
        await writer.drain()


def _unlink_if(path: Path, inode: tuple[int, int]) -> None:
    """Remove the socket file if it is still ours (not a successor's at the same path)."""
    with contextlib.suppress(FileNotFoundError):
        st = path.lstat()
        if (st.st_dev, st.st_ino) == inode:
            path.unlink()


def _bind_long(sock: socket.socket, path: Path) -> None:
    """Bind even when ``path`` is longer than sun_path allows (deep data dirs), by naming
    it through ``/proc/self/fd`` of its directory."""
    if len(os.fsencode(path)) < 100:
        sock.bind(os.fspath(path))
        return
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        sock.bind(f"/proc/self/fd/{fd}/{path.name}")
    finally:
        os.close(fd)


def _bind_unix(path: Path) -> tuple[socket.socket, tuple[int, int]]:
    """A listening-ready Unix socket at ``path`` with mode 0600 from the first instant: bound
    under a temporary name, chmod-ed (and given to the owner of its directory), then renamed
    into place."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise FileExistsError(f"{path} exists and is not a socket")
        path.unlink()  # a stale socket from an earlier controller
    tmp = path.with_name(f".{secrets.token_hex(4)}")  # short: AF_UNIX paths max 107 bytes
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        _bind_long(sock, tmp)
        os.chmod(tmp, 0o600)
        owner = path.parent.stat()
        if os.geteuid() == 0 and owner.st_uid != 0:
            # A VM's state dir belongs to the VM's own uid: so does its egress socket.
            os.chown(tmp, owner.st_uid, owner.st_gid)
        os.rename(tmp, path)
        st = path.lstat()
    except BaseException:
        sock.close()
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    sock.setblocking(False)
    return sock, (st.st_dev, st.st_ino)
