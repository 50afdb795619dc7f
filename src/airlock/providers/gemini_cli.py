"""Gemini CLI (``@google/gemini-cli``): the interactive ``gemini`` in the browser VM.

Checked against 0.61.0 (the pinned version). There is no login subcommand: with
``security.auth.selectedType: "oauth-personal"`` in ``~/.gemini/settings.json`` the
interactive CLI starts Google's OAuth flow at once. It needs a terminal (without one it
stops with "Manual authorization is required but the current session is non-interactive"),
so the plan runs it under ``script`` (util-linux, always on Debian) for a pseudo-terminal.
It opens the browser only when a display variable is set and ``CI`` and
``DEBIAN_FRONTEND=noninteractive`` are not; with them it falls back to a paste-the-code
prompt. It writes ``~/.gemini/oauth_creds.json`` (``expiry_date`` in milliseconds).
Not proven: offline (no Google reachable), the interactive start under ``script`` sat at its
welcome screen for 30 s without handing a URL to ``$BROWSER``, with stdin at EOF or held
open. Whether it proceeds once Google answers is untested here; the capture, injection and
verification below are tested with the real CLI.

Verification: the CLI has no status command, and it accepts cached credentials only after
``getTokenInfo``, an online call to ``oauth2.googleapis.com/tokeninfo``. The best check is
therefore the CLI's own start-up with ``--debug``: "Loaded cached credentials." when the
network is there; offline (as in our CLI VMs), "Cached credentials are not valid: request
to https://oauth2.googleapis.com/tokeninfo failed", which shows the CLI found, parsed and
tried exactly the injected token (a missing or unreadable file says "Failed to load
credentials" instead, an expired one fails at ``/token``). A CLI VM whose egress proxy
cannot reach Google hears the proxy's gateway error instead: "Cached credentials are not
valid: 502 Bad Gateway" (measured), the same proof; Google's own refusal of a token is a
4xx. Needs Node >= 20.

Which accounts can log in (``ACCOUNTS``, shown in ``GET /api/providers`` and the dashboard):
Google reports that sign-in with *individual* Google accounts (free, Google AI Pro, Ultra)
to Gemini CLI stopped on 2026-06-18 ("This client is no longer supported",
google-gemini/gemini-cli #28229, #29279), while paid Gemini Code Assist seats (Standard,
Enterprise, through a Google Cloud project) keep working. The pinned 0.61.0 has no such
message in its bundle (checked: it still offers ``oauth-personal`` and only says "This model
is not available for personal accounts" for some models), so the refusal comes from
Google's servers, not from the CLI; it cannot be verified offline here. API keys
(``GEMINI_API_KEY``) keep working but are not a browser login, so not what Airlock runs.
"""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path

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
)

CREDS_PATH = ".gemini/oauth_creds.json"
SETTINGS_PATH = ".gemini/settings.json"
SETTINGS = {"security": {"auth": {"selectedType": "oauth-personal"}}}
# What the login needs, by source (none tried against Google from here: no internet). The
# sign-in page itself (accounts.google.com and its static hosts) is the google bundle.
HOSTS = (
    # Google Workspace's allowlist for OAuth: accounts.google.com/o/oauth2,
    # oauth2.googleapis.com/token, www.googleapis.com/oauth2:
    # https://support.google.com/a/answer/9012184
    "accounts.google.com",
    "oauth2.googleapis.com",
    "www.googleapis.com",
    # Kept from the earlier allowlist, not re-checked against a published list (uncertain):
    # the Code Assist API the CLI calls after the login, and the page its redirect shows
    # when the login succeeded.
    "cloudcode-pa.googleapis.com",
    "developers.google.com",
)
BUNDLES = frozenset({"google"})
LOADED = "Loaded cached credentials."
TRIED_OFFLINE = (
    "Cached credentials are not valid: request to https://oauth2.googleapis.com/tokeninfo"
)
# The egress proxy's answer when it cannot reach Google (a gateway error, never Google's).
TRIED_VIA_PROXY = re.compile(r"Cached credentials are not valid: 50[234] ")


ACCOUNTS = (
    "Only Google accounts with a paid Gemini Code Assist seat (Standard or Enterprise, "
    "through a Google Cloud project). Individual accounts (free, Google AI Pro, Ultra) are "
    'refused by Google since 2026-06-18 ("This client is no longer supported"); for '
    "those, use an API key outside Airlock."
)


class GeminiCliProvider:
    id = "gemini_cli"
    name = "Gemini CLI"
    accounts = ACCOUNTS

    def __init__(self, bin_dir: Path = vendor.VENDOR_BIN) -> None:
        self.binary = bin_dir / "gemini"

    def available(self) -> str | None:
        return vendor.missing_cli(self.binary, node_major=20)

    def login_plan(self) -> LoginPlan:
        reason = self.available()
        if reason is not None:
            raise Unavailable(reason, code="provider_unavailable")
        settings = vendor.dumps(SETTINGS).decode()
        # Settings first (so it goes straight to "Sign in with Google"), then the CLI on a
        # pseudo-terminal; the browser VM has a display, so it opens $BROWSER.
        script = (
            'mkdir -p -m 700 "$HOME/.gemini" && '
            'f="$HOME/.gemini/settings.json"; [ -e "$f" ] || printf %s "$1" > "$f"; '
            'exec script -qfec "$2" /dev/null'
        )
        return LoginPlan(
            provider=self.id,
            argv=["/bin/sh", "-c", script, "gemini-login", settings, str(self.binary)],
            watch=[CREDS_PATH],
            env={"DISPLAY": ":0", "CI": "", "DEBIAN_FRONTEND": ""},
        )

    def egress_policy(self) -> EgressPolicy:
        return EgressPolicy(self.id, allow=rules(*HOSTS), bundles=BUNDLES)

    def normalise(self, files: dict[str, bytes], *, now: datetime) -> Credentials:
        raw = files.get(CREDS_PATH)
        data = vendor.load_json_object(raw, CREDS_PATH)
        access = vendor.string(data, "access_token", CREDS_PATH, required=True)
        refresh = vendor.string(data, "refresh_token", CREDS_PATH, required=False)
        token_type = vendor.string(data, "token_type", CREDS_PATH, required=False)
        if token_type is not None and token_type.lower() != "bearer":
            raise CredentialError(f"{CREDS_PATH}: unsupported token_type {token_type!r}")
        if "expiry_date" not in data:
            raise CredentialError(f"{CREDS_PATH}: expiry_date is missing")
        expires_at = vendor.from_epoch_ms(data["expiry_date"], f"{CREDS_PATH}: expiry_date")
        vendor.check_not_expired(expires_at, refresh, now, CREDS_PATH)
        scope = data.get("scope", "")
        if not isinstance(scope, str):
            raise CredentialError(f"{CREDS_PATH}: scope must be a space-separated string")
        account = Account()
        if data.get("id_token") is not None:
            claims = vendor.jwt_claims(data["id_token"], f"{CREDS_PATH}: id_token")
            sub, email = claims.get("sub"), claims.get("email")
            account = Account(
                id=sub if isinstance(sub, str) else None,
                email=email if isinstance(email, str) else None,
            )
        assert access is not None and raw is not None
        return Credentials(
            provider=self.id,
            access_token=access,
            refresh_token=refresh,
            expires_at=expires_at,
            scopes=scope.split(),
            account=account,
            plan=None,
            raw={CREDS_PATH: bytes(raw)},
        )

    def injection(self, creds: Credentials) -> list[InjectFile]:
        """The creds byte for byte; ``settings.json`` selects Google sign-in, else the first
        ``gemini`` asks how to authenticate."""
        return [
            InjectFile(CREDS_PATH, creds.raw[CREDS_PATH]),
            InjectFile(SETTINGS_PATH, vendor.dumps(SETTINGS), only_if_absent=True),
        ]

    def verification(self) -> Verification:
        return Verification(
            argv=[str(self.binary), "--debug", "--prompt", "Reply with OK."],
            check=(
                "gemini --debug start-up: the CLI's own credential loader (no status command; "
                "its validity check is the online tokeninfo call, so offline the best proof is "
                "that the loader reached it with the injected token)"
            ),
            judge=_judge,
            timeout_s=90.0,
        )

    def status_check(self) -> StatusCheck | None:
        """None: Gemini CLI has no status command, and its start-up check above calls
        Google's tokeninfo and the model; a login's health comes from its expiries."""
        return None


def _judge(outcome: RunOutcome) -> tuple[bool, str]:
    text = f"{outcome.stdout}\n{outcome.stderr}"
    if LOADED in text:
        return True, "gemini: loaded cached credentials (validated online)"
    if TRIED_OFFLINE in text or TRIED_VIA_PROXY.search(text):
        return True, "gemini: loaded the injected credentials; tokeninfo unreachable (offline)"
    if "Failed to load credentials" in text:
        return False, "gemini: could not load ~/.gemini/oauth_creds.json"
    return False, f"gemini: credentials not accepted (exit {outcome.exit_code})"
