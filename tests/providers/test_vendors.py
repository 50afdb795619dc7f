"""The vendor providers' normalisation: units pinned, bad files refused with a clear error
that never quotes a token, and what the handoff writes back."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from airlock.errors import CredentialError
from airlock.providers import claude_code, codex, gemini_cli
from airlock.providers.base import RunOutcome
from airlock.providers.claude_code import ClaudeCodeProvider
from airlock.providers.codex import CodexProvider
from airlock.providers.gemini_cli import GeminiCliProvider
from tests.providers.vendor_files import (
    CLAUDE_ACCESS,
    CLAUDE_REFRESH,
    CODEX_REFRESH,
    GEMINI_ACCESS,
    claude_file,
    codex_file,
    gemini_file,
)

NOW = datetime(2026, 11, 28, 0, 0, tzinfo=UTC)
# One instant, 2026-11-28T08:00:00Z, in each vendor's unit.
INSTANT = datetime(2026, 11, 28, 8, 0, tzinfo=UTC)
INSTANT_S = 1_795_852_800
INSTANT_MS = INSTANT_S * 1000


def test_the_instant_is_what_the_tests_say() -> None:
    assert datetime.fromtimestamp(INSTANT_S, tz=UTC) == INSTANT


def test_claude_expires_at_is_milliseconds() -> None:
    files = {claude_code.CREDENTIALS_PATH: claude_file(INSTANT_MS)}
    creds = ClaudeCodeProvider().normalise(files, now=NOW)
    assert creds.expires_at == INSTANT
    assert (creds.access_token, creds.refresh_token) == (CLAUDE_ACCESS, CLAUDE_REFRESH)
    assert creds.plan == "max"
    assert "user:inference" in creds.scopes
    assert creds.raw == files  # byte for byte


def test_gemini_expiry_date_is_milliseconds() -> None:
    files = {gemini_cli.CREDS_PATH: gemini_file(INSTANT_MS)}
    creds = GeminiCliProvider().normalise(files, now=NOW)
    assert creds.expires_at == INSTANT
    assert creds.access_token == GEMINI_ACCESS
    assert creds.scopes[-1] == "openid"  # the space-separated string, split
    assert creds.account.email == "dev@example.test"
    assert creds.raw == files


def test_codex_jwt_exp_seconds_and_last_refresh_rfc3339_are_the_same_instant() -> None:
    # last_refresh with a +02:00 offset: 10:00 there is 08:00 UTC.
    files = {codex.AUTH_PATH: codex_file(INSTANT_S, last_refresh="2026-11-28T10:00:00+02:00")}
    creds = CodexProvider().normalise(files, now=NOW + timedelta(hours=9))
    assert creds.expires_at == INSTANT
    assert creds.refreshed_at == INSTANT
    assert creds.expires_at == creds.refreshed_at
    assert creds.refresh_token == CODEX_REFRESH
    assert creds.account.id == "acct-test-123"
    assert creds.account.email == "dev@example.test"
    assert creds.plan == "plus"
    assert creds.raw == files

    zulu = {codex.AUTH_PATH: codex_file(INSTANT_S, last_refresh="2026-11-28T08:00:00Z")}
    later = NOW + timedelta(hours=9)
    assert CodexProvider().normalise(zulu, now=later).refreshed_at == INSTANT
    with pytest.raises(CredentialError, match="in the future"):
        CodexProvider().normalise(zulu, now=NOW)  # 8 h ahead of the clock: a unit or zone slip


@pytest.mark.parametrize(
    ("provider", "path", "content", "message"),
    [
        # The wrong unit: seconds where milliseconds belong, and the reverse.
        (
            ClaudeCodeProvider(),
            claude_code.CREDENTIALS_PATH,
            claude_file(INSTANT_S),
            "looks like seconds",
        ),
        (GeminiCliProvider(), gemini_cli.CREDS_PATH, gemini_file(INSTANT_S), "looks like seconds"),
        (CodexProvider(), codex.AUTH_PATH, codex_file(INSTANT_MS), "looks like milliseconds"),
        # Truncated mid-file, not JSON, not UTF-8, not an object.
        (ClaudeCodeProvider(), claude_code.CREDENTIALS_PATH, claude_file()[:40], "truncated"),
        (CodexProvider(), codex.AUTH_PATH, codex_file()[:-7], "truncated"),
        (GeminiCliProvider(), gemini_cli.CREDS_PATH, b"\xff\xfe{}", "not UTF-8"),
        (GeminiCliProvider(), gemini_cli.CREDS_PATH, b"[1, 2]", "JSON object"),
        # Structure.
        (
            ClaudeCodeProvider(),
            claude_code.CREDENTIALS_PATH,
            b'{"other": {}}',
            "claudeAiOauth is missing",
        ),
        (
            ClaudeCodeProvider(),
            claude_code.CREDENTIALS_PATH,
            claude_file(accessToken=""),
            "accessToken",
        ),
        (
            CodexProvider(),
            codex.AUTH_PATH,
            b'{"OPENAI_API_KEY": "sk-x", "tokens": null}',
            "API key",
        ),
        (CodexProvider(), codex.AUTH_PATH, codex_file(access_token="not-a-jwt"), "not a JWT"),
        (CodexProvider(), codex.AUTH_PATH, codex_file(last_refresh="2026-11-28 08:00"), "RFC 3339"),
        (
            CodexProvider(),
            codex.AUTH_PATH,
            codex_file(last_refresh="2026-11-28T08:00:00"),
            "no UTC offset",
        ),
        (GeminiCliProvider(), gemini_cli.CREDS_PATH, gemini_file(token_type="MAC"), "token_type"),
        # Expired with nothing to refresh it.
        (
            ClaudeCodeProvider(),
            claude_code.CREDENTIALS_PATH,
            claude_file(1_700_000_000_000, refreshToken=None),
            "expired",
        ),
        (
            GeminiCliProvider(),
            gemini_cli.CREDS_PATH,
            gemini_file(1_700_000_000_000, refresh_token=None),
            "expired",
        ),
    ],
)
def test_bad_files_are_refused_clearly(
    provider: ClaudeCodeProvider | CodexProvider | GeminiCliProvider,
    path: str,
    content: bytes,
    message: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    with pytest.raises(CredentialError, match=message) as info:
        provider.normalise({path: content}, now=NOW)
    for secret in (CLAUDE_ACCESS, CLAUDE_REFRESH, CODEX_REFRESH, GEMINI_ACCESS, "sk-x"):
        assert secret not in info.value.message
        assert secret not in caplog.text


def test_a_key_that_appears_twice_is_ambiguous_and_refused() -> None:
    twice = (
        b'{"access_token": "ya29.one", "access_token": "ya29.two", '
        b'"token_type": "Bearer", "expiry_date": 1795852800000}'
    )
    with pytest.raises(CredentialError, match="'access_token' appears twice"):
        GeminiCliProvider().normalise({gemini_cli.CREDS_PATH: twice}, now=NOW)


def test_a_missing_file_is_named() -> None:
    with pytest.raises(CredentialError, match=r"no \.codex/auth\.json"):
        CodexProvider().normalise({}, now=NOW)


def test_expired_access_token_with_refresh_token_is_kept() -> None:
    """The CLI refreshes it on first use; refusing it would force a second login."""
    files = {claude_code.CREDENTIALS_PATH: claude_file(1_795_000_000_000)}
    creds = ClaudeCodeProvider().normalise(files, now=NOW)
    assert creds.expires_at is not None and creds.expires_at < NOW


def test_injection_writes_raw_bytes_and_companion_settings() -> None:
    files = {claude_code.CREDENTIALS_PATH: claude_file(INSTANT_MS)}
    creds = ClaudeCodeProvider().normalise(files, now=NOW)
    plan = {f.path: f for f in ClaudeCodeProvider().injection(creds)}
    assert plan[claude_code.CREDENTIALS_PATH].content == files[claude_code.CREDENTIALS_PATH]
    assert plan[claude_code.CREDENTIALS_PATH].mode == 0o600
    assert not plan[claude_code.CREDENTIALS_PATH].only_if_absent
    config = json.loads(plan[claude_code.CONFIG_PATH].content)
    assert config["hasCompletedOnboarding"] is True
    assert plan[claude_code.CONFIG_PATH].only_if_absent

    g = GeminiCliProvider()
    gcreds = g.normalise({gemini_cli.CREDS_PATH: gemini_file()}, now=NOW)
    settings = {f.path: f for f in g.injection(gcreds)}[gemini_cli.SETTINGS_PATH]
    assert json.loads(settings.content)["security"]["auth"]["selectedType"] == "oauth-personal"


def test_status_outputs_are_judged_as_the_pinned_clis_print_them() -> None:
    """Outputs copied from the pinned versions (see the provider modules)."""
    claude = ClaudeCodeProvider().verification().judge
    assert claude(RunOutcome(0, '{"loggedIn": true, "authMethod": "claude.ai"}', ""))[0]
    assert not claude(RunOutcome(1, '{"loggedIn": false, "authMethod": "none"}', ""))[0]
    assert not claude(RunOutcome(0, "garbage", ""))[0]
    codex_judge = CodexProvider().verification().judge
    assert codex_judge(RunOutcome(0, "", "Logged in using ChatGPT\n"))[0]
    assert not codex_judge(RunOutcome(1, "", "Not logged in\n"))[0]
    gemini = GeminiCliProvider().verification().judge
    assert gemini(RunOutcome(41, "", f"{gemini_cli.TRIED_OFFLINE} failed, reason: x"))[0]
    # Through a CLI VM's egress proxy that cannot reach Google: its gateway error.
    assert gemini(RunOutcome(41, "", "Cached credentials are not valid: 502 Bad Gateway"))[0]
    assert not gemini(RunOutcome(41, "", "Cached credentials are not valid: 400 Bad Request"))[0]
    assert not gemini(RunOutcome(41, "", "Failed to load credentials from x: ENOENT"))[0]


def test_a_missing_cli_is_unavailable_with_the_reason(tmp_path: Path) -> None:
    for cls in (ClaudeCodeProvider, CodexProvider, GeminiCliProvider):
        reason = cls(bin_dir=tmp_path).available()
        assert reason is not None and "not installed" in reason and "setup.sh" in reason
