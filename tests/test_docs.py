"""Docs that cannot drift (style.md, habit 8): the README names every setting, and its first
screen tells a newcomer the two commands that matter."""

from __future__ import annotations

import ast
import builtins
import fcntl
import importlib
import os
import re
from asyncio import Task
from pathlib import Path

import pytest
from pydantic import AliasChoices

from airlock.settings import Settings

README = Path(__file__).resolve().parent.parent / "README.md"

# Environment variables the README may name that are not settings of the controller.
NOT_SETTINGS = {
    "AIRLOCK_TEST_POSTGRES_URL",
    "AIRLOCK_TEST_SCHEMATHESIS_EXAMPLES",
    "AIRLOCK_PG_DIR",
    "AIRLOCK_PG_PORT",
}


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


# The design documents the README cites by name; they live beside the repository, not in it.
DESIGN_DOCS = {"architecture.md", "lifecycle.md", "http-api.md", "providers.md", "style.md"}


def test_the_files_the_readme_names_exist() -> None:
    """``egress.py`` became ``egress/``: a file the README names (``tests/e2e/test_egress.py``,
    ``providers/gemini_cli.py``, ``escape_probe.py``) is somewhere in the repository."""
    readme = _readme()
    root = README.parent
    skip = {".venv", ".git", "node_modules"}
    tracked = [p.relative_to(root).as_posix() for p in root.rglob("*") if not skip & set(p.parts)]
    missing = []
    for name in set(re.findall(r"`([\w./-]+\.(?:py|md|sh|html|js|toml|yaml))`", readme)):
        if name.rpartition("/")[2] in DESIGN_DOCS:
            continue
        if not any(t == name or t.endswith("/" + name) for t in tracked):
            missing.append(name)
    assert sorted(missing) == []


def test_the_first_screen_says_make_run_and_make_test() -> None:
    readme = _readme()
    first_screen = "\n".join(readme.splitlines()[:40])
    assert "make run" in first_screen
    assert "make test" in first_screen


# --- docstrings name only what exists --------------------------------------------
SRC = Path(__file__).resolve().parent.parent / "src" / "airlock"
# Environment variables the source names that are not settings: the guest's own, a constant.
NOT_SETTINGS_IN_SRC = NOT_SETTINGS | {"AIRLOCK_OPEN_SOCKET", "AIRLOCK_INIT"}
# A dotted name that ends like this is a file (``agent.sock``), not a module attribute.
FILE_SUFFIXES = {"sock", "secret", "log", "json", "toml", "lease", "pid", "ext4", "img", "test"}
METHODS = "GET|POST|PUT|PATCH|DELETE|WS"
NOT_IMPORTABLE = ("airlock.store.migrations", "airlock.__main__")  # they run when imported


def _modules() -> list[tuple[str, str, str]]:
    """(dotted module name, its docstrings (the module's, its classes' and functions'),
    source) of every module of the package."""
    found = []
    for path in sorted(SRC.rglob("*.py")):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        source = path.read_text(encoding="utf-8")
        docs = [
            ast.get_docstring(node) or ""
            for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        ]
        found.append((name, "\n\n".join(docs), source))
    return found


def _lookup(parts: list[str]) -> bool:
    """Whether the longest importable prefix of ``parts`` has the rest as attributes."""
    for i in range(len(parts), 0, -1):
        name = ".".join(parts[:i])
        if name.startswith(NOT_IMPORTABLE):
            continue
        try:
            obj: object = importlib.import_module(name)
        except ImportError:
            continue
        for attr in parts[i:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def _resolves(dotted: str, module: str) -> bool:
    """``dotted`` from ``airlock`` or from the package of ``module`` that names it."""
    parts = dotted.split(".")
    if parts[0] == "airlock":
        return _lookup(parts)
    package = module.split(".")
    return any(_lookup([*package[:i], *parts]) for i in range(len(package), 0, -1))


def test_module_docstrings_name_modules_and_attributes_that_exist() -> None:
    """``services.viewers.ViewerRegistry``, ``rfb.MAX_CLIENT_MESSAGE``: a rename or a move
    that leaves a docstring behind fails here."""
    ours = {p.stem for p in SRC.iterdir()} | {"airlock"}
    subpackages = {p.parent.name for p in SRC.rglob("__init__.py")} | {
        p.stem for p in SRC.rglob("*.py")
    }
    stale = []
    for module, doc, _ in _modules():
        for dotted in re.findall(r"``([a-z_]\w*(?:\.[A-Za-z_]\w*)+)(?:\(\))?``", doc):
            head, last = dotted.split(".")[0], dotted.split(".")[-1]
            if head not in ours | subpackages or last in FILE_SUFFIXES:
                continue
            if not _resolves(dotted, module):
                stale.append(f"{module}: {dotted}")
    assert stale == []


def test_module_docstrings_call_functions_that_exist() -> None:
    """``host_checks()``, ``check()``: every function a docstring calls is defined in the
    package (anywhere: a docstring may name another module's) or is a system call's."""
    defined: set[str] = set()
    for _, _, source in _modules():
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                defined.add(node.name)
    stale = [
        f"{module}: {name}()"
        for module, doc, _ in _modules()
        for name in re.findall(r"``(?:[\w.]+\.)?(\w+)\([^`]*\)``", doc)
        if name not in defined and not any(hasattr(m, name) for m in (builtins, fcntl, os, Task))
    ]
    assert stale == []


def test_the_source_names_no_setting_that_does_not_exist() -> None:
    """An ``AIRLOCK_*`` name in a docstring, comment or message is a setting (or a pattern
    of settings, ``AIRLOCK_EGRESS_<PROVIDER>_POLICY``)."""
    known = {f"AIRLOCK_{name.upper()}" for name in Settings.model_fields}
    unknown = []
    for module, _, source in _modules():
        for match in re.finditer(r"\bAIRLOCK_[A-Z0-9_]*[A-Z0-9]", source):
            name = match.group()
            pattern = source[match.end() : match.end() + 2] in ("_<", "_*", "_{")
            if name in known | NOT_SETTINGS_IN_SRC:
                continue
            if pattern and any(k.startswith(name + "_") for k in known):
                continue
            unknown.append(f"{module}: {name}")
    assert unknown == []


def _served_paths() -> set[str]:
    from airlock.api.routes import ROUTERS

    return {re.sub(r"\{[^}]+\}", "{}", getattr(r, "path", "")) for rt in ROUTERS for r in rt.routes}


def test_module_docstrings_name_routes_that_are_served() -> None:
    """``GET /api/vms/{vmId}``, ``/api/auth``, and in ``api.routes`` a route's tail
    (``/novnc``): each is a served route, the tail of one, or a prefix of one."""
    served = _served_paths()
    missing = []
    for module, doc, _ in _modules():
        if module.startswith(("airlock.demo_idp", "airlock.runtimes.firecracker")):
            continue  # other servers' routes (the IdP's, Firecracker's API)
        relative = module.startswith("airlock.api.routes")
        for found in re.findall(rf"``(?:(?:{METHODS}) )?(/[^`\s]*)``", doc):
            path = re.sub(r"\{[^}]+\}", "{}", found.split("?")[0]).rstrip("/")
            if not (path.startswith(("/api", "/healthz", "/readyz", "/metrics")) or relative):
                continue
            if not any(p == path or p.endswith(path) or p.startswith(path + "/") for p in served):
                missing.append(f"{module}: {found}")
    assert missing == []


def test_no_module_docstring_says_a_served_route_is_not_served_yet() -> None:
    """The drift that started this test: ``routes/sessions.py`` said ``/novnc`` and ``/vnc``
    were "not served here yet" long after they were."""
    served = _served_paths()
    wrong = []
    for module, doc, _ in _modules():
        for sentence in re.split(r"(?<=[.;])\s+", doc):
            if not re.search(r"\bnot (?:served|implemented|supported)(?: here)? yet\b", sentence):
                continue
            for found in re.findall(
                r"``(?:(?:GET|POST|PUT|PATCH|DELETE|WS) )?(/[^`\s]*)``", sentence
            ):
                path = re.sub(r"\{[^}]+\}", "{}", found.split("?")[0]).rstrip("/")
                if any(p == path or p.endswith(path) for p in served):
                    wrong.append(f"{module}: {' '.join(sentence.split())}")
    assert wrong == []
