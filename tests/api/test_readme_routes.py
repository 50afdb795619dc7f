"""Docs that cannot drift (style.md, habit 8): every route the API serves is named in the
README. Path parameters may be spelled any way there (``{sessionId}``, ``{id}``)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from airlock.api.app import create_app
from airlock.settings import Settings

README = Path(__file__).resolve().parents[2] / "README.md"


def served_routes() -> list[tuple[str, str]]:
    app = create_app(Settings(_env_file=None))  # routes only: the lifespan does not run
    paths = app.openapi()["paths"]
    return sorted((method.upper(), path) for path, ops in paths.items() for method in ops)


def _pattern(path: str) -> re.Pattern[str]:
    parts = re.split(r"\{[^}]+\}", path)
    return re.compile(r"\{[^}]+\}".join(re.escape(p) for p in parts) + r"(?![\w/{])")


@pytest.mark.parametrize(("method", "path"), served_routes())
def test_every_route_is_in_the_readme(method: str, path: str) -> None:
    assert README.is_file(), f"{README} is missing"
    readme = README.read_text(encoding="utf-8")
    assert _pattern(path).search(readme), f"README.md does not name {method} {path}"
