"""The guest agent's shape: what runs in a VM imports only the standard library and its own
modules (the image has python3-minimal and ``airlock/agent/``, nothing else), and the ops it
serves are the ops ``agent.protocol`` documents."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from pathlib import Path

import airlock.agent
from airlock.agent import protocol
from airlock.agent.config import Config
from airlock.agent.server import Agent

AGENT_DIR = Path(airlock.agent.__file__).parent
PYPROJECT = AGENT_DIR.parents[2] / "pyproject.toml"
HOST_SIDE = {"__init__", "client"}  # client.py is the controller's side of the protocol


def _guest_modules() -> set[str]:
    return {p.stem for p in AGENT_DIR.glob("*.py")} - HOST_SIDE


def test_every_guest_module_is_under_the_import_linter_contract() -> None:
    contracts = tomllib.loads(PYPROJECT.read_text())["tool"]["importlinter"]["contracts"]
    (guest,) = [c for c in contracts if c["name"].startswith("Guest modules")]
    assert set(guest["source_modules"]) == {f"airlock.agent.{m}" for m in _guest_modules()}
    assert "airlock.agent.client" in guest["forbidden_modules"]


def test_guest_modules_import_the_standard_library_and_each_other_only() -> None:
    guest = {f"airlock.agent.{m}" for m in _guest_modules()} | {"airlock.agent"}
    strays: list[str] = []
    for name in sorted(_guest_modules()):
        tree = ast.parse((AGENT_DIR / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imported = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                imported = [node.module]
            else:
                continue
            for module in imported:
                top = module.split(".")[0]
                if top in sys.stdlib_module_names or module in guest:
                    continue
                strays.append(f"{name}.py:{node.lineno} imports {module}")
    assert strays == []


def test_the_ops_served_are_the_ops_documented(tmp_path: Path) -> None:
    documented = set(re.findall(r"^- ``(\w+)", protocol.__doc__ or "", re.MULTILINE))
    config = Config(
        state_dir=tmp_path,
        role="browser",
        screen=(1280, 800),
        home=tmp_path / "home",
        run_dir=tmp_path / "run",
        xvnc="Xvnc",
        chromium="chromium",
        egress_socket=tmp_path / "egress.sock",
    )
    served = set(Agent(config).ops) | {"connect"}  # connect turns the stream into a pipe
    assert served == documented
