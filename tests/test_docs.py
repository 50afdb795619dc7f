"""Docs that cannot drift (style.md, habit 8): the README names every setting, and its first
screen tells a newcomer the two commands that matter."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import AliasChoices

from airlock.settings import Settings

README = Path(__file__).resolve().parent.parent / "README.md"

# Environment variables the README may name that are not settings of the controller.
NOT_SETTINGS = {"AIRLOCK_TEST_POSTGRES_URL", "AIRLOCK_PG_DIR", "AIRLOCK_PG_PORT"}


def _readme() -> str:
    # Read in each test, not in a fixture, so a missing README fails the tests (not errors).
    assert README.is_file(), f"{README} is missing"
    return README.read_text(encoding="utf-8")


def _aliases(field_name: str) -> list[str]:
    """The upper-case environment aliases of a field (``BROWSER_VM_GRACE_PERIOD_MS``)."""
    alias = Settings.model_fields[field_name].validation_alias
    choices = alias.choices if isinstance(alias, AliasChoices) else [alias]
    return [c for c in choices if isinstance(c, str) and c.isupper()]


@pytest.mark.parametrize("field_name", sorted(Settings.model_fields))
def test_every_setting_is_in_the_readme(field_name: str) -> None:
    readme = _readme()
    for name in [f"AIRLOCK_{field_name.upper()}", *_aliases(field_name)]:
        assert name in readme, f"README.md does not document {name}"


def test_the_legacy_grace_period_alias_is_in_the_readme() -> None:
    readme = _readme()
    assert "BROWSER_VM_GRACE_PERIOD_MS" in _aliases("grace_success_ms")
    assert "BROWSER_VM_GRACE_PERIOD_MS" in readme


def test_the_readme_names_no_setting_that_does_not_exist() -> None:
    readme = _readme()
    known = {f"AIRLOCK_{name.upper()}" for name in Settings.model_fields} | NOT_SETTINGS
    named = set(re.findall(r"\bAIRLOCK_[A-Z0-9_]*[A-Z0-9]", readme))
    assert named <= known, f"README.md names unknown settings: {sorted(named - known)}"


def test_the_first_screen_says_make_run_and_make_test() -> None:
    readme = _readme()
    first_screen = "\n".join(readme.splitlines()[:40])
    assert "make run" in first_screen
    assert "make test" in first_screen
