"""Claude Code (``@anthropic-ai/claude-code``): ``claude auth login`` in the browser VM.

Checked against 2.1.332 (the pinned version): ``claude auth login --claudeai`` hands the
authorize URL (``https://claude.com/cai/oauth/authorize?...``, client id
``9d1c250a-e61b-44d9-88ed-5944d1962f5e``) to ``$BROWSER`` and waits for its loopback
callback; with stdin at EOF it keeps waiting (it does not abort at the "paste code" prompt).
It writes ``~/.claude/.credentials.json`` (``claudeAiOauth``, ``expiresAt`` in
milliseconds). ``claude auth status`` (JSON by default) reads that file offline and exits 0
with ``"loggedIn": true``, 1 with ``false``: that is the verification. The CLI ships as a
native binary in the npm package; it runs although its ``engines`` asks for Node >= 22.
"""

from __future__ import annotations

import json
from datetime import datetime
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

CREDENTIALS_PATH = ".claude/.credentials.json"
CONFIG_PATH = ".claude.json"  # onboarding and account state, next to ~/.claude/
# What the login needs, by source. Nothing here was tried against the vendor from this
# machine (no internet): it is the published lists and public reports, and the demo IdP
# proves the mechanism. A denied host shows in the session's timeline and the egress route;
# learn mode (AIRLOCK_EGRESS_CLAUDE_CODE_LEARN) records what a real login loads.
HOSTS = (
    # The authorize URL the pinned CLI opens (claude.com/cai/oauth/authorize, checked with
    # 2.1.332); public reports of the same: github.com/blackmatrix7/ios_rule_script/issues/1731.
    "claude.com",
    # Anthropic's network requirements for Claude Code (claude.ai: claude.ai account
    # authentication; platform.claude.com: Console account authentication;
    # api.anthropic.com: the API and the token exchange; statsig.anthropic.com: telemetry):
    # https://code.claude.com/docs/en/network-config (and docs.claude.com/.../network-config).
    "claude.ai",
    "platform.claude.com",
    "api.anthropic.com",
    "statsig.anthropic.com",
    # The Console's older name, still where Console logins redirect (uncertain: kept from
    # the earlier allowlist; no current Anthropic page names it).
    "console.anthropic.com",
    # The login page's CSP, quoted in github.com/anthropics/claude-code/issues/21256:
    # frame-ancestors https://claude.ai https://*.claude.ai https://anthropic.com
    # https://*.anthropic.com; the same report shows https://a.claude.ai loaded during the
    # login. We allow a.claude.ai by name, not *.claude.ai (uncertain which other
    # subdomains the page loads; add them with AIRLOCK_EGRESS_CLAUDE_CODE_ALLOW).
    "a.claude.ai",
    # The bot check: under elevated protection /oauth/authorize is a Cloudflare Turnstile
    # challenge (github.com/anthropics/claude-code/issues/33269, issues/16979), served from
    # challenges.cloudflare.com.
    "challenges.cloudflare.com",
)
# Not allowed, though reported: *.claudeusercontent.com (github.com/SukkaW/Surge/pull/57: a
# user saw Google sign-in fail until it was routed like claude.ai; the maintainer could not
# reproduce). sentry.io (error reports of the CLI, not the login page).
BUNDLES = frozenset({"google"})  # "Continue with Google" on the claude.ai login page


class ClaudeCodeProvider:
    id = "claude_code"
    name = "Claude Code"

    def __init__(self, bin_dir: Path = vendor.VENDOR_BIN) -> None:
        self.binary = bin_dir / "claude"

    def available(self) -> str | None:
        return vendor.missing_cli(self.binary)

    def login_plan(self) -> LoginPlan:
        reason = self.available()
        if reason is not None:
            raise Unavailable(reason, code="provider_unavailable")
        return LoginPlan(
            provider=self.id,
            argv=[str(self.binary), "auth", "login", "--claudeai"],
            watch=[CREDENTIALS_PATH],
        )

    def egress_policy(self) -> EgressPolicy:
        return EgressPolicy(self.id, allow=rules(*HOSTS), bundles=BUNDLES)

    def normalise(self, files: dict[str, bytes], *, now: datetime) -> Credentials:
        raw = files.get(CREDENTIALS_PATH)
        data = vendor.load_json_object(raw, CREDENTIALS_PATH)
        oauth = data.get("claudeAiOauth")
        if not isinstance(oauth, dict):
            raise CredentialError(f"{CREDENTIALS_PATH}: claudeAiOauth is missing")
        where = f"{CREDENTIALS_PATH}: claudeAiOauth"
        access = vendor.string(oauth, "accessToken", where, required=True)
        refresh = vendor.string(oauth, "refreshToken", where, required=False)
        if "expiresAt" not in oauth:
            raise CredentialError(f"{where}.expiresAt is missing")
        expires_at = vendor.from_epoch_ms(oauth["expiresAt"], f"{where}.expiresAt")
        refresh_expiry = None
        if oauth.get("refreshTokenExpiresAt") is not None:
            refresh_expiry = vendor.from_epoch_ms(
                oauth["refreshTokenExpiresAt"], f"{where}.refreshTokenExpiresAt"
            )
            if refresh_expiry <= now:
                refresh = None  # expired: cannot rescue an expired access token
        vendor.check_not_expired(expires_at, refresh, now, CREDENTIALS_PATH)
        scopes = oauth.get("scopes", [])
        if not isinstance(scopes, list) or not all(isinstance(s, str) for s in scopes):
            raise CredentialError(f"{where}.scopes must be a list of strings")
        assert access is not None and raw is not None
        return Credentials(
            provider=self.id,
            access_token=access,
            refresh_token=refresh,
            expires_at=expires_at,
            scopes=list(scopes),
            account=Account(
                id=_opt_str(oauth, "accountUuid"),
                organization=_opt_str(oauth, "organizationUuid"),
            ),
            plan=_opt_str(oauth, "subscriptionType"),
            raw={CREDENTIALS_PATH: bytes(raw)},
            refresh_expires_at=refresh_expiry if refresh else None,
        )

    def injection(self, creds: Credentials) -> list[InjectFile]:
        """The credentials file byte for byte, and ``~/.claude.json`` marking onboarding done
        (else the first ``claude`` asks for a theme and a login method) with the account."""
        config: dict[str, Any] = {"hasCompletedOnboarding": True}
        account = {
            k: v
            for k, v in (
                ("accountUuid", creds.account.id),
                ("emailAddress", creds.account.email),
                ("organizationUuid", creds.account.organization),
            )
            if v
        }
        if account:
            config["oauthAccount"] = account
        return [
            InjectFile(CREDENTIALS_PATH, creds.raw[CREDENTIALS_PATH]),
            InjectFile(CONFIG_PATH, vendor.dumps(config), only_if_absent=True),
        ]

    def verification(self) -> Verification:
        return Verification(
            argv=[str(self.binary), "auth", "status", "--json"],
            check="claude auth status --json (reads ~/.claude/.credentials.json offline)",
            judge=_judge,
            timeout_s=60.0,
        )

    def status_check(self) -> StatusCheck:
        """``claude auth status``: offline, it reads the file (a logged-out CLI says so)."""
        verification = self.verification()
        return StatusCheck(
            verification.argv, verification.check, judge_by_verification(verification)
        )


def _judge(outcome: RunOutcome) -> tuple[bool, str]:
    try:
        status = json.loads(outcome.stdout)
    except ValueError:
        return False, f"claude auth status printed no JSON (exit {outcome.exit_code})"
    logged_in = isinstance(status, dict) and status.get("loggedIn") is True
    method = status.get("authMethod") if isinstance(status, dict) else None
    ok = logged_in and outcome.exit_code == 0
    return ok, f"claude auth status: loggedIn={logged_in}, authMethod={method}"


def _opt_str(data: dict[str, Any], key: str) -> str | None:
    value = data.get(key)
    return value if isinstance(value, str) and value else None
