"""The generic ``oauth2`` provider: authorization code + PKCE against operator-set endpoints.

The login runs ``airlock.agent.oauth2_login`` inside the browser VM (it needs nothing but
the guest's Python), which writes the token response, plus ``obtained_at`` and
``expires_at`` in epoch seconds, to ``~/.airlock/oauth2/tokens.json``. This module turns
that file into ``Credentials`` and says which hosts the browser VM must reach: the
authorize and token endpoints (always), plus the rules and SSO bundles the operator adds
(``AIRLOCK_OAUTH2_ALLOWED_HOSTS``, ``AIRLOCK_EGRESS_OAUTH2_*``). ``demo_oauth2_provider``
points it at the bundled demo identity provider, whose page, like a real one, loads its
assets from a second host and offers single sign-on through a third.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

from airlock.domain.credential_health import CheckResult
from airlock.domain.egress_policy import EgressPolicy, HostRule
from airlock.errors import CredentialError, Unavailable
from airlock.providers.base import (
    Account,
    Credentials,
    InjectFile,
    LoginPlan,
    RunOutcome,
    StatusCheck,
    Verification,
)

TOKENS_PATH = ".airlock/oauth2/tokens.json"  # relative to the VM user's home
DEMO_IDP_HOST = "idp.airlock.test"  # a name only the egress proxy resolves (to loopback)
DEMO_STATIC_HOST = "static.idp.airlock.test"  # the demo page's stylesheet and script
DEMO_SSO_HOST = "sso.login.airlock.test"  # its single sign-on, allowed as *.login.airlock.test
DEMO_DOMAIN = "airlock.test"  # every *.airlock.test name leads to the demo IdP's port
DEFAULT_SCOPES = ("openid", "profile", "email")

# Sanity bounds for timestamps in seconds: a value past _MAX_EPOCH_S is almost surely in
# milliseconds, the unit mistake that puts an expiry thousands of years away.
_MIN_EPOCH_S = 946_684_800  # 2000-01-01
_MAX_EPOCH_S = 10_000_000_000  # 2286-11-20
_MAX_EXPIRES_IN = 10 * 365 * 24 * 3600


class OAuth2Provider:
    """A public OAuth 2.0 client (RFC 6749 + RFC 7636 PKCE S256, RFC 8252 loopback)."""

    id = "oauth2"
    name = "OAuth 2.0"

    def __init__(
        self,
        authorize_url: str | None,
        token_url: str | None,
        client_id: str | None,
        scopes: Sequence[str] = DEFAULT_SCOPES,
        allow: Sequence[HostRule] = (),
        bundles: frozenset[str] = frozenset(),
        targets: Sequence[tuple[HostRule, tuple[str, int]]] = (),
        introspect_url: str | None = None,
    ) -> None:
        self.introspect_url = introspect_url
        self.authorize_url = authorize_url
        self.token_url = token_url
        self.client_id = client_id
        self.scopes = list(scopes)
        self.allow = tuple(allow)
        self.bundles = bundles
        self.targets = tuple(targets)

    def available(self) -> str | None:
        missing = [
            name
            for name, value in (
                ("authorize URL", self.authorize_url),
                ("token URL", self.token_url),
                ("client id", self.client_id),
            )
            if not value
        ]
        if missing:
            return f"the oauth2 provider is not configured: no {', '.join(missing)}"
        for label, url in (("authorize", self.authorize_url), ("token", self.token_url)):
            if _endpoint(url or "") is None:
                return f"the oauth2 {label} URL is not an absolute http(s) URL: {url!r}"
        return None

    def login_plan(self) -> LoginPlan:
        reason = self.available()
        if reason is not None:
            raise Unavailable(reason, code="provider_unavailable")
        assert self.authorize_url and self.token_url and self.client_id
        return LoginPlan(
            provider=self.id,
            argv=[
                "{python}",
                "-m",
                "airlock.agent.oauth2_login",
                "--authorize-url",
                self.authorize_url,
                "--token-url",
                self.token_url,
                "--client-id",
                self.client_id,
                "--scope",
                " ".join(self.scopes),
                "--output",
                "{home}/" + TOKENS_PATH,
            ],
            watch=[TOKENS_PATH],
        )

    def egress_policy(self) -> EgressPolicy:
        """The endpoints' hosts are required (no override removes them); the rest is the
        operator's."""
        required: dict[HostRule, None] = {}
        for url in (self.authorize_url, self.token_url):
            endpoint = _endpoint(url or "")
            if endpoint is not None:
                required[HostRule(*endpoint)] = None
        return EgressPolicy(
            self.id,
            allow=self.allow,
            bundles=self.bundles,
            required=tuple(required),
            targets=self.targets,
        )

    def normalise(self, files: dict[str, bytes], *, now: datetime) -> Credentials:
        raw = files.get(TOKENS_PATH)
        if raw is None:
            raise CredentialError(f"the capture has no {TOKENS_PATH}")
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise CredentialError(f"{TOKENS_PATH} is not valid JSON (truncated?): {exc}") from None
        if not isinstance(data, dict):
            raise CredentialError(f"{TOKENS_PATH} must hold a JSON object")

        access_token = _string(data, "access_token", required=True)
        assert access_token is not None
        token_type = _string(data, "token_type", required=True)
        if token_type is None or token_type.lower() != "bearer":
            raise CredentialError(f"unsupported token_type {token_type!r}: only Bearer is usable")
        refresh_token = _string(data, "refresh_token", required=False)
        return Credentials(
            provider=self.id,
            access_token=access_token,
            refresh_token=refresh_token,
            expires_at=_expires_at(data, now),
            scopes=_scopes(data, self.scopes),
            account=_account(data),
            plan=None,
            raw={TOKENS_PATH: bytes(raw)},
            refreshed_at=_epoch(data, "obtained_at"),
            refresh_expires_at=_refresh_expires_at(data, now) if refresh_token else None,
        )

    def injection(self, creds: Credentials) -> list[InjectFile]:
        """The token response at the same path in the CLI VM, for whatever reads it there."""
        return [InjectFile(TOKENS_PATH, creds.raw[TOKENS_PATH])]

    def verification(self) -> Verification | None:
        """No CLI to ask: the handoff's read-back (content hash, mode, owner) is the check."""
        return None

    def refresh_argv(self, *, min_valid_s: float | None = None) -> list[str]:
        """The refresher (``agent.oauth2_refresh``) as a CLI VM runs it, through the agent's
        ``run`` (its working directory is the home): it refreshes as a vendor CLI does and
        rewrites the token file. ``min_valid_s``: only if the access token has less left."""
        if not self.token_url or not self.client_id:
            raise Unavailable(
                self.available() or "the oauth2 provider is not configured",
                code="provider_unavailable",
            )
        argv = [*_GUEST_PYTHON, "-m", "airlock.agent.oauth2_refresh"]
        argv += ["--token-url", self.token_url, "--client-id", self.client_id]
        argv += ["--tokens", TOKENS_PATH]
        if min_valid_s is not None:
            argv += ["--min-valid", str(min_valid_s)]
        return argv

    def status_check(self) -> StatusCheck | None:
        """Introspection (RFC 7662) of the refresh token the holder's file has, from the
        holder VM: it says revoked without using the token up. None without an
        introspection endpoint (``AIRLOCK_OAUTH2_INTROSPECT_URL``)."""
        if not self.introspect_url or not self.client_id:
            return None
        argv = [*_GUEST_PYTHON, "-m", "airlock.agent.oauth2_refresh", "--check"]
        argv += ["--introspect-url", self.introspect_url, "--client-id", self.client_id]
        argv += ["--tokens", TOKENS_PATH]
        return StatusCheck(
            argv,
            "introspection of the refresh token at the token server (RFC 7662), from the VM",
            _judge_check,
            timeout_s=40.0,
        )


# The guest's own Python (the agent's PYTHONPATH finds airlock.agent); the refresher is
# standard library only, like the login program.
_GUEST_PYTHON = ["python3"]


def _judge_check(outcome: RunOutcome) -> tuple[CheckResult, str]:
    """``oauth2_refresh --check``'s exit status and its one JSON line (no token in it)."""
    try:
        report = json.loads(outcome.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        report = {}
    result = report.get("result") if isinstance(report, dict) else None
    message = report.get("message") if isinstance(report, dict) else None
    summary = f"oauth2 check: {result or 'no answer'} (exit {outcome.exit_code})"
    if isinstance(message, str) and message:
        summary += f": {message[:200]}"
    if outcome.exit_code == 0 and result == "active":
        return CheckResult.OK, summary
    if outcome.exit_code == 4 and result == "revoked":
        return CheckResult.REVOKED, summary
    if outcome.exit_code == 5 and result == "no_login":
        return CheckResult.LOGGED_OUT, summary
    return CheckResult.UNKNOWN, summary


def demo_oauth2_provider(
    idp_port: int,
    client_id: str = "airlock-demo",
    scopes: Sequence[str] = DEFAULT_SCOPES,
) -> OAuth2Provider:
    """The ``oauth2`` provider for the bundled demo IdP on the host's loopback ``idp_port``,
    addressed inside the browser VM as ``idp.airlock.test`` (see ``demo_idp_issuer``). Its
    policy is what the demo page needs: the asset host by name and the SSO host under a
    wildcard; every ``*.airlock.test`` name the policy allows leads to ``idp_port``."""
    issuer = demo_idp_issuer(idp_port)
    return OAuth2Provider(
        authorize_url=f"{issuer}/authorize",
        token_url=f"{issuer}/token",
        client_id=client_id,
        scopes=scopes,
        allow=demo_rules(idp_port),
        targets=[(HostRule(f"*.{DEMO_DOMAIN}", idp_port), ("127.0.0.1", idp_port))],
        introspect_url=f"{issuer}/introspect",
    )


def demo_rules(idp_port: int) -> tuple[HostRule, ...]:
    """The demo page's hosts beyond its endpoints: the asset host, the SSO wildcard."""
    return (HostRule(DEMO_STATIC_HOST, idp_port), HostRule(f"*.login.{DEMO_DOMAIN}", idp_port))


def demo_idp_issuer(idp_port: int) -> str:
    """The issuer to give ``demo_idp.create_idp_app`` so its URLs match this provider's."""
    return f"http://{DEMO_IDP_HOST}:{idp_port}"


def _endpoint(url: str) -> tuple[str, int] | None:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    return parts.hostname.lower(), port or (443 if parts.scheme == "https" else 80)


def _string(data: dict[str, Any], key: str, *, required: bool) -> str | None:
    value = data.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value:
        what = "missing" if value is None else f"not a non-empty string ({type(value).__name__})"
        raise CredentialError(f"{TOKENS_PATH}: {key} is {what}")
    return value


def _seconds(data: dict[str, Any], key: str) -> float | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise CredentialError(f"{TOKENS_PATH}: {key} must be a number of seconds")
    return float(value)


def _epoch(data: dict[str, Any], key: str) -> datetime | None:
    value = _seconds(data, key)
    if value is None:
        return None
    if value >= _MAX_EPOCH_S:
        raise CredentialError(f"{TOKENS_PATH}: {key}={value:.0f} looks like milliseconds")
    if value < _MIN_EPOCH_S:
        raise CredentialError(f"{TOKENS_PATH}: {key}={value:.0f} is not epoch seconds")
    return datetime.fromtimestamp(value, tz=UTC)


def _expires_at(data: dict[str, Any], now: datetime) -> datetime | None:
    """From ``expires_at`` (epoch seconds, written by the login program), else from
    ``obtained_at`` (or, lacking it, the capture time) plus ``expires_in``."""
    expires_at = _epoch(data, "expires_at")
    obtained_at = _epoch(data, "obtained_at")
    expires_in = _seconds(data, "expires_in")
    if expires_in is not None and not 0 <= expires_in <= _MAX_EXPIRES_IN:
        raise CredentialError(f"{TOKENS_PATH}: expires_in={expires_in:.0f} is out of range")
    if expires_at is not None:
        return expires_at
    if expires_in is None:
        return None  # RFC 6749 5.1: expires_in is only RECOMMENDED
    return (obtained_at or now.astimezone(UTC)) + timedelta(seconds=expires_in)


def _refresh_expires_at(data: dict[str, Any], now: datetime) -> datetime | None:
    """The refresh token's end: ``refresh_expires_at`` (the refresher writes it), else
    ``obtained_at`` plus ``refresh_token_expires_in`` (GitHub's and Azure AD's field, which
    the demo IdP sends too); None where the server does not say."""
    stated = _epoch(data, "refresh_expires_at")
    if stated is not None:
        return stated
    lifetime = _seconds(data, "refresh_token_expires_in")
    if lifetime is None or not 0 <= lifetime <= _MAX_EXPIRES_IN:
        return None
    return (_epoch(data, "obtained_at") or now.astimezone(UTC)) + timedelta(seconds=lifetime)


def _scopes(data: dict[str, Any], requested: list[str]) -> list[str]:
    scope = data.get("scope")
    if scope is None:
        return list(requested)  # RFC 6749 5.1: omitted means as requested
    if isinstance(scope, str):
        return scope.split()
    if isinstance(scope, list) and all(isinstance(s, str) for s in scope):
        return list(scope)
    raise CredentialError(f"{TOKENS_PATH}: scope must be a space-separated string")


def _account(data: dict[str, Any]) -> Account:
    """Who signed in, from the id_token's claims. Unverified, and only used for display:
    the token came straight from the token endpoint over the egress proxy."""
    id_token = data.get("id_token")
    if id_token is None:
        return Account()
    claims = _jwt_claims(id_token)
    sub, email = claims.get("sub"), claims.get("email")
    return Account(
        id=sub if isinstance(sub, str) else None,
        email=email if isinstance(email, str) else None,
    )


def _jwt_claims(token: object) -> dict[str, Any]:
    if not isinstance(token, str) or token.count(".") != 2:
        raise CredentialError(f"{TOKENS_PATH}: id_token is not a JWT")
    payload = token.split(".")[1]
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (binascii.Error, ValueError):
        raise CredentialError(f"{TOKENS_PATH}: id_token payload is not base64url JSON") from None
    if not isinstance(claims, dict):
        raise CredentialError(f"{TOKENS_PATH}: id_token payload is not a JSON object")
    return claims
