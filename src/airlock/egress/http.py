"""HTTP/1.1 as the egress proxy speaks it: small, strict, bounded. A request head is read
line by line up to a limit, parsed into a ``Request`` (CONNECT's authority or an absolute
URL's, its host normalised as the policy normalises rules), rewritten for the upstream with
hop-by-hop headers dropped and ``Connection: close``; the upstream's response head likewise.
Anything malformed raises ``Reject``, which the proxy answers with its status and closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import re
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit

from airlock.domain.egress_policy import is_ip_literal, normalise_host

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


class Reject(Exception):
    """Answer the client with ``status`` and close; ``reason`` is for the log only."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(slots=True)
class Request:
    method: str
    host: str
    port: int
    target: str  # origin-form for plain HTTP, empty for CONNECT
    headers: list[tuple[str, str]]
    length: int = 0  # request body bytes (Content-Length) for plain HTTP


class HeadProgress(Protocol):
    """Where ``read_head`` counts the head's bytes as they come (the connection's log)."""

    head_bytes: int


async def read_head(
    reader: asyncio.StreamReader, limit: int, conn: HeadProgress | None = None
) -> list[str] | None:
    """The lines of one message head, or None on a clean EOF before any byte."""
    lines: list[str] = []
    total = 0
    while True:
        try:
            raw = await reader.readline()
        except ValueError:  # a line longer than the stream's limit
            raise Reject(431, "request head too large") from None
        if not raw:
            if total == 0:
                return None
            raise Reject(400, "connection closed inside the request head")
        total += len(raw)
        if conn is not None:
            conn.head_bytes = total
        if total > limit:
            raise Reject(431, "request head too large")
        if not raw.endswith(b"\n"):
            raise Reject(400, "connection closed inside the request head")
        if raw in (b"\r\n", b"\n"):
            if lines:
                return lines
            continue  # RFC 9112 2.2: ignore empty lines before the request line
        try:
            line = raw.decode("latin-1").removesuffix("\n").removesuffix("\r")
        except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes every byte
            raise Reject(400, "undecodable request head") from None
        lines.append(line)


def parse_request(lines: list[str]) -> Request:
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise Reject(400, "malformed request line")
    method, target, version = parts
    if not _TOKEN.fullmatch(method) or version not in ("HTTP/1.0", "HTTP/1.1"):
        raise Reject(400, "malformed request line")
    headers = _parse_headers(lines[1:])
    if method == "CONNECT":
        host, port = _parse_authority(target, default_port=None)
        return Request(method, host, port, "", headers)
    if not target.lower().startswith("http://"):
        raise Reject(400, "a proxy request needs an absolute http:// URL or CONNECT")
    try:
        url = urlsplit(target)
    except ValueError:
        raise Reject(400, "malformed request URL") from None
    if "@" in url.netloc:
        raise Reject(400, "credentials in the request URL")
    if _BAD_VALUE.search(target) or " " in target or "#" in target:
        raise Reject(400, "malformed request URL")
    host, port = _parse_authority(url.netloc, default_port=80)
    origin = url.path or "/"
    if url.query:
        origin += "?" + url.query
    return Request(method, host, port, origin, headers, _content_length(headers))


def _parse_headers(lines: list[str]) -> list[tuple[str, str]]:
    headers: list[tuple[str, str]] = []
    for line in lines:
        name, sep, value = line.partition(":")
        if not sep or not _TOKEN.fullmatch(name):  # also refuses obs-fold (leading space)
            raise Reject(400, "malformed header line")
        value = value.strip(" \t")
        if _BAD_VALUE.search(value):
            raise Reject(400, "control character in a header value")
        headers.append((name, value))
    return headers


def _parse_authority(authority: str, *, default_port: int | None) -> tuple[str, int]:
    if authority.startswith("["):
        host_part, bracket, rest = authority[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise Reject(400, "malformed host")
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
        raise Reject(400, "malformed host")
    if port_part is None:
        if default_port is None:
            raise Reject(400, "CONNECT needs host:port")
        return host, default_port
    if not port_part.isascii() or not port_part.isdigit() or not 0 < int(port_part) < 65536:
        raise Reject(400, "malformed port")
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
        raise Reject(400, "both Content-Length and Transfer-Encoding")
    if chunked:
        raise Reject(411, "request bodies need a Content-Length")
    if not lengths:
        return 0
    if len(lengths) > 1:
        raise Reject(400, "conflicting Content-Length headers")
    (value,) = lengths
    if not value.isascii() or not value.isdigit():
        raise Reject(400, "malformed Content-Length")
    return int(value)


def _connection_tokens(headers: list[tuple[str, str]]) -> set[str]:
    return {
        token.strip().lower()
        for name, value in headers
        if name.lower() in ("connection", "proxy-connection")
        for token in value.split(",")
    }


def upstream_head(request: Request) -> bytes:
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


def status_of(head: list[str]) -> int | None:
    parts = head[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        return None
    status = int(parts[1])
    return status if 100 <= status <= 599 else None


def response_length(method: str, status: int, head: list[str]) -> int | None:
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


def downstream_head(head: list[str], *, final: bool) -> bytes:
    """The upstream response head, with ``Connection: close`` on the final response."""
    if not final:
        return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1")
    try:
        headers = _parse_headers(head[1:])
    except Reject:
        raise Reject(502, "upstream sent malformed headers") from None
    drop = (_HOP_BY_HOP - {"transfer-encoding", "trailer"}) | _connection_tokens(headers)
    lines = [head[0]]
    lines += [f"{name}: {value}" for name, value in headers if name.lower() not in drop]
    lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def send_error(writer: asyncio.StreamWriter, status: int, detail: str | None) -> None:
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
