"""A real uvicorn server in the test's own event loop, on a free loopback port, so a
WebSocket client (``websockets``) reaches the app the way a browser does."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping

import httpx
import uvicorn
from fastapi import FastAPI

from airlock.api.vnc_proxy import SERVER_OPTIONS
from tests.lifecycle_helpers import wait_for


class _QuietServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # pytest owns the signals


@contextlib.asynccontextmanager
async def serve(app: FastAPI, *, lifespan: bool, port: int = 0) -> AsyncIterator[str]:
    """Serve ``app`` on ``127.0.0.1:{free port}``; yields its base URL (``http://...``).
    ``lifespan=False`` when the test already runs the app's lifespan itself."""
    sock = socket.create_server(("127.0.0.1", port))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app,
        log_config=None,
        lifespan="on" if lifespan else "off",
        access_log=False,
        **SERVER_OPTIONS,  # as `airlock serve` runs it
    )
    server = _QuietServer(config)
    task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]), name="uvicorn")
    try:

        def started() -> bool:
            if task.done():
                task.result()
                raise RuntimeError("the server did not start")
            return bool(server.started)

        await wait_for(started, timeout=30, interval=0.02, what="the server starts")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        try:
            async with asyncio.timeout(15):
                await task
        finally:
            sock.close()


OnLine = Callable[[str, list[str]], Awaitable[None]]


async def read_sse(
    app: FastAPI,
    path: str,
    on_line: OnLine,
    *,
    headers: Mapping[str, str] | None = None,
    params: Mapping[str, str] | None = None,
) -> str:
    """An SSE stream's whole text, read over a real socket as it comes (the in-process
    client hands a stream over only once it ended). ``on_line(line, lines so far)`` runs
    after each line, so a test changes things once the stream has sent what comes
    before, instead of sleeping and hoping it had."""
    lines: list[str] = []
    async with (
        serve(app, lifespan=False) as url,
        httpx.AsyncClient(base_url=url, timeout=20) as client,
        client.stream("GET", path, headers=headers, params=params) as r,
    ):
        assert r.status_code == 200, await r.aread()
        assert r.headers["content-type"].startswith("text/event-stream")
        async for line in r.aiter_lines():
            lines.append(line)
            await on_line(line, lines)
    return "\n".join(lines) + "\n"
