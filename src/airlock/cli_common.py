"""What every ``airlock`` command module shares: the settings it reads, a core opened for
one action, errors as a message and an exit status, and where output goes (results to
standard output, everything else to standard error)."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from pydantic import ValidationError
from rich.console import Console

from airlock.errors import AirlockError
from airlock.services.core import Core
from airlock.settings import Settings

T = TypeVar("T")

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)

JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


def fail(message: str, code: int = 1) -> NoReturn:
    err.print(f"[red]error:[/red] {message}", soft_wrap=True)
    raise typer.Exit(code)


def load_settings() -> Settings:
    try:
        return Settings()
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        fail(f"invalid settings (AIRLOCK_* environment or .env): {problems}", 2)


def with_core(settings: Settings, action: Callable[[Core], Awaitable[T]]) -> T:
    """Open the database (and vault) only, run ``action``, close. Service errors become a
    message and exit status 1."""

    async def run() -> T:
        core = Core(settings)
        try:
            await core.open()
            return await action(core)
        finally:
            await core.close()

    try:
        return asyncio.run(run())
    except AirlockError as exc:
        fail(exc.message)


def print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, default=str) + "\n")


def relative(value: datetime | None, now: datetime) -> str:
    """``in 25 s``, ``3 min ago``, ``-`` for none."""
    if value is None:
        return "-"
    seconds = (value - now).total_seconds()
    span = abs(seconds)
    if span < 1:
        return "now"
    if span < 120:
        text = f"{span:.0f} s"
    elif span < 7200:
        text = f"{span / 60:.0f} min"
    elif span < 172_800:
        text = f"{span / 3600:.0f} h"
    else:
        text = f"{span / 86400:.0f} d"
    return f"in {text}" if seconds > 0 else f"{text} ago"
