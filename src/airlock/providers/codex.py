"""Codex CLI (``@openai/codex``): ``codex login`` in the browser VM.

Checked against 0.171.0 (the pinned version): ``codex login`` serves its callback on
``127.0.0.1:1455`` (``redirect_uri=http://127.0.0.1:1455/auth/callback``, not ``localhost``
as providers.md says) and hands the authorize URL to ``$BROWSER``. We pass
``-c cli_auth_credentials_store="file"`` so the tokens land in ``~/.codex/auth.json`` whatever
the version's default store. ``auth.json`` has no expiry field: the access token's JWT
``exp`` (seconds) is the expiry, ``last_refresh`` (RFC 3339) when it was issued. ``codex
login status`` reads the file offline: exit 0 and "Logged in using ChatGPT" on stderr when
logged in, exit 1 and "Not logged in" otherwise. Never ``codex logout`` in a browser VM: it
revokes the tokens on the server for every machine. Observed with 0.171.0: ``codex login``
itself starts with that logout: it tries ``POST https://auth.openai.com/oauth/revoke`` for
the tokens in an existing ``auth.json`` and deletes the file. Harmless in a fresh browser VM;
never run ``codex login`` in a CLI VM that holds injected tokens.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from airlock.domain.egress_policy import EgressPolicy, rules
from airlock.errors import CredentialError, Unavailable
from airlock.providers import vendor
from airlock.providers.base import (
    Account,
    Credentials,
    InjectFile,
    LoginPlan,
    RunOutcome,
    StatusCheck,
    Verification,
    judge_by_verification,
)

AUTH_PATH = ".codex/auth.json"
CONFIG_PATH = ".codex/config.toml"
AUTH_CLAIMS = "https://api.openai.com/auth"
# What the login needs, by source (none tried against the vendor from here: no internet).
HOSTS = (
    # The authorize and token endpoints (auth.openai.com/oauth/authorize, /oauth/token),
    # checked with 0.171.0; egress jails that forgot it: github.com/ssdavidai/alfred/pull/116.
    "auth.openai.com",
    # chatgpt.com: where the login ends and the account is read; ab.chatgpt.com: its
    # feature flags (kept from the earlier allowlist). Reported missing from a proxy
    # allowlist for ChatGPT-authenticated Codex: github.com/sunblaze-ucb/exploitgym/issues/27.
    "chatgpt.com",
    "ab.chatgpt.com",
    "api.openai.com",
    # The login page's CSP as quoted in github.com/openai/openai-chatkit-starter-app/issues/52
    # (font-src https://cdn.openai.com; script-src/frame-src https://sentinel.openai.com, the
    # sign-in's bot check) and github.com/zsodur/chatgpt-api-by-browser-script/issues/8
    # (https://*.oaistatic.com, https://cdn.openai.com).
    "cdn.openai.com",
    "sentinel.openai.com",
    "*.oaistatic.com",  # the static CDN (cdn.oaistatic.com): github.com/ACL4SSR/ACL4SSR/issues/129
    # Cloudflare's challenge in front of the login: github.com/ACL4SSR/ACL4SSR/issues/129
    # (DOMAIN-SUFFIX challenges.cloudflare.com; "the login goes through Cloudflare").
    "challenges.cloudflare.com",
)
# Not allowed: auth0.openai.com (the login's host until 2024, github.com/webcompat/web-bugs/
# issues/124499; uncertain whether any page still loads it), openai-api.arkoselabs.com and
# tcr9i.chat.openai.com (an older bot check, in the 2023 lists above: uncertain today).
# ChatGPT's login offers Google, Microsoft and Apple accounts.
BUNDLES = frozenset({"google", "microsoft", "apple"})


class CodexProvider:
    id = "codex"
    name = "Codex"

    def __init__(self, bin_dir: Path = vendor.VENDOR_BIN) -> None:
        self.binary = bin_dir / "codex"

    def available(self) -> str | None:
        return vendor.missing_cli(self.binary, node_major=16)

    def login_plan(self) -> LoginPlan:
        reason = self.available()
        if reason is not None:
            raise Unavailable(reason, code="provider_unavailable")
        return LoginPlan(
            provider=self.id,
            argv=[str(self.binary), "login", "-c", 'cli_auth_credentials_store="file"'],
            watch=[AUTH_PATH],
        )

    def egress_policy(self) -> EgressPolicy:
        return EgressPolicy(self.id, allow=rules(*HOSTS), bundles=BUNDLES)

    def normalise(self, files: dict[str, bytes], *, now: datetime) -> Credentials:
        raw = files.get(AUTH_PATH)
        data = vendor.load_json_object(raw, AUTH_PATH)
        mode = data.get("auth_mode")
        tokens = data.get("tokens")
        if not isinstance(tokens, dict):
            kind = "an API key" if data.get("OPENAI_API_KEY") else "no tokens"
            raise CredentialError(f"{AUTH_PATH} holds {kind}, not a ChatGPT login")
        if mode is not None and mode != "chatgpt":
            raise CredentialError(f"{AUTH_PATH}: auth_mode {mode!r} is not a ChatGPT login")
        where = f"{AUTH_PATH}: tokens"
        access = vendor.string(tokens, "access_token", where, required=True)
        refresh = vendor.string(tokens, "refresh_token", where, required=False)
        id_token = vendor.string(tokens, "id_token", where, required=True)
        access_claims = vendor.jwt_claims(access, f"{where}.access_token")
        if "exp" not in access_claims:
            raise CredentialError(f"{where}.access_token has no exp claim")
        expires_at = vendor.from_epoch_s(access_claims["exp"], f"{where}.access_token exp")
        refreshed_at = None
        if data.get("last_refresh") is not None:
            refreshed_at = vendor.from_rfc3339(data["last_refresh"], f"{AUTH_PATH}: last_refresh")
            if refreshed_at > now + timedelta(seconds=vendor.CLOCK_SKEW_S):
                raise CredentialError(f"{AUTH_PATH}: last_refresh is in the future")
        vendor.check_not_expired(expires_at, refresh, now, AUTH_PATH)
        claims = vendor.jwt_claims(id_token, f"{where}.id_token")
        auth = claims.get(AUTH_CLAIMS)
        auth = auth if isinstance(auth, dict) else {}
        account_id = tokens.get("account_id") or auth.get("chatgpt_account_id")
        scopes = access_claims.get("scp") or access_claims.get("scope") or []
        if isinstance(scopes, str):
            scopes = scopes.split()
        assert access is not None and raw is not None
        return Credentials(
            provider=self.id,
            access_token=access,
            refresh_token=refresh,
            expires_at=expires_at,
            scopes=[s for s in scopes if isinstance(s, str)],
            account=Account(
                id=account_id if isinstance(account_id, str) else None,
                email=_opt_str(claims, "email"),
            ),
            plan=_opt_str(auth, "chatgpt_plan_type"),
            raw={AUTH_PATH: bytes(raw)},
            refreshed_at=refreshed_at,
        )

    def injection(self, creds: Credentials) -> list[InjectFile]:
        """``auth.json`` byte for byte; ``config.toml`` pins the file store (a keyring store
        would ignore the file) unless the VM already has its own config."""
        return [
            InjectFile(AUTH_PATH, creds.raw[AUTH_PATH]),
            InjectFile(CONFIG_PATH, b'cli_auth_credentials_store = "file"\n', only_if_absent=True),
        ]

    def verification(self) -> Verification:
        return Verification(
            argv=[str(self.binary), "login", "status"],
            check="codex login status (reads ~/.codex/auth.json offline)",
            judge=_judge,
            timeout_s=60.0,
        )

    def status_check(self) -> StatusCheck:
        """``codex login status``: offline, it reads ``auth.json``."""
        verification = self.verification()
        return StatusCheck(
            verification.argv, verification.check, judge_by_verification(verification)
        )


def _judge(outcome: RunOutcome) -> tuple[bool, str]:
    text = f"{outcome.stdout}\n{outcome.stderr}"
    line = next((ln.strip() for ln in text.splitlines() if "logged in" in ln.lower()), "")
    ok = outcome.exit_code == 0 and line.startswith("Logged in")
    return ok, f"codex login status: exit {outcome.exit_code}, {line or 'no status line'}"


def _opt_str(data: dict[str, Any], key: str) -> str | None:
    value = data.get(key)
    return value if isinstance(value, str) and value else None
