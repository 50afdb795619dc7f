"""``airlock credentials``: the logins (grants) this controller keeps, and their health.

Reads the database as the server does (``GET /api/credentials`` gives the same fields);
never a secret. Self-contained, so it does not depend on how ``cli.py`` is split.
"""

from __future__ import annotations

import asyncio
import json
import sys
from datetime import UTC, datetime
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from airlock.api.routes.credentials import CredentialOut, credential_out
from airlock.services.core import Core
from airlock.settings import Settings
from airlock.store.tables import GrantVersion

app = typer.Typer(help="Logins (credentials) and their health.", no_args_is_help=True)
out = Console(highlight=False)
err = Console(stderr=True, highlight=False)


async def _load(settings: Settings, user: str | None) -> list[CredentialOut]:
    core = Core(settings)
    try:
        await core.open()
        async with core.db.read() as repo:
            grants = await repo.grants(user_id=user)
            versions = await repo.grant_versions([g.id for g in grants])
        by: dict[str, list[GrantVersion]] = {}
        for v in versions:
            by.setdefault(v.grant_id, []).append(v)
        return [credential_out(core, g, by.get(g.id, [])) for g in grants]
    finally:
        await core.close()


def _when(value: datetime | None, now: datetime) -> str:
    if value is None:
        return "-"
    seconds = (value - now).total_seconds()
    span = abs(seconds)
    text = (
        f"{span:.0f} s"
        if span < 120
        else f"{span / 60:.0f} min"
        if span < 7200
        else f"{span / 3600:.0f} h"
        if span < 172_800
        else f"{span / 86400:.0f} d"
    )
    return f"in {text}" if seconds > 0 else f"{text} ago"


@app.command("ls")
def ls(
    user: Annotated[str | None, typer.Option(help="Only this user's logins.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Each login: provider, account, holder VM (or the vault), state, expiries, version."""
    try:
        settings = Settings()
    except ValidationError as exc:
        err.print(f"[red]error:[/red] invalid settings: {exc.errors()[0]['msg']}")
        raise typer.Exit(2) from None
    logins = asyncio.run(_load(settings, user))
    if as_json:
        payload = [c.model_dump(mode="json") for c in logins]
        sys.stdout.write(json.dumps(payload, indent=2) + "\n")
        return
    now = datetime.now(UTC)
    table = Table(
        "login", "user", "provider", "account", "holder", "state", "access ends",
        "refresh ends", "checked", "version",
    )  # fmt: skip
    for c in logins:
        table.add_row(
            c.grantId[:12],
            c.userId,
            c.providerName,
            c.account or "-",
            c.holderVmId or "vault",
            c.state.value + (f" ({c.stateReason})" if c.state.value != "active" else ""),
            _when(c.accessExpiresAt, now),
            _when(c.refreshExpiresAt, now),
            _when(c.lastCheckedAt, now),
            str(c.currentVersion),
        )
    out.print(table)
    if not logins:
        err.print("no logins")
