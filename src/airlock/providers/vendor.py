"""What the three vendor providers share: where set-up installs the CLIs, strict JSON
reading, and timestamp conversion by explicit unit.

The CLIs come from the npm registry at the versions pinned in ``vendor-clis/package.json``;
``scripts/setup.sh`` installs them with ``npm ci`` into ``VENDOR_CLI_DIR`` under
``/usr/local``, which every sandbox VM sees read-only with the rest of ``/usr`` (browser VMs
and CLI VMs alike), so the binary that logs in and the one that is verified are the same.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import os
import shutil
import subprocess
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any

from airlock.errors import CredentialError

VENDOR_CLI_DIR = Path("/usr/local/lib/airlock/vendor-clis")
VENDOR_BIN = VENDOR_CLI_DIR / "node_modules" / ".bin"

# Sanity bounds: a timestamp outside 2000..2286 is a unit mistake (ms read as s, or s as ms).
MIN_EPOCH_S = 946_684_800  # 2000-01-01
MAX_EPOCH_S = 10_000_000_000  # 2286-11-20
CLOCK_SKEW_S = 300


def missing_cli(binary: Path, *, node_major: int | None = None) -> str | None:
    """None when ``binary`` is installed and runnable here, else why not."""
    if not os.access(binary, os.X_OK):
        return (
            f"the {binary.name} CLI is not installed at {binary} "
            "(scripts/setup.sh installs the vendor CLIs from vendor-clis/package.json)"
        )
    if node_major is not None:
        node = shutil.which("node")
        if node is None:
            return f"{binary.name} needs Node.js >= {node_major}; there is no node on PATH"
        version = _node_major(Path(node))
        if version is not None and version < node_major:
            return f"{binary.name} needs Node.js >= {node_major}; {node} is {version}"
    return None


@cache
def _node_major(node: Path) -> int | None:
    """Node's major version (once per process: it does not change under us)."""
    try:
        out = subprocess.run(
            [str(node), "--version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
        return int(out.strip().lstrip("v").split(".")[0])
    except (OSError, ValueError, subprocess.SubprocessError):
        return None


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    dupes = sorted({k for k in keys if keys.count(k) > 1})
    if dupes:
        raise ValueError(f"key {dupes[0]!r} appears twice")
    return dict(pairs)


def load_json_object(raw: bytes | None, path: str) -> dict[str, Any]:
    """The file as a JSON object. Truncated, non-UTF-8, or ambiguous (a key that appears
    twice: which one would the CLI use?) is a ``CredentialError`` naming the file only."""
    if raw is None:
        raise CredentialError(f"the capture has no {path}")
    try:
        data = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except UnicodeDecodeError:
        raise CredentialError(f"{path} is not UTF-8") from None
    except ValueError as exc:
        # json's message names a position, never the content.
        raise CredentialError(f"{path} is not valid JSON (truncated?): {exc}") from None
    if not isinstance(data, dict):
        raise CredentialError(f"{path} must hold a JSON object")
    return data


def string(data: dict[str, Any], key: str, path: str, *, required: bool) -> str | None:
    value = data.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value:
        what = "missing" if value is None else f"not a non-empty string ({type(value).__name__})"
        raise CredentialError(f"{path}: {key} is {what}")
    return value


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise CredentialError(f"{what} must be a number")
    return float(value)


def from_epoch_ms(value: Any, what: str) -> datetime:
    """Milliseconds since the epoch (Claude ``expiresAt``, Gemini ``expiry_date``)."""
    ms = _number(value, what)
    if ms < MIN_EPOCH_S * 1000:
        hint = " (looks like seconds)" if ms >= MIN_EPOCH_S else ""
        raise CredentialError(f"{what}={ms:.0f} is not epoch milliseconds{hint}")
    if ms >= MAX_EPOCH_S * 1000:
        raise CredentialError(f"{what}={ms:.0f} is out of range for epoch milliseconds")
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


def from_epoch_s(value: Any, what: str) -> datetime:
    """Seconds since the epoch (a JWT's ``exp``)."""
    s = _number(value, what)
    if s >= MAX_EPOCH_S:
        raise CredentialError(f"{what}={s:.0f} looks like milliseconds, not epoch seconds")
    if s < MIN_EPOCH_S:
        raise CredentialError(f"{what}={s:.0f} is not epoch seconds")
    return datetime.fromtimestamp(s, tz=UTC)


def from_rfc3339(value: Any, what: str) -> datetime:
    """An RFC 3339 timestamp with an offset (Codex ``last_refresh``), as UTC."""
    if not isinstance(value, str) or "T" not in value.upper():
        raise CredentialError(f"{what} must be an RFC 3339 timestamp")
    text = value.strip()
    if text[-1:] in ("Z", "z"):
        text = text[:-1] + "+00:00"
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise CredentialError(f"{what} is not an RFC 3339 timestamp") from None
    if parsed.tzinfo is None:
        raise CredentialError(f"{what} has no UTC offset; its instant is ambiguous")
    return parsed.astimezone(UTC)


def jwt_claims(token: Any, what: str) -> dict[str, Any]:
    """A JWT's payload, unverified: only read for expiry and display. The token came from
    the vendor's token endpoint; the vendor's API checks its signature on every use."""
    if not isinstance(token, str) or token.count(".") != 2:
        raise CredentialError(f"{what} is not a JWT")
    payload = token.split(".")[1]
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (binascii.Error, ValueError):
        raise CredentialError(f"{what}: payload is not base64url JSON") from None
    if not isinstance(claims, dict):
        raise CredentialError(f"{what}: payload is not a JSON object")
    return claims


def check_not_expired(
    expires_at: datetime | None, refresh_token: str | None, now: datetime, path: str
) -> None:
    """An expired access token is usable only through its refresh token."""
    if expires_at is not None and expires_at <= now and not refresh_token:
        raise CredentialError(
            f"{path}: the access token expired at {expires_at.isoformat()} and there is no "
            "refresh token"
        )


def dumps(data: dict[str, Any]) -> bytes:
    return json.dumps(data, indent=2).encode() + b"\n"
