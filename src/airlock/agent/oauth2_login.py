"""The ``oauth2`` provider's login program; runs inside the browser VM. Standard library only.

It plays the part a vendor CLI plays for the other providers: an OAuth 2.0 native app
(RFC 8252) doing the authorization code grant with PKCE S256 (RFC 7636). It listens on
``http://127.0.0.1:<random port>/callback``, opens the authorize URL with ``$BROWSER``
(the VM's Chromium, which reaches the IdP through the egress proxy and comes back to this
loopback listener directly), checks ``state``, exchanges the code at the token endpoint
through the egress proxy, and writes the token response plus ``obtained_at`` and
``expires_at`` (epoch seconds) atomically, mode 0600, where the guest agent watches for it.

    python -m airlock.agent.oauth2_login --authorize-url URL --token-url URL \\
        --client-id ID --output PATH [--scope "openid profile"] [--proxy URL|none] \\
        [--timeout 600] [--port 0] [--callback-path /callback] [--param KEY=VALUE ...]

Exit status: 0 signed in, 1 the login failed, 2 bad arguments, 3 timed out. It never
prints a token; the messages on standard error say what went wrong.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import hmac
import html
import json
import os
import secrets
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from airlock.agent.files import write_atomic
from airlock.agent.protocol import EGRESS_PORT

DEFAULT_PROXY = f"http://127.0.0.1:{EGRESS_PORT}"
EXCHANGE_TIMEOUT = 30.0
MAX_TOKEN_RESPONSE = 1024 * 1024
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_TIMEOUT = 0, 1, 2, 3
_RESERVED = frozenset(
    {
        "response_type",
        "client_id",
        "redirect_uri",
        "scope",
        "state",
        "code_challenge",
        "code_challenge_method",
    }
)


class LoginError(Exception):
    """The login failed; the message is safe to show (it holds no token)."""


@dataclass
class _Session:
    """What the callback handler and the main thread share."""

    args: argparse.Namespace
    state: str
    verifier: str
    redirect_uri: str
    proxy: str | None
    lock: threading.Lock = field(default_factory=threading.Lock)
    claimed: bool = False  # a callback with the right state has arrived
    done: threading.Event = field(default_factory=threading.Event)
    error: str | None = None


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    session: _Session


class _CallbackHandler(BaseHTTPRequestHandler):
    server: _Server
    timeout = 30  # an idle (pre)connection from the browser must not hold a thread forever

    def do_GET(self) -> None:
        session = self.server.session
        url = urlsplit(self.path)
        if url.path != session.args.callback_path:
            self._page(404, "Not found", "This is the sign-in callback of Airlock's login.")
            return
        params = dict(parse_qsl(url.query, keep_blank_values=True))
        with session.lock:
            if session.claimed:
                self._page(409, "Already done", "This sign-in has already been handled.")
                return
            if not hmac.compare_digest(params.get("state", "").encode(), session.state.encode()):
                # Not our request (or a stale tab): refuse it, keep waiting for the real one.
                _say("ignored a callback whose state does not match this login")
                self._page(400, "Sign-in failed", "This callback does not belong to this login.")
                return
            session.claimed = True
        try:
            if "error" in params:
                detail = params.get("error_description") or ""
                raise LoginError(
                    f"the identity provider refused: {params['error'][:100]}"
                    + (f": {detail[:300]}" if detail else "")
                )
            code = params.get("code")
            if not code:
                raise LoginError("the callback carried neither a code nor an error")
            tokens = _exchange(session, code)
            _write_tokens(Path(session.args.output), tokens, int(time.time()))
        except LoginError as exc:
            session.error = str(exc)
            self._page(400, "Sign-in failed", f"{exc}. Close this window and try again.")
        except OSError as exc:
            session.error = f"could not write the tokens: {exc}"
            self._page(500, "Sign-in failed", "The tokens could not be saved.")
        else:
            self._page(200, "Signed in", "Signed in. You can close this window.")
        finally:
            session.done.set()

    def _page(self, status: int, title: str, message: str) -> None:
        body = (
            "<!doctype html><html lang=en><head><meta charset=utf-8>"
            f"<title>{html.escape(title)}</title>"
            "<style>body{font-family:system-ui,sans-serif;display:grid;place-items:center;"
            "min-height:90vh;background:#eef1f5;color:#1c2430}main{background:#fff;"
            "padding:2rem 2.5rem;border-radius:12px;max-width:32rem}</style></head>"
            f"<body><main><h1>{html.escape(title)}</h1><p>{html.escape(message)}</p>"
            "</main></body></html>"
        ).encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()
        self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:
        """Silent: request lines carry the authorization code."""


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        extra = _extra_params(args.param)
        return _run(args, extra)
    except LoginError as exc:
        _say(str(exc))
        return EXIT_FAILED


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m airlock.agent.oauth2_login",
        description="OAuth 2.0 authorization code + PKCE login for Airlock's browser VM.",
    )
    p.add_argument("--authorize-url", required=True, help="the authorization endpoint")
    p.add_argument("--token-url", required=True, help="the token endpoint")
    p.add_argument("--client-id", required=True, help="the public client's id")
    p.add_argument("--output", required=True, help="where to write the token response")
    p.add_argument("--scope", default="openid", help="space-separated scopes")
    p.add_argument(
        "--proxy",
        default=None,
        help="HTTP proxy for the token request, or 'none'; default: $HTTPS_PROXY or "
        f"$HTTP_PROXY (by the token URL's scheme), else {DEFAULT_PROXY}",
    )
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for sign-in")
    p.add_argument("--port", type=int, default=0, help="callback port (0: any free port)")
    p.add_argument("--callback-path", default="/callback", help="callback path")
    p.add_argument(
        "--param", action="append", default=[], metavar="KEY=VALUE", help="extra authorize param"
    )
    return p


def _run(args: argparse.Namespace, extra: dict[str, str]) -> int:
    for name in ("authorize_url", "token_url"):
        if urlsplit(getattr(args, name)).scheme not in ("http", "https"):
            raise LoginError(f"--{name.replace('_', '-')} must be an http(s) URL")
    if not args.callback_path.startswith("/"):
        raise LoginError("--callback-path must start with /")
    deadline = time.monotonic() + args.timeout
    verifier = _b64url(secrets.token_bytes(64))  # 86 characters, RFC 7636 4.1
    try:
        server = _Server(("127.0.0.1", args.port), _CallbackHandler)
    except OSError as exc:
        raise LoginError(f"cannot listen on 127.0.0.1:{args.port}: {exc.strerror}") from None
    port = server.server_address[1]
    session = _Session(
        args=args,
        state=secrets.token_urlsafe(24),
        verifier=verifier,
        redirect_uri=f"http://127.0.0.1:{port}{args.callback_path}",
        proxy=_proxy_for(args.proxy, args.token_url),
    )
    server.session = session
    url = _with_query(
        args.authorize_url,
        {
            "response_type": "code",
            "client_id": args.client_id,
            "redirect_uri": session.redirect_uri,
            **({"scope": args.scope} if args.scope.strip() else {}),
            "state": session.state,
            "code_challenge": _b64url(hashlib.sha256(verifier.encode("ascii")).digest()),
            "code_challenge_method": "S256",
            **extra,
        },
    )
    thread = threading.Thread(target=server.serve_forever, name="oauth2-callback", daemon=True)
    thread.start()
    browser: subprocess.Popen[bytes] | None = None
    try:
        browser = _open_browser(url)
        _say(f"waiting up to {args.timeout:.0f} s for the sign-in in the browser")
        while not session.done.wait(0.2):
            if browser is not None and browser.poll() not in (None, 0):
                _say(f"the browser command failed (exit {browser.returncode})")
                _show_url(url)
                browser = None
            if time.monotonic() >= deadline:
                with session.lock:
                    claimed = session.claimed
                if not claimed or not session.done.wait(EXCHANGE_TIMEOUT + 5):
                    _say(f"timed out after {args.timeout:.0f} s waiting for the sign-in")
                    return EXIT_TIMEOUT
                break
    finally:
        server.shutdown()
        server.server_close()
        if browser is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                browser.wait(timeout=2)  # not killed: $BROWSER may be the user's browser
    if session.error is not None:
        raise LoginError(session.error)
    _say(f"signed in; the token response is in {args.output}")
    return EXIT_OK


def _open_browser(url: str) -> subprocess.Popen[bytes] | None:
    """Start ``$BROWSER url``; without one (or if it cannot start), show the URL instead."""
    command = os.environ.get("BROWSER")
    if command:
        try:
            return subprocess.Popen([command, url], stdin=subprocess.DEVNULL)
        except OSError as exc:
            _say(f"cannot run $BROWSER ({exc.strerror})")
    _show_url(url)
    return None


def _show_url(url: str) -> None:
    _say(f"open this URL in a browser to sign in:\n{url}")


def _proxy_for(option: str | None, token_url: str) -> str | None:
    if option is not None:
        return None if option.lower() in ("", "none", "direct") else option
    scheme = urlsplit(token_url).scheme
    names = ("HTTPS_PROXY", "https_proxy") if scheme == "https" else ("HTTP_PROXY", "http_proxy")
    for name in names:
        if os.environ.get(name):
            return os.environ[name]
    return DEFAULT_PROXY


def _exchange(session: _Session, code: str) -> dict[str, Any]:
    """POST the code and verifier to the token endpoint (through the proxy); the response."""
    args = session.args
    data = urlencode(
        {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": session.redirect_uri,
            "client_id": args.client_id,
            "code_verifier": session.verifier,
        }
    ).encode()
    request = urllib.request.Request(
        args.token_url,
        data=data,
        method="POST",
        headers={
            "Content-Type": "application/x-www-form-urlencoded",
            "Accept": "application/json",
            "User-Agent": "airlock-oauth2-login/1",
        },
    )
    proxies = {"http": session.proxy, "https": session.proxy} if session.proxy else {}
    opener = urllib.request.build_opener(urllib.request.ProxyHandler(proxies))
    via = f"via {session.proxy}" if session.proxy else "directly"
    try:
        with opener.open(request, timeout=EXCHANGE_TIMEOUT) as response:
            body = response.read(MAX_TOKEN_RESPONSE + 1)
    except urllib.error.HTTPError as exc:
        raise LoginError(f"the token endpoint answered {exc.code}{_oauth_error(exc)}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise LoginError(f"cannot reach the token endpoint {via}: {reason}") from None
    if len(body) > MAX_TOKEN_RESPONSE:
        raise LoginError("the token response is too large")
    try:
        tokens = json.loads(body)
    except ValueError:
        raise LoginError("the token response is not JSON") from None
    if not isinstance(tokens, dict) or not isinstance(tokens.get("access_token"), str):
        raise LoginError("the token response has no access_token")
    return tokens


def _oauth_error(exc: urllib.error.HTTPError) -> str:
    """``: error: description`` from an RFC 6749 5.2 body, if it is one."""
    try:
        body = json.loads(exc.read(64 * 1024))
    except (ValueError, OSError):
        return ""
    if not isinstance(body, dict) or not isinstance(body.get("error"), str):
        return ""
    description = body.get("error_description")
    text = f": {body['error'][:100]}"
    return text + (f": {description[:300]}" if isinstance(description, str) else "")


def _write_tokens(path: Path, tokens: dict[str, Any], obtained_at: int) -> None:
    """Atomically (temp file, fsync, rename), mode 0600, in directories made 0700."""
    data = dict(tokens)
    data["obtained_at"] = obtained_at
    expires_in = tokens.get("expires_in")
    if isinstance(expires_in, int | float) and not isinstance(expires_in, bool):
        data["expires_at"] = obtained_at + int(expires_in)
    write_atomic(path, json.dumps(data, indent=2).encode() + b"\n", 0o600)


def _extra_params(pairs: list[str]) -> dict[str, str]:
    extra: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise LoginError(f"--param needs KEY=VALUE, not {pair!r}")
        if key in _RESERVED:
            raise LoginError(f"--param cannot set {key}: the login program sets it")
        extra[key] = value
    return extra


def _with_query(url: str, params: dict[str, str]) -> str:
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True) + list(params.items())
    return urlunsplit(parts._replace(query=urlencode(query)))


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _say(message: str) -> None:
    print(f"oauth2_login: {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
