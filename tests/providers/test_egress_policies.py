"""Each provider's egress policy: the bundles it declares, its hosts, and the operator's
settings on top (as the controller applies them at start)."""

from __future__ import annotations

import inspect

import pytest

from airlock.domain.egress_policy import Decision
from airlock.providers import claude_code, codex, gemini_cli
from airlock.providers.claude_code import ClaudeCodeProvider
from airlock.providers.codex import CodexProvider
from airlock.providers.gemini_cli import GeminiCliProvider
from airlock.services.core import egress_policies, make_providers
from airlock.settings import Settings


def test_vendors_declare_their_sso_bundles() -> None:
    assert ClaudeCodeProvider().egress_policy().bundles == {"google"}
    assert CodexProvider().egress_policy().bundles == {"google", "microsoft", "apple"}
    assert GeminiCliProvider().egress_policy().bundles == {"google"}
    claude = ClaudeCodeProvider().egress_policy()
    for host in ("claude.ai", "claude.com", "accounts.google.com", "challenges.cloudflare.com"):
        assert claude.decide(host, 443).decision is Decision.ALLOWED, host
    assert claude.decide("login.microsoftonline.com", 443).decision is Decision.DENIED
    chatgpt = CodexProvider().egress_policy()
    for host in ("auth.openai.com", "cdn.oaistatic.com", "login.live.com", "appleid.apple.com"):
        assert chatgpt.decide(host, 443).decision is Decision.ALLOWED, host
    assert chatgpt.decide("oaistatic.com", 443).decision is Decision.DENIED  # not the apex


@pytest.mark.parametrize("module", [claude_code, codex, gemini_cli])
def test_every_host_group_cites_a_source(module: object) -> None:
    """The module says where each host comes from: a URL next to each group of hosts."""
    source = inspect.getsource(module)  # type: ignore[arg-type]
    start = source.index("HOSTS = (")
    block = source[start : source.index("\n)\n", start)].splitlines()[1:]
    comment, groups, in_hosts = "", [], False
    for line in (raw.strip() for raw in block):
        if line.startswith("#"):
            if in_hosts:
                comment, in_hosts = "", False
            comment += line
        elif line.startswith('"'):
            if not in_hosts:
                groups.append(comment)
            in_hosts = True
            comment += line  # a trailing comment on the host line counts too
    assert len(groups) >= 2
    for text in groups:
        assert "http" in text or "github.com/" in text or "earlier allowlist" in text, text


def test_operator_settings_change_a_provider_policy() -> None:
    settings = Settings(
        _env_file=None,
        egress_codex_deny="@apple,cdn.openai.com",
        egress_codex_allow="*.auth0.com",
        egress_claude_code_policy="claude.ai",
        egress_gemini_cli_learn=True,
        oauth2_allowed_hosts="cdn.example:8443",
        egress_oauth2_allow="@github",
    )
    policies = egress_policies(settings, make_providers(settings, demo=True))
    assert policies["codex"].bundles == {"google", "microsoft"}
    assert policies["codex"].decide("cdn.openai.com", 443).decision is Decision.DENIED
    assert policies["codex"].decide("x.auth0.com", 443).decision is Decision.ALLOWED
    assert policies["claude_code"].bundles == frozenset()
    assert policies["claude_code"].decide("claude.com", 443).decision is Decision.DENIED
    assert policies["gemini_cli"].learn and not policies["codex"].learn
    oauth2 = policies["oauth2"]
    assert oauth2.decide("cdn.example", 8443).decision is Decision.ALLOWED
    assert oauth2.decide("github.com", 443).decision is Decision.ALLOWED


def test_a_bad_setting_names_itself() -> None:
    settings = Settings(_env_file=None, egress_codex_allow="10.0.0.1")
    with pytest.raises(ValueError, match=r"AIRLOCK_EGRESS_CODEX_\*.*IP addresses are never"):
        egress_policies(settings, make_providers(settings, demo=True))
