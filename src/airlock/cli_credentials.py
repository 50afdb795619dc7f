"""``airlock credentials``: the logins (grants) this controller keeps, and their health.

Reads the database as the server does (``GET /api/credentials`` gives the same fields);
never a secret.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

import typer
from rich.table import Table

from airlock.api.routes.credentials import CredentialOut, credential_out
from airlock.cli_common import JsonOpt, err, load_settings, out, print_json, relative, with_core
from airlock.services.core import Core
from airlock.store.tables import GrantVersion

app = typer.Typer(help="Logins (credentials) and their health.", no_args_is_help=True)


async def _load(core: Core, user: str | None) -> list[CredentialOut]:
    async with core.db.read() as repo:
        grants = await repo.grants(user_id=user)
        versions = await repo.grant_versions([g.id for g in grants])
    by: dict[str, list[GrantVersion]] = {}
    for v in versions:
        by.setdefault(v.grant_id, []).append(v)
    return [credential_out(core, g, by.get(g.id, [])) for g in grants]


@app.command("ls")
def ls(
    user: Annotated[str | None, typer.Option(help="Only this user's logins.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Each login: provider, account, holder VM (or the vault), state, expiries, version."""
    logins = with_core(load_settings(), lambda core: _load(core, user))
    if as_json:
        print_json([c.model_dump(mode="json") for c in logins])
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
            relative(c.accessExpiresAt, now),
            relative(c.refreshExpiresAt, now),
            relative(c.lastCheckedAt, now),
            str(c.currentVersion),
        )
    out.print(table)
    if not logins:
        err.print("no logins")
