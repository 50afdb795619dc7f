"""Credential files in each vendor's own format (field names from providers.md, checked
against the pinned CLI versions), with test token values. No vendor server is reachable
from the tests; these are what the vendor CLIs would write after a login."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

CLAUDE_ACCESS = "sk-ant-oat01-test-access-3f9a"
CLAUDE_REFRESH = "sk-ant-ort01-test-refresh-77c1"
CODEX_REFRESH = "rt-test-refresh-codex-5d2e"
GEMINI_ACCESS = "ya29.test-access-gemini-a1b2"
GEMINI_REFRESH = "1//test-refresh-gemini-c3d4"


def b64url(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def jwt(claims: dict[str, Any]) -> str:
    return f"{b64url({'alg': 'RS256', 'typ': 'JWT'})}.{b64url(claims)}.c2lnbmF0dXJl"


def claude_file(expires_at_ms: int | None = None, **overrides: Any) -> bytes:
    oauth: dict[str, Any] = {
        "accessToken": CLAUDE_ACCESS,
        "refreshToken": CLAUDE_REFRESH,
        "expiresAt": expires_at_ms or int(time.time() * 1000) + 8 * 3600 * 1000,
        "scopes": ["user:inference", "user:profile", "user:sessions:claude_code"],
        "subscriptionType": "max",
        "rateLimitTier": "default_claude_max_5x",
    }
    oauth.update(overrides)
    return json.dumps({"claudeAiOauth": oauth}).encode()


def codex_file(
    exp_s: int | None = None, last_refresh: str = "2026-11-27T23:59:00Z", **tokens: Any
) -> bytes:
    exp = exp_s or int(time.time()) + 10 * 24 * 3600
    auth = {"chatgpt_account_id": "acct-test-123", "chatgpt_plan_type": "plus"}
    body: dict[str, Any] = {
        "auth_mode": "chatgpt",
        "OPENAI_API_KEY": None,
        "tokens": {
            "id_token": jwt(
                {
                    "sub": "user-1",
                    "email": "dev@example.test",
                    "exp": exp,
                    "https://api.openai.com/auth": auth,
                }
            ),
            "access_token": jwt({"sub": "user-1", "exp": exp, "scp": ["openid", "offline_access"]}),
            "refresh_token": CODEX_REFRESH,
            "account_id": "acct-test-123",
        },
        "last_refresh": last_refresh,
    }
    body["tokens"].update(tokens)
    return json.dumps(body, indent=2).encode()


def gemini_file(expiry_date_ms: int | None = None, **overrides: Any) -> bytes:
    body: dict[str, Any] = {
        "access_token": GEMINI_ACCESS,
        "refresh_token": GEMINI_REFRESH,
        "scope": "https://www.googleapis.com/auth/cloud-platform "
        "https://www.googleapis.com/auth/userinfo.email openid",
        "token_type": "Bearer",
        "id_token": jwt({"sub": "g-42", "email": "dev@example.test"}),
        "expiry_date": expiry_date_ms or int(time.time() * 1000) + 3500 * 1000,
    }
    body.update(overrides)
    return json.dumps(body).encode()
