"""The demo identity provider: a small but real OAuth 2.0 authorization server.

A demo server for offline use and tests, not for real accounts: one user, one public client,
state in memory (bounded, expiring), a signing key made per process. What it does, it does
by the book, so that the ``oauth2`` provider is exercised against real protocol behaviour:

- RFC 8414 metadata at ``/.well-known/oauth-authorization-server``;
- the authorization code grant (RFC 6749 4.1) with PKCE S256 required (RFC 7636) and
  loopback redirect URIs only, any port (RFC 8252 7.3); errors are shown on a page until
  the redirect URI is validated, then redirected to it (RFC 6749 4.1.2.1);
- codes that are random, single use, valid 60 s and bound to the client, redirect URI and
  PKCE challenge; a replayed code revokes what it was exchanged for (RFC 6749 4.1.2);
- rotating refresh tokens: each use returns a new one, and presenting a rotated one
  revokes the whole grant (RFC 9700 4.14.2); RFC 7662 introspection at ``/introspect``
  (whether a token is still active, without using it); the tokens are ``demo_idp.tokens``'s;
- ``/admin`` (only with an ``admin_token``, for its bearer): each grant's counters
  (refreshes accepted and refused, rotated refresh tokens seen again) and revoking a
  grant, so tests can prove that nobody reused a token and what a revoked login looks like;
- an RS256 ``id_token`` when ``openid`` is asked for, signed with a per-process key that
  ``/.well-known/jwks.json`` publishes (``keys.SigningKeys``), and ``/userinfo`` for bearer
  tokens. The ``id_token`` is a platform user JWT that Airlock accepts when configured
  with this JWKS, issuer and the client id as audience.

The sign-in form puts the user name first (autofocus), then the password, then the submit
button, so that a person or a test typing through VNC can sign in with the keyboard alone.

Like a real login page, it is served on more than one name (all on one port; the browser
VM's egress proxy leads every allowed ``*.airlock.test`` name here): the page itself on the
issuer's host (``idp.airlock.test``), its stylesheet and script on an asset host
(``static.idp.airlock.test``, only there), and a single sign-on path on a third host
(``sso.login.airlock.test``, only there) whose button the script renders. The SSO path
signs the same demo user in on its own form and hands a one-time ticket back to
``/sso/callback`` on the issuer's host, which completes the authorization as the form does.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import html
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from string import Template
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from fastapi import FastAPI, Request
from fastapi.responses import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
)

from airlock.demo_idp.keys import SigningKeys
from airlock.demo_idp.tokens import (
    ACCESS_TTL,
    REFRESH_TTL,
    SCOPES_SUPPORTED,
    OAuthError,
    TokenStore,
)
from airlock.demo_idp.tokens import Expiring as _Expiring

PENDING_TTL = 600.0
TICKET_TTL = 60.0
MAX_FORM = 64 * 1024
MAX_SIGN_IN_FAILURES = 5
LOCKOUT_S = 900.0  # the guesses a (client, user name) has left come back this long after
LOCKED_OUT = (
    "Too many wrong attempts for this user. Wait 15 minutes, then start again from the application."
)
DEFAULT_SCOPE = "openid profile"

_CHALLENGE = re.compile(r"[A-Za-z0-9_-]{43}")  # base64url of a SHA-256, unpadded
_LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


@dataclass(slots=True)
class _Pending:
    """An authorization request waiting for the user to sign in."""

    client_id: str
    redirect_uri: str
    code_challenge: str
    scope: str
    state: str | None
    nonce: str | None


class _State:
    """What the sign-in pages remember, each table bounded and expiring; the tokens are
    ``tokens``'s."""

    def __init__(self, clock: Callable[[], float], tokens: TokenStore) -> None:
        self.tokens = tokens
        self.pending = _Expiring[_Pending](clock)
        # Wrong sign-ins per (client, user name), not per request: a new /authorize would
        # otherwise give a guesser five more tries. Each failure restarts the window.
        self.failures = _Expiring[int](clock)
        self.tickets = _Expiring[str](clock)  # SSO ticket -> pending request id

    def locked_out(self, client_id: str, user_ok: bool, password_ok: bool) -> bool:
        """Count a wrong password for the real user (made-up user names cost nothing and
        store nothing: one entry per client); ``True`` once the user is locked out, even
        with the right password, until ``LOCKOUT_S`` after the last failure."""
        guesser = f"{client_id}\x00"
        failures = self.failures.get(guesser) or 0
        if not user_ok:
            return False
        if failures < MAX_SIGN_IN_FAILURES and not password_ok:
            failures += 1
            self.failures.put(guesser, failures, LOCKOUT_S)
        if failures >= MAX_SIGN_IN_FAILURES:
            return True
        if password_ok:
            self.failures.pop(guesser)
        return False


def create_idp_app(
    *,
    issuer: str,
    user: str,
    password: str,
    client_id: str = "airlock-demo",
    clock: Callable[[], float] = time.time,
    access_ttl: int = ACCESS_TTL,
    refresh_ttl: int = REFRESH_TTL,
    admin_token: str | None = None,
) -> FastAPI:
    """The demo authorization server for ``issuer`` (e.g. ``http://idp.airlock.test:4001``),
    with one user and one public client. ``clock`` (epoch seconds) is for tests. Its asset
    host is ``static.<issuer host>``, its SSO host ``sso.login.<issuer host minus its first
    label>``, same scheme and port. ``admin_token`` turns on the ``/admin`` routes (the
    grants' counters, revoking a grant) for bearers of it; without it they are 404."""
    parts = urlsplit(issuer)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise ValueError(f"issuer must be an http(s) URL without query or fragment: {issuer!r}")
    if parts.hostname.count(".") < 2:
        raise ValueError(f"the issuer needs a host name of three labels or more: {issuer!r}")
    port = f":{parts.port}" if parts.port else ""
    issuer_host = parts.hostname.lower()
    static_host = f"static.{parts.hostname}"
    sso_host = f"sso.login.{parts.hostname.split('.', 1)[1]}"
    static_origin = f"{parts.scheme}://{static_host}{port}"
    sso_origin = f"{parts.scheme}://{sso_host}{port}"
    if not user or not password:
        raise ValueError("the demo user needs a name and a password")
    issuer = issuer.rstrip("/")
    keys = SigningKeys()  # per process: tokens die with the demo server
    subject = user
    email = f"{user}@airlock.test"

    def sign_id_token(client: str, grant: str, nonce: str | None, now: int) -> str:
        claims: dict[str, Any] = {
            "iss": issuer,
            "sub": subject,
            "aud": client,
            "iat": now,
            "exp": now + access_ttl,
            "sid": grant,  # OIDC's session id: which grant (sign-in) this is, for /admin
            "email": email,
            "email_verified": True,
            "name": f"{user} (demo)",
        }
        if nonce is not None:
            claims["nonce"] = nonce
        return keys.sign(claims)

    tokens = TokenStore(clock, sign_id_token, access_ttl=access_ttl, refresh_ttl=refresh_ttl)
    state = _State(clock, tokens)
    login_page = Template(_template("login.html"))
    error_page = Template(_template("error.html"))
    sso_page = Template(_template("sso.html"))
    assets = {name: _template(f"static/{name}") for name in ("login.css", "login.js")}
    login_headers = {
        **_PAGE_HEADERS,
        "Content-Security-Policy": f"default-src 'none'; style-src {static_origin}; "
        f"script-src {static_origin}; frame-ancestors 'none'; base-uri 'none'",
    }
    app = FastAPI(
        title="Airlock demo identity provider", docs_url=None, redoc_url=None, openapi_url=None
    )

    def page(template: Template, status: int, **values: str) -> HTMLResponse:
        text = template.substitute({k: html.escape(v) for k, v in values.items()})
        return HTMLResponse(text, status_code=status, headers=_PAGE_HEADERS)

    def error_page_response(message: str, status: int = 400) -> HTMLResponse:
        return page(
            error_page,
            status,
            title="Demo identity provider — error",
            heading="This sign-in request cannot be completed",
            message=message,
        )

    def login_form(request_id: str, pending: _Pending, error: str | None) -> HTMLResponse:
        text = login_page.substitute(
            title=html.escape("Demo identity provider — sign in"),
            client_id=html.escape(pending.client_id),
            scope=html.escape(pending.scope),
            action=html.escape(f"{issuer}/authorize"),
            request_id=html.escape(request_id),
            static_origin=html.escape(static_origin),
            sso_url=html.escape(
                f"{sso_origin}/sso/authorize?{urlencode({'request_id': request_id})}"
            ),
            error=f'<div class="error" role="alert">{html.escape(error)}</div>' if error else "",
        )
        return HTMLResponse(text, status_code=200, headers=login_headers)

    def sso_form(request_id: str, error: str | None) -> HTMLResponse:
        text = sso_page.substitute(
            title=html.escape("Demo SSO — sign in"),
            action=html.escape(f"{sso_origin}/sso/authorize"),
            request_id=html.escape(request_id),
            static_origin=html.escape(static_origin),
            error=f'<div class="error" role="alert">{html.escape(error)}</div>' if error else "",
        )
        headers = {
            **_PAGE_HEADERS,
            "Content-Security-Policy": f"default-src 'none'; style-src {static_origin}; "
            "frame-ancestors 'none'; base-uri 'none'",
        }
        return HTMLResponse(text, status_code=200, headers=headers)

    def on_host(request: Request, host: str) -> bool:
        """Whether the request came for ``host`` (the Host header, as the proxy sent it)."""
        name = request.headers.get("host", "").rsplit(":", 1)[0].lower().rstrip(".")
        return name == host

    def complete(pending: _Pending) -> RedirectResponse:
        """The user is signed in (form or SSO): a code back to the application."""
        code = tokens.new_code(
            pending.client_id,
            pending.redirect_uri,
            pending.code_challenge,
            pending.scope,
            pending.nonce,
        )
        query = {"code": code, "iss": issuer}
        if pending.state is not None:
            query["state"] = pending.state
        return RedirectResponse(_with_query(pending.redirect_uri, query), status_code=302)

    @app.get("/.well-known/oauth-authorization-server")
    async def metadata() -> JSONResponse:
        return JSONResponse(
            {
                "issuer": issuer,
                "authorization_endpoint": f"{issuer}/authorize",
                "token_endpoint": f"{issuer}/token",
                "userinfo_endpoint": f"{issuer}/userinfo",
                "introspection_endpoint": f"{issuer}/introspect",
                "jwks_uri": f"{issuer}/.well-known/jwks.json",
                "response_types_supported": ["code"],
                "response_modes_supported": ["query"],
                "grant_types_supported": ["authorization_code", "refresh_token"],
                "code_challenge_methods_supported": ["S256"],
                "token_endpoint_auth_methods_supported": ["none"],
                "introspection_endpoint_auth_methods_supported": ["none"],
                "scopes_supported": list(SCOPES_SUPPORTED),
                "id_token_signing_alg_values_supported": ["RS256"],
                "authorization_response_iss_parameter_supported": True,
            }
        )

    @app.get("/.well-known/jwks.json")
    async def jwks() -> JSONResponse:
        keys.jwks_served += 1
        return JSONResponse(keys.jwks(), headers={"Cache-Control": "public, max-age=300"})

    @app.get("/authorize")
    async def authorize(request: Request) -> Response:
        params: dict[str, str] = {}
        for key, value in request.query_params.multi_items():
            if key in params:  # RFC 6749 3.1: no parameter twice
                return error_page_response(f"The parameter {key} appears more than once.")
            params[key] = value
        if params.get("client_id") != client_id:
            return error_page_response("The application (client_id) is not known here.")
        redirect_uri = params.get("redirect_uri", "")
        problem = _redirect_uri_problem(redirect_uri)
        if problem:
            return error_page_response(f"The redirect URI is not acceptable: {problem}.")
        # From here on errors go back to the (validated) application, RFC 6749 4.1.2.1.
        client_state = params.get("state")

        def fail(error: str, description: str) -> RedirectResponse:
            query = {"error": error, "error_description": description, "iss": issuer}
            if client_state is not None:
                query["state"] = client_state
            return RedirectResponse(_with_query(redirect_uri, query), status_code=302)

        if params.get("response_type") != "code":
            return fail("unsupported_response_type", "only response_type=code is supported")
        challenge = params.get("code_challenge")
        if challenge is None:
            return fail("invalid_request", "code_challenge is required (PKCE)")
        if params.get("code_challenge_method") != "S256":
            return fail("invalid_request", "code_challenge_method must be S256")
        if not _CHALLENGE.fullmatch(challenge):
            return fail("invalid_request", "code_challenge is not a base64url SHA-256")
        scope = _normalise_scope(params.get("scope", DEFAULT_SCOPE))
        if scope is None:
            return fail("invalid_scope", f"supported scopes: {' '.join(SCOPES_SUPPORTED)}")
        pending = _Pending(
            client_id, redirect_uri, challenge, scope, client_state, params.get("nonce")
        )
        request_id = secrets.token_urlsafe(24)
        state.pending.put(request_id, pending, PENDING_TTL)
        return login_form(request_id, pending, None)

    def credentials_match(form: dict[str, str]) -> tuple[bool, bool]:
        """(user name right, password right), both compared always and in constant time, so
        the time taken does not tell which one was wrong."""
        user_ok = hmac.compare_digest(form.get("username", "").encode(), user.encode())
        password_ok = hmac.compare_digest(form.get("password", "").encode(), password.encode())
        return user_ok, password_ok

    @app.post("/authorize")
    async def sign_in(request: Request) -> Response:
        try:
            form = await _read_form(request)
        except OAuthError as exc:
            return error_page_response(exc.description)
        request_id = form.get("request_id", "")
        pending = state.pending.get(request_id)
        if pending is None:
            return error_page_response(
                "This sign-in request has expired or was already used. "
                "Start again from the application."
            )
        user_ok, password_ok = credentials_match(form)
        if state.locked_out(pending.client_id, user_ok, password_ok):
            state.pending.pop(request_id)
            return error_page_response(LOCKED_OUT, 403)
        if not (user_ok and password_ok):
            return login_form(request_id, pending, "Wrong user name or password.")
        state.pending.pop(request_id)
        return complete(pending)

    @app.get("/static/{name}")
    async def static_asset(name: str, request: Request) -> Response:
        """The page's stylesheet and script: on the asset host only, as from a CDN."""
        if not on_host(request, static_host) or name not in assets:
            return PlainTextResponse("not found", status_code=404)
        kind = "text/css" if name.endswith(".css") else "text/javascript"
        return Response(
            assets[name],
            media_type=f"{kind}; charset=utf-8",
            headers={"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"},
        )

    @app.get("/sso/authorize")
    async def sso_start(request: Request) -> Response:
        if not on_host(request, sso_host):
            return PlainTextResponse("not found", status_code=404)
        request_id = request.query_params.get("request_id", "")
        if state.pending.get(request_id) is None:
            return error_page_response("This sign-in request has expired or was already used.")
        return sso_form(request_id, None)

    @app.post("/sso/authorize")
    async def sso_sign_in(request: Request) -> Response:
        """The SSO host's own sign-in; success hands a one-time ticket to the issuer."""
        if not on_host(request, sso_host):
            return PlainTextResponse("not found", status_code=404)
        try:
            form = await _read_form(request)
        except OAuthError as exc:
            return error_page_response(exc.description)
        request_id = form.get("request_id", "")
        pending = state.pending.get(request_id)
        if pending is None:
            return error_page_response("This sign-in request has expired or was already used.")
        user_ok, password_ok = credentials_match(form)
        if state.locked_out(pending.client_id, user_ok, password_ok):
            state.pending.pop(request_id)
            return error_page_response(LOCKED_OUT, 403)
        if not (user_ok and password_ok):
            return sso_form(request_id, "Wrong user name or password.")
        ticket = secrets.token_urlsafe(32)
        state.tickets.put(ticket, request_id, TICKET_TTL)
        return RedirectResponse(
            f"{issuer}/sso/callback?{urlencode({'ticket': ticket})}", status_code=302
        )

    @app.get("/sso/callback")
    async def sso_callback(request: Request) -> Response:
        """Back on the issuer's host with a ticket: single use, then as the form's success."""
        request_id = state.tickets.pop(request.query_params.get("ticket", ""))
        pending = state.pending.pop(request_id) if request_id is not None else None
        if pending is None:
            return error_page_response("This single sign-on ticket is unknown or was used.")
        return complete(pending)

    @app.post("/token")
    async def token(request: Request) -> JSONResponse:
        try:
            form = await _client_form(request, client_id)
            grant_type = form.get("grant_type")
            if grant_type == "authorization_code":
                body = tokens.exchange_code(form, _s256)
            elif grant_type == "refresh_token":
                body = tokens.refresh(form, _normalise_scope)
            elif grant_type is None:
                raise OAuthError("invalid_request", "grant_type is required")
            else:
                raise OAuthError("unsupported_grant_type", f"{grant_type} is not supported")
        except OAuthError as exc:
            return _oauth_error(exc)
        return JSONResponse(body, headers=_TOKEN_HEADERS)

    @app.post("/introspect")
    async def introspect(request: Request) -> JSONResponse:
        """RFC 7662: is this token still active? Asking does not use it up."""
        try:
            form = await _client_form(request, client_id)
            body = tokens.introspect(form)
        except OAuthError as exc:
            return _oauth_error(exc)
        if body.get("active"):
            body.update(iss=issuer, sub=subject)
        return JSONResponse(body, headers=_TOKEN_HEADERS)

    @app.get("/userinfo")
    async def userinfo(request: Request) -> JSONResponse:
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        grant = tokens.access_grant(value.strip()) if scheme.lower() == "bearer" else None
        if grant is None:
            return JSONResponse(
                {"error": "invalid_token"},
                status_code=401,
                headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
            )
        return JSONResponse(
            {"sub": subject, "email": email, "name": f"{user} (demo)", "preferred_username": user},
            headers={"Cache-Control": "no-store"},
        )

    def admin(request: Request) -> JSONResponse | None:
        """None for a bearer of the admin token on the issuer's host, else the refusal."""
        if admin_token is None or not on_host(request, issuer_host):
            return JSONResponse({"error": "not_found"}, status_code=404)
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            value.strip().encode(), admin_token.encode()
        ):
            return JSONResponse(
                {"error": "invalid_token"},
                status_code=401,
                headers={"WWW-Authenticate": 'Bearer realm="demo-admin"'},
            )
        return None

    @app.get("/admin/grants")
    async def admin_grants(request: Request) -> JSONResponse:
        """Every grant's counters (no token values) and the totals."""
        if (refused := admin(request)) is not None:
            return refused
        grants = [g.to_json() for g in tokens.grants.values()]
        return JSONResponse(
            {"grants": grants, "totals": dict(tokens.totals)}, headers={"Cache-Control": "no-store"}
        )

    @app.post("/admin/grants/{grant}/revoke")
    async def admin_revoke(grant: str, request: Request) -> JSONResponse:
        """Revoke a grant as the vendor would ("sign out everywhere")."""
        if (refused := admin(request)) is not None:
            return refused
        record = tokens.revoke(grant, "admin")
        if record is None:
            return JSONResponse({"error": "grant_not_found"}, status_code=404)
        return JSONResponse(record.to_json(), headers={"Cache-Control": "no-store"})

    app.state.idp = state  # for tests that check the tables stay bounded
    app.state.tokens = tokens  # for tests that read the grants' counters in process
    app.state.keys = keys  # for tests that rotate the keys or mint tokens with odd claims
    return app


_PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
    "frame-ancestors 'none'; base-uri 'none'",
}
_TOKEN_HEADERS = {"Cache-Control": "no-store", "Pragma": "no-cache"}


def _template(name: str) -> str:
    return resources.files(__package__).joinpath(name).read_text(encoding="utf-8")


def _redirect_uri_problem(uri: str) -> str | None:
    """Why ``uri`` is not a loopback redirect URI (RFC 8252 7.3), or None if it is one."""
    if not uri:
        return "it is missing"
    try:
        parts = urlsplit(uri)
        port = parts.port
    except ValueError:
        return "it is not a URL"
    del port  # any port is fine; reading it validated it
    if parts.scheme != "http":
        return "it must use http on the loopback interface"
    if parts.hostname not in _LOOPBACK_HOSTS:
        return "it must point to 127.0.0.1, ::1 or localhost"
    if parts.username is not None or parts.password is not None:
        return "it must not carry credentials"
    if parts.fragment or "#" in uri:
        return "it must not have a fragment"
    return None


def _with_query(uri: str, params: dict[str, str]) -> str:
    parts = urlsplit(uri)
    query = parse_qsl(parts.query, keep_blank_values=True) + list(params.items())
    return urlunsplit(parts._replace(query=urlencode(query)))


def _normalise_scope(scope: str) -> str | None:
    wanted = scope.split()
    if not wanted or any(s not in SCOPES_SUPPORTED for s in wanted):
        return None
    return " ".join(dict.fromkeys(wanted))


def _oauth_error(exc: OAuthError) -> JSONResponse:
    headers = dict(_TOKEN_HEADERS)
    if exc.status == 401:
        headers["WWW-Authenticate"] = 'Basic realm="demo"'
    return JSONResponse(
        {"error": exc.error, "error_description": exc.description},
        status_code=exc.status,
        headers=headers,
    )


async def _client_form(request: Request, client_id: str) -> dict[str, str]:
    """The form of a request from the one public client (it names itself)."""
    form = await _read_form(request)
    if form.get("client_id") != client_id:
        raise OAuthError("invalid_client", "unknown client_id", 401)
    return form


async def _read_form(request: Request) -> dict[str, str]:
    """A small urlencoded form, each field once (RFC 6749 3.2)."""
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != (
        "application/x-www-form-urlencoded"
    ):
        raise OAuthError("invalid_request", "expected application/x-www-form-urlencoded")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM:
            raise OAuthError("invalid_request", "request body too large")
    try:
        pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False)
    except UnicodeDecodeError:
        raise OAuthError("invalid_request", "request body is not UTF-8") from None
    form: dict[str, str] = {}
    for key, value in pairs:
        if key in form:
            raise OAuthError("invalid_request", f"{key} appears more than once")
        form[key] = value
    return form


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _s256(verifier: str) -> str:
    return _b64url(hashlib.sha256(verifier.encode("ascii")).digest())
