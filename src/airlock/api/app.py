"""``create_app()``: the FastAPI application, its lifespan and its error mapping.

The lifespan owns one ``Core`` (built from ``Settings`` unless one is handed in): it is
started before the first request and closed after the last. With ``demo=True`` the bundled
demo identity provider is served as well, on ``127.0.0.1:{demo_idp_port}``, by a second
uvicorn server that the lifespan owns.

Every error answers ``{"error": {"code", "message"}}``: ``AirlockError`` with its own status
and code, an illegal state move 409, bad input 400/413/422, unknown routes 404/405, and
anything unexpected 500 ``internal`` (logged here, with no detail in the answer).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator, Iterator
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import airlock
from airlock.aio import TaskOwner
from airlock.api import static
from airlock.api.clients import ClientLimiter, ClientRateLimit, parse_networks
from airlock.api.deps import ViewerSigner
from airlock.api.routes import ROUTERS
from airlock.api.schemas import error_body
from airlock.domain import IllegalTransition
from airlock.errors import AirlockError, Unauthorized
from airlock.services.core import Core
from airlock.services.viewers import ViewerRegistry
from airlock.settings import Settings
from airlock.store.db import database_unavailable

log = logging.getLogger("airlock.api")

MAX_BODY_BYTES = 64 * 1024
IDP_START_TIMEOUT_S = 10.0
IDP_STOP_TIMEOUT_S = 5.0


def create_app(
    settings: Settings | None = None, *, demo: bool = False, core: Core | None = None
) -> FastAPI:
    """The controller's HTTP app. ``core``: use this one (tests); its settings win."""
    if core is not None:
        settings = core.settings
    elif settings is None:
        settings = Settings()
    cfg = settings

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        owned = core or Core(cfg, demo=demo)
        tasks = TaskOwner("api")
        try:
            await owned.start()
            app.state.core = owned
            assert owned.vault is not None  # start() opened it
            app.state.viewer_signer = ViewerSigner.from_vault(owned.vault, cfg.viewer_token_ttl)
            app.state.viewers = viewers = ViewerRegistry(owned)
            idp = await _start_demo_idp(cfg, tasks) if demo else None
            try:
                yield
            finally:
                await viewers.close()  # open VNC sockets close with 1001
                if idp is not None:
                    server, task = idp
                    server.should_exit = True  # a graceful stop first; close() cancels
                    await asyncio.wait({task}, timeout=IDP_STOP_TIMEOUT_S)
        finally:
            await tasks.close()
            await owned.close()

    app = FastAPI(
        title="Airlock",
        version=airlock.__version__,
        description="Control plane for per-user AI-coding microVMs: browser-VM logins, "
        "credential capture and handoff. Every `/api` route needs `Authorization: Bearer "
        "<token>` (`airlock tokens create`). Errors answer "
        '`{"error": {"code": ..., "message": ...}}`.',
        lifespan=lifespan,
    )
    for router in ROUTERS:
        app.include_router(router)
    static.mount(app)  # the dashboard at /, our scripts, noVNC's modules
    _install_error_handlers(app)
    app.add_middleware(JsonByDefault)
    app.add_middleware(NoStore)
    app.add_middleware(BodyLimit, max_bytes=MAX_BODY_BYTES)
    app.add_middleware(
        ClientRateLimit,
        limiter=(
            ClientLimiter(cfg.client_requests_per_minute)
            if cfg.client_requests_per_minute > 0
            else None
        ),
        trusted=parse_networks(cfg.trusted_proxies),
    )
    app.add_middleware(InternalErrors)  # outermost of ours: catches whatever escapes
    return app


# --- errors -------------------------------------------------------------------------------
def _json_error(status: int, code: str, message: str, **headers: str) -> JSONResponse:
    return JSONResponse(error_body(code, message), status_code=status, headers=headers or None)


DATABASE_RETRY_AFTER_S = 5  # a pool timeout or a failover: a few seconds, not a minute

_HTTP_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
}


def _install_error_handlers(app: FastAPI) -> None:
    async def airlock_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, AirlockError)
        if exc.status >= 500:
            log.warning("request failed: %s (%s)", exc.code, exc.message)
        headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, Unauthorized) else {}
        if exc.retry_after is not None:
            headers["Retry-After"] = str(exc.retry_after)
        return _json_error(exc.status, exc.code, exc.message, **headers)

    async def illegal_transition(_: Request, exc: Exception) -> JSONResponse:
        return _json_error(409, "conflict", str(exc))

    async def invalid_request(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        errors = list(exc.errors())
        if errors and all(tuple(e.get("loc", ()))[:1] == ("path",) for e in errors):
            # A malformed id in the path: the same 400 the services give (http-api.md).
            return _json_error(400, "invalid_id", _describe(errors))
        return _json_error(422, "invalid_request", _describe(errors))

    async def http_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        return _json_error(exc.status_code, code, message, **(exc.headers or {}))

    async def database_error(_: Request, exc: Exception) -> JSONResponse:
        if not database_unavailable(exc):
            raise exc  # a wrong query is a bug: InternalErrors logs it and answers 500
        log.warning("database unavailable: %s", type(exc).__name__)
        return _json_error(
            503,
            "database_unavailable",
            "the database is not answering right now; retry shortly",
            **{"Retry-After": str(DATABASE_RETRY_AFTER_S)},
        )

    app.add_exception_handler(AirlockError, airlock_error)
    app.add_exception_handler(SQLAlchemyError, database_error)
    app.add_exception_handler(IllegalTransition, illegal_transition)
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(StarletteHTTPException, http_error)


def _describe(errors: Any) -> str:
    """``body.userId: String should match pattern ...; query.limit: ...``"""
    parts = []
    for err in list(errors)[:5]:
        where = ".".join(str(p) for p in err.get("loc", ()))
        parts.append(f"{where}: {err.get('msg', 'invalid')}" if where else err.get("msg", ""))
    return "; ".join(parts) or "invalid request"


class InternalErrors:
    """Anything no handler took: log it with its traceback, answer 500 ``internal`` with no
    detail. (Starlette's own last-resort handler re-raises to the server, which would log
    the same error twice.)"""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception:
            log.exception("unhandled error in %s %s", scope.get("method"), scope.get("path"))
            if started:
                raise  # the answer is on its way: only the server can end it
            response = _json_error(500, "internal", "internal error; see the controller's log")
            await response(scope, receive, send)


class NoStore:
    """``Cache-Control: no-store`` on every ``/api`` answer that sets no cache policy of
    its own: session answers carry viewer tokens (``novncURL``), and every other one is
    one user's data; neither belongs in a browser's or a proxy's cache."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/api/"):
            await self.app(scope, receive, send)
            return

        async def with_policy(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", ()))
                if not any(k.lower() == b"cache-control" for k, _ in headers):
                    headers.append((b"cache-control", b"no-store"))
                    message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, with_policy)


class JsonByDefault:
    """The API speaks JSON only, so a body sent as curl's default form type (``curl -d
    '{...}'``, as the original controller's callers do) or with no type at all is read as
    JSON. Anything else keeps its type and is refused by validation as before."""

    _FORM = b"application/x-www-form-urlencoded"

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/api/"):
            headers = [(k, v) for k, v in scope.get("headers", ()) if k != b"content-type"]
            kind = dict(scope.get("headers", ())).get(b"content-type")
            if kind is None or kind.split(b";")[0].strip().lower() == self._FORM:
                scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
        await self.app(scope, receive, send)


class BodyLimit:
    """Refuse request bodies over ``max_bytes`` with 413: by ``Content-Length`` up front, or
    while a body without one streams in (raised from ``receive``, so the route's body
    parsing hands it to the HTTP error handler)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _message(self) -> str:
        return f"request body over {self.max_bytes} bytes"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", ())).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await _json_error(413, "body_too_large", self._message())(scope, receive, send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise StarletteHTTPException(413, self._message())
            return message

        await self.app(scope, counted, send)


# --- the demo identity provider -----------------------------------------------------------
class _NestedServer(uvicorn.Server):
    """A uvicorn server inside another one's process: the outer server handles signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def _start_demo_idp(
    settings: Settings, tasks: TaskOwner
) -> tuple[uvicorn.Server, asyncio.Task[None]]:
    # Imported here: the API works without the demo IdP module.
    from airlock.demo_idp.app import create_idp_app
    from airlock.providers.oauth2 import demo_idp_issuer

    idp_app = create_idp_app(
        issuer=demo_idp_issuer(settings.demo_idp_port),
        user=settings.demo_user,
        password=settings.demo_password,
        admin_token=settings.demo_idp_admin_token or None,
    )
    # Bind first, so a busy port is a clear error here instead of uvicorn exiting the process.
    try:
        sock = socket.create_server(("127.0.0.1", settings.demo_idp_port))
    except OSError as exc:
        raise RuntimeError(
            f"the demo IdP cannot listen on 127.0.0.1:{settings.demo_idp_port}: {exc} "
            "(set AIRLOCK_DEMO_IDP_PORT)"
        ) from exc
    config = uvicorn.Config(idp_app, log_config=None, lifespan="off", access_log=False)
    server = _NestedServer(config)
    task = tasks.spawn(server.serve(sockets=[sock]), name="demo-idp")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + IDP_START_TIMEOUT_S
    while not server.started:
        if task.done() or loop.time() > deadline:
            sock.close()
            raise RuntimeError("the demo IdP did not start")
        await asyncio.sleep(0.02)
    log.info("demo IdP on 127.0.0.1:%d", settings.demo_idp_port)
    return server, task
