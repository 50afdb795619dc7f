"""The controller's side of the guest agent protocol (``agent.protocol``).

Runtime-agnostic: it speaks over any byte stream a runtime hands it (a Unix socket for
``sandbox``, a forwarded port for ``qemu``, vsock for ``firecracker``). Every failure (an
error answer, a timeout, a closed stream, garbage) is raised as ``AgentError``, a
``RuntimeFailure``, so services need to catch one thing.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol

from airlock.agent import protocol, streams
from airlock.errors import RuntimeFailure

Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]

DEFAULT_TIMEOUT_S = 30.0
MARGIN_S = 10.0  # on top of an operation's own timeout (capture, run), for the answer to travel


class AgentError(RuntimeFailure):
    """The agent refused or failed an operation, or the channel to it broke. ``code`` is the
    agent's error code (``unauthorized``, ``bad_request``, ...) or one of ``timeout``,
    ``closed``, ``protocol`` for channel failures."""

    def __init__(self, message: str, *, code: str = "agent_error") -> None:
        super().__init__(message, code=code)


class SupportsToWire(Protocol):
    """A ``providers.base.LoginPlan`` (structurally: the agent layer may not import it)."""

    def to_wire(self) -> dict[str, Any]: ...


@dataclass(frozen=True, slots=True)
class FileWrite:
    """One file for ``write_files``: a path relative to the VM user's home (or absolute)."""

    path: str
    content: bytes
    mode: int = 0o600


@dataclass(frozen=True, slots=True)
class RunResult:
    exit_code: int | None  # None when it timed out
    stdout: str
    stderr: str
    timed_out: bool = False
    truncated: bool = False


async def read_line(reader: asyncio.StreamReader, limit: int = protocol.MAX_MESSAGE) -> bytes:
    """One message line (``streams.read_line``); any end of the stream, clean or inside a
    message, is ``closed``, a line over ``limit`` is ``protocol``."""
    try:
        line = await streams.read_line(reader, limit)
    except streams.TruncatedMessage:
        line = None
    except protocol.ProtocolError:
        raise AgentError("message from the agent is too large", code="protocol") from None
    if line is None:
        raise AgentError("the agent closed the connection", code="closed")
    return line


async def http_get(stream: Stream, path: str) -> tuple[int, bytes]:
    """A minimal HTTP/1.1 GET over a piped stream (Chromium's DevTools keeps the connection
    open, so the body is read by its Content-Length)."""
    reader, writer = stream
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
    return status, await reader.readexactly(length)


class AgentClient:
    """One authenticated connection to one guest agent. Requests are serialised (the protocol
    allows one at a time per connection); open more clients for concurrency. A request that
    times out closes the connection, since its answer could still arrive later."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        hello: Mapping[str, Any] | None = None,
    ) -> None:
        """Wrap a stream that has already said hello (e.g. from ``Runtime.open_agent``)."""
        self._reader = reader
        self._writer = writer
        self._timeout_s = timeout_s
        self._ids = itertools.count(1)
        self._lock = asyncio.Lock()
        self._closed = False
        self.hello: dict[str, Any] = dict(hello or {})

    @classmethod
    async def connect(
        cls,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        secret: str,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> AgentClient:
        """Say hello with the VM's secret over a fresh stream. Closes the stream on failure."""
        client = cls(reader, writer, timeout_s=timeout_s)
        try:
            answer = await client._exchange({"op": "hello", "secret": secret}, None, timeout_s)
        except BaseException:
            await client.close()
            raise
        if not answer.get("ok"):
            await client.close()
            raise _error_from(answer)
        result = answer.get("result")
        client.hello = dict(result) if isinstance(result, dict) else {}
        return client

    @property
    def stream(self) -> Stream:
        return self._reader, self._writer

    @property
    def closed(self) -> bool:
        return self._closed

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._writer.wait_closed(), 1)

    async def __aenter__(self) -> AgentClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _exchange(
        self, message: dict[str, Any], rid: int | None, timeout_s: float
    ) -> dict[str, Any]:
        if self._closed:
            raise AgentError("the agent connection is closed", code="closed")
        try:
            async with asyncio.timeout(timeout_s):
                self._writer.write(protocol.encode(message))
                await self._writer.drain()
                answer = protocol.decode(await read_line(self._reader))
        except TimeoutError:
            await self.close()
            raise AgentError(
                f"no answer to {message.get('op')} within {timeout_s:g} s", code="timeout"
            ) from None
        except protocol.ProtocolError as exc:
            await self.close()
            raise AgentError(f"bad message from the agent: {exc}", code="protocol") from None
        except AgentError:
            await self.close()
            raise
        except (ConnectionError, OSError) as exc:
            await self.close()
            raise AgentError(f"agent connection failed: {exc}", code="closed") from None
        if rid is not None and answer.get("id") != rid:
            await self.close()
            raise AgentError(f"answer for id {answer.get('id')!r}, not {rid}", code="protocol")
        return answer

    async def request(
        self, op: str, args: Mapping[str, Any] | None = None, *, timeout_s: float | None = None
    ) -> dict[str, Any]:
        """Send one request and return its ``result``; raise ``AgentError`` on an error."""
        async with self._lock:
            rid = next(self._ids)
            message = {"id": rid, "op": op, **(args or {})}
            answer = await self._exchange(message, rid, timeout_s or self._timeout_s)
        if not answer.get("ok"):
            raise _error_from(answer)
        result = answer.get("result")
        if not isinstance(result, dict):
            raise AgentError(f"{op}: the answer has no result object", code="protocol")
        return result

    async def ping(self) -> dict[str, Any]:
        return await self.request("ping")

    async def start_login(self, plan: SupportsToWire) -> None:
        await self.request("start_login", {"login": plan.to_wire()})

    async def login_status(self) -> dict[str, Any]:
        """``{state: "idle"|"running"|"exited", exit_code, url, captured}``."""
        return await self.request("login_status")

    async def capture(self, timeout_s: float) -> dict[str, Any]:
        """Long poll, as on the wire: ``{captured: false}`` or ``{captured: true, files:
        {home-relative path: base64}}``. ``capture_files`` decodes it."""
        return await self.request(
            "capture", {"timeout_s": timeout_s}, timeout_s=timeout_s + MARGIN_S
        )

    async def capture_files(self, timeout_s: float) -> dict[str, bytes] | None:
        """Long poll: the captured files by home-relative path, or None if not yet."""
        r = await self.capture(timeout_s)
        if not r.get("captured"):
            return None
        files = r.get("files")
        if not isinstance(files, dict):
            raise AgentError("capture: no files in a captured answer", code="protocol")
        try:
            return {str(p): base64.b64decode(d, validate=True) for p, d in files.items()}
        except (binascii.Error, TypeError, ValueError):
            raise AgentError("capture: a file is not base64", code="protocol") from None

    async def ack_capture(self) -> list[str]:
        return _paths(await self.request("ack_capture"), "wiped")

    async def write_files(
        self, files: Mapping[str, bytes] | Sequence[FileWrite], *, mode: int = 0o600
    ) -> list[str]:
        """Atomic writes; a mapping of path -> content uses ``mode`` for every file."""
        items = (
            [FileWrite(p, c, mode) for p, c in files.items()]
            if isinstance(files, Mapping)
            else list(files)
        )
        wire = [
            {"path": f.path, "content_b64": base64.b64encode(f.content).decode(), "mode": f.mode}
            for f in items
        ]
        return _paths(await self.request("write_files", {"files": wire}), "written")

    async def run(
        self,
        argv: Sequence[str],
        *,
        timeout_s: float = 30.0,
        env: Mapping[str, str] | None = None,
    ) -> RunResult:
        args: dict[str, Any] = {"argv": list(argv), "timeout_s": timeout_s}
        if env:
            args["env"] = dict(env)
        r = await self.request("run", args, timeout_s=timeout_s + MARGIN_S)
        code = r.get("exit_code")
        return RunResult(
            exit_code=code if isinstance(code, int) else None,
            stdout=str(r.get("stdout", "")),
            stderr=str(r.get("stderr", "")),
            timed_out=bool(r.get("timed_out")),
            truncated=bool(r.get("truncated")),
        )

    async def wipe(self, paths: Sequence[str]) -> list[str]:
        return _paths(await self.request("wipe", {"paths": list(paths)}), "wiped")

    async def lease(self, for_ms: int, margin_ms: int = 0) -> int:
        """Renew a browser VM's lease; the milliseconds until it ends itself unrenewed."""
        result = await self.request("lease", {"for_ms": for_ms, "margin_ms": margin_ms})
        ends_in = result.get("ends_in_ms")
        if not isinstance(ends_in, int):
            raise AgentError("lease: the answer has no ends_in_ms", code="protocol")
        return ends_in

    async def restored(self, new_secret: str, entropy: bytes) -> dict[str, Any]:
        """After a snapshot restore: fresh entropy, machine id and secret in the guest."""
        return await self.request(
            "restored", {"secret": new_secret, "entropy": base64.b64encode(entropy).decode()}
        )

    async def connect_port(self, port: int) -> Stream:
        """Turn this connection into a raw pipe to ``127.0.0.1:port`` inside the VM. The
        client is used up: the returned stream belongs to the caller."""
        await self.request("connect", {"port": port})
        self._closed = True  # no more requests on this stream; closing it is the caller's
        return self._reader, self._writer


def _error_from(answer: Mapping[str, Any]) -> AgentError:
    error = answer.get("error")
    if not isinstance(error, dict):
        return AgentError("the agent failed without saying why", code="protocol")
    code = error.get("code")
    message = error.get("message")
    return AgentError(
        str(message) if message else "the agent refused", code=str(code or "agent_error")
    )


def _paths(result: Mapping[str, Any], key: str) -> list[str]:
    value = result.get(key)
    if not isinstance(value, list):
        raise AgentError(f"the answer has no {key} list", code="protocol")
    return [str(p) for p in value]
