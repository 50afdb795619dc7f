"""The ``oauth2`` provider's refresher; runs inside the CLI VM. Standard library only.

It does to ``~/.airlock/oauth2/tokens.json`` what a vendor CLI does to its own file (Claude
Code to ``~/.claude/.credentials.json``, Codex to ``auth.json``): when the access token nears
its end it posts ``grant_type=refresh_token`` to the token endpoint and rewrites the file,
atomically (temp file, fsync, rename; mode 0600), with the new tokens, ``obtained_at``,
``expires_at`` and, where the server says, ``refresh_expires_at`` (epoch seconds). The IdP
rotates refresh tokens, so the old one is dead from then on: the file is the only copy, which
is why a login has exactly one holder. Two refreshers in one VM take turns (``flock`` on a
lock file beside it) and each reads the file after its turn comes, so neither sends a
refresh token the other already used.

``--check`` asks instead, without using the token up, whether the refresh token is still
active (RFC 7662 introspection): the scheduled health check of the controller.

    python3 -m airlock.agent.oauth2_refresh --token-url URL --client-id ID \\
        [--tokens PATH] [--min-valid SECONDS] [--proxy URL|none]
    python3 -m airlock.agent.oauth2_refresh --check --introspect-url URL --client-id ID \\
        [--tokens PATH] [--proxy URL|none]

It prints one JSON line on standard output (``result`` and a few facts, never a token) and
exits 0 (refreshed, still fresh, or active), 1 (failed: unreachable, a bad answer), 2 (bad
arguments), 4 (the server says the login is revoked or the token unknown: log in again),
5 (no token file, or none with a refresh token: nothing to refresh).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

from airlock.agent.files import write_atomic
from airlock.agent.protocol import EGRESS_PORT

TOKENS_PATH = ".airlock/oauth2/tokens.json"  # relative to the home, as the provider's
DEFAULT_PROXY = f"http://127.0.0.1:{EGRESS_PORT}"
REQUEST_TIMEOUT = 30.0
MAX_RESPONSE = 1024 * 1024
MAX_TOKENS_FILE = 1024 * 1024
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_REVOKED, EXIT_NO_LOGIN = 0, 1, 2, 4, 5


class RefreshError(Exception):
    """A failure the controller can act on; ``result`` names it, the message holds no token."""

    def __init__(self, result: str, message: str, code: int) -> None:
        super().__init__(message)
        self.result = result
        self.code = code


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    path = Path(args.tokens).expanduser()
    try:
        if args.check:
            if not args.introspect_url:
                raise RefreshError("usage", "--check needs --introspect-url", EXIT_USAGE)
            report = check(path, args.introspect_url, args.client_id, _proxy(args))
        else:
            if not args.token_url:
                raise RefreshError("usage", "--token-url is required", EXIT_USAGE)
            report = refresh(path, args.token_url, args.client_id, _proxy(args), args.min_valid)
    except RefreshError as exc:
        _emit({"result": exc.result, "message": str(exc)})
        return exc.code
    _emit(report)
    return EXIT_OK if report["result"] in ("refreshed", "fresh", "active") else EXIT_REVOKED


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python3 -m airlock.agent.oauth2_refresh",
        description="Refresh (or check) the oauth2 provider's tokens in a CLI VM.",
    )
    p.add_argument("--token-url", help="the token endpoint (refresh)")
    p.add_argument("--introspect-url", help="the RFC 7662 introspection endpoint (--check)")
    p.add_argument("--client-id", required=True, help="the public client's id")
    p.add_argument("--tokens", default=f"~/{TOKENS_PATH}", help="the token file")
    p.add_argument(
        "--min-valid",
        type=float,
        default=None,
        help="refresh only if the access token has less than this many seconds left "
        "(default: always, as a CLI's forced refresh)",
    )
    p.add_argument("--check", action="store_true", help="only ask whether it is still active")
    p.add_argument(
        "--proxy",
        default=None,
        help=f"HTTP proxy, or 'none'; default $HTTPS_PROXY/$HTTP_PROXY, else {DEFAULT_PROXY}",
    )
    return p


def refresh(
    path: Path, token_url: str, client_id: str, proxy: str | None, min_valid: float | None
) -> dict[str, Any]:
    """Refresh under the file's lock; the report says what happened."""
    with _locked(path):
        data = _load(path)
        now = int(time.time())
        expires_at = data.get("expires_at")
        if (
            min_valid is not None
            and isinstance(expires_at, int | float)
            and expires_at - now > min_valid
        ):
            return {"result": "fresh", "expiresAt": int(expires_at)}
        body = _post(
            token_url,
            {"grant_type": "refresh_token", "refresh_token": data["refresh_token"]},
            client_id,
            proxy,
        )
        if not isinstance(body.get("access_token"), str) or not body["access_token"]:
            raise RefreshError("failed", "the token response has no access_token", EXIT_FAILED)
        updated = dict(data)
        updated.update(body)  # RFC 6749 6: no refresh_token in the answer keeps the old one
        updated["obtained_at"] = now
        updated.pop("expires_at", None)
        updated.pop("refresh_expires_at", None)
        expires_in = _seconds(body.get("expires_in"))
        if expires_in is not None:
            updated["expires_at"] = now + expires_in
        refresh_in = _seconds(body.get("refresh_token_expires_in"))
        if refresh_in is not None:
            updated["refresh_expires_at"] = now + refresh_in
        write_atomic(path, json.dumps(updated, indent=2).encode() + b"\n", 0o600)
        report: dict[str, Any] = {
            "result": "refreshed",
            "obtainedAt": now,
            "rotated": body.get("refresh_token") not in (None, data["refresh_token"]),
        }
        for key, name in (("expires_at", "expiresAt"), ("refresh_expires_at", "refreshExpiresAt")):
            if key in updated:
                report[name] = updated[key]
        return report


def check(path: Path, introspect_url: str, client_id: str, proxy: str | None) -> dict[str, Any]:
    """Whether the refresh token is still active, by introspection (it is not used up)."""
    with _locked(path):
        data = _load(path)
    body = _post(
        introspect_url,
        {"token": data["refresh_token"], "token_type_hint": "refresh_token"},
        client_id,
        proxy,
    )
    active = body.get("active")
    if active is True:
        report: dict[str, Any] = {"result": "active"}
        if _is_number(body.get("exp")):
            report["refreshExpiresAt"] = int(body["exp"])
        return report
    if active is False:
        return {"result": "revoked", "message": "the server says the refresh token is not active"}
    raise RefreshError("failed", "the introspection answer has no active field", EXIT_FAILED)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One refresher at a time per token file (the lock file is made beside it)."""
    if not path.parent.is_dir():
        raise RefreshError("no_login", f"no token file at {path}", EXIT_NO_LOGIN)
    fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _load(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_TOKENS_FILE + 1)
    except FileNotFoundError:
        raise RefreshError("no_login", f"no token file at {path}", EXIT_NO_LOGIN) from None
    except OSError as exc:
        raise RefreshError("failed", f"cannot read {path}: {exc.strerror}", EXIT_FAILED) from None
    try:
        data = json.loads(raw)
    except ValueError:
        raise RefreshError("failed", f"{path} is not JSON", EXIT_FAILED) from None
    if not isinstance(data, dict):
        raise RefreshError("failed", f"{path} does not hold a JSON object", EXIT_FAILED)
    if not isinstance(data.get("refresh_token"), str) or not data["refresh_token"]:
        raise RefreshError("no_login", f"{path} holds no refresh token", EXIT_NO_LOGIN)
    return data


def _post(url: str, fields: dict[str, str], client_id: str, proxy: str | None) -> dict[str, Any]:
    """A form POST from the public client; its JSON answer. A 4xx ``invalid_grant`` (or
    ``invalid_token``) means the login is over: ``revoked``."""
    if urlsplit(url).scheme not in ("http", "https"):
        raise RefreshError("usage", f"not an http(s) URL: {url!r}", EXIT_USAGE)
    request = urllib.request.Request(
        url,
        data=urlencode({**fields, "client_id": client_id}).encode(),
        method="POST",
        headers={
            "Content-Type": "application/x-www-form-urlencoded",
            "Accept": "application/json",
            "User-Agent": "airlock-oauth2-refresh/1",
        },
    )
    proxies = {"http": proxy, "https": proxy} if proxy else {}
    opener = urllib.request.build_opener(urllib.request.ProxyHandler(proxies))
    try:
        with opener.open(request, timeout=REQUEST_TIMEOUT) as response:
            raw = response.read(MAX_RESPONSE + 1)
    except urllib.error.HTTPError as exc:
        error, description = _oauth_error(exc)
        if exc.code in (400, 401) and error in ("invalid_grant", "invalid_token"):
            raise RefreshError("revoked", f"{error}: {description}"[:300], EXIT_REVOKED) from None
        raise RefreshError(
            "failed", f"the endpoint answered {exc.code} {error or ''}".strip(), EXIT_FAILED
        ) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        via = f"via {proxy}" if proxy else "directly"
        raise RefreshError(
            "unreachable", f"cannot reach {url} {via}: {reason}", EXIT_FAILED
        ) from None
    if len(raw) > MAX_RESPONSE:
        raise RefreshError("failed", "the answer is too large", EXIT_FAILED)
    try:
        body = json.loads(raw)
    except ValueError:
        raise RefreshError("failed", "the answer is not JSON", EXIT_FAILED) from None
    if not isinstance(body, dict):
        raise RefreshError("failed", "the answer is not a JSON object", EXIT_FAILED)
    return body


def _oauth_error(exc: urllib.error.HTTPError) -> tuple[str | None, str]:
    try:
        body = json.loads(exc.read(64 * 1024))
    except (ValueError, OSError):
        return None, ""
    if not isinstance(body, dict) or not isinstance(body.get("error"), str):
        return None, ""
    description = body.get("error_description")
    return body["error"][:100], description[:200] if isinstance(description, str) else ""


def _proxy(args: argparse.Namespace) -> str | None:
    if args.proxy is not None:
        return None if args.proxy.lower() in ("", "none", "direct") else str(args.proxy)
    url = args.introspect_url if args.check else args.token_url
    scheme = urlsplit(url or "").scheme
    names = ("HTTPS_PROXY", "https_proxy") if scheme == "https" else ("HTTP_PROXY", "http_proxy")
    for name in names:
        if os.environ.get(name):
            return os.environ[name]
    return DEFAULT_PROXY


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _seconds(value: object) -> int | None:
    """A non-negative number of seconds from a JSON answer, else None."""
    if isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value < 2**40:
        return int(value)
    return None


def _emit(report: dict[str, Any]) -> None:
    print(json.dumps(report, sort_keys=True), flush=True)


if __name__ == "__main__":
    sys.exit(main())
