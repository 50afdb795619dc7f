"""``airlock doctor``: what this host has of what each runtime needs, and whether the
configured one will work here.

The doctor knows no runtime: each runtime's host module answers ``host_checks()`` (its
binaries, KVM as it will use it, what contains a VM; ``services.core.runtime_host_checks``
lists them next to ``make_runtime``), and the configured runtime answers ``check()``. A
row is required when the configured runtime needs it; a name that several runtimes check
(``kvm``) is shown once, as the configured runtime sees it. The doctor adds only what is
the controller's own: the data dir and the database. It changes nothing (a SQLite file
that does not exist yet is not created).
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import typer
from rich.table import Table

from airlock.cli_common import JsonOpt, err, load_settings, out, print_json
from airlock.services.core import make_runtime, runtime_host_checks
from airlock.settings import Settings
from airlock.store.db import Database


@dataclass
class Check:
    """One row of the report (``--json``: one object with these keys)."""

    name: str
    ok: bool
    required: bool
    detail: str
    fix: str | None = None


def doctor_checks(settings: Settings) -> list[Check]:
    rows: dict[str, Check] = {}
    for runtime, checks in runtime_host_checks(settings).items():
        configured = runtime == settings.runtime
        for c in checks():
            if c.name not in rows or configured:  # the configured runtime's view wins
                rows[c.name] = Check(c.name, c.ok, c.needed and configured, c.detail, c.fix)
    sqlite_file = Path(settings.db_url.split(":///", 1)[-1])
    sqlite_missing = settings.db_url.startswith("sqlite") and not sqlite_file.exists()

    async def probes() -> list[Check]:
        if sqlite_missing:  # connecting would create it; doctor changes nothing
            database = Check("database", True, True, f"{sqlite_file} made at first start")
        else:
            database = await _database_check(settings)
        return [database, await _runtime_check(settings)]

    return [*rows.values(), _data_dir_check(settings.data_dir), *asyncio.run(probes())]


def _data_dir_check(data_dir: Path) -> Check:
    if data_dir.exists():
        try:
            with tempfile.NamedTemporaryFile(dir=data_dir, prefix=".doctor-"):
                pass
        except OSError as exc:
            return Check(
                "data dir", False, True, f"{data_dir} not writable: {exc.strerror}", "chown it"
            )
        return Check("data dir", True, True, f"{data_dir} writable")
    parent = next(p for p in data_dir.parents if p.exists())
    if os.access(parent, os.W_OK | os.X_OK):
        return Check("data dir", True, True, f"{data_dir} will be created (in {parent})")
    return Check(
        "data dir",
        False,
        True,
        f"{data_dir} missing and {parent} not writable",
        "set AIRLOCK_DATA_DIR to a writable directory",
    )


async def _database_check(settings: Settings) -> Check:
    where = settings.db_url.split("@")[-1]  # never print a password in the URL
    db = Database(settings.db_url)
    try:
        await asyncio.wait_for(db.ping(), 10)
        return Check("database", True, True, f"reachable ({where})")
    except Exception as exc:
        return Check(
            "database",
            False,
            True,
            f"not reachable ({where}): {type(exc).__name__}: {str(exc)[:200]}",
            "check AIRLOCK_DATABASE_URL (or the data dir for SQLite)",
        )
    finally:
        await db.close()


async def _runtime_check(settings: Settings) -> Check:
    """The configured runtime's own ``check()``, whatever runtime it is."""
    name = f"runtime {settings.runtime}"
    try:
        problems = await make_runtime(settings).check()
    except Exception as exc:
        return Check(name, False, True, f"{type(exc).__name__}: {str(exc)[:300]}")
    if problems:
        return Check(name, False, True, "; ".join(problems))
    return Check(name, True, True, "self-check passed")


def doctor(as_json: JsonOpt = False) -> None:
    """Check this host for what the configured runtime needs; exit 1 if a required check
    fails."""
    settings = load_settings()
    checks = doctor_checks(settings)
    failed = [c for c in checks if c.required and not c.ok]
    if as_json:
        print_json(
            {"runtime": settings.runtime, "ok": not failed, "checks": [asdict(c) for c in checks]}
        )
    else:
        table = Table("check", "", "detail", "fix", title=f"runtime: {settings.runtime}")
        for c in checks:
            mark = "[green]ok[/green]" if c.ok else "[red]FAIL[/red]" if c.required else "-"
            table.add_row(c.name, mark, c.detail, c.fix or "")
        out.print(table)
        if failed:
            err.print(f"[red]{len(failed)} required check(s) failed[/red]")
    if failed:
        raise typer.Exit(1)
