"""How an op fails (``OpError``) and the checks of its arguments. Standard library only."""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


class OpError(Exception):
    """An operation failed in a way the controller should see as ``{code, message}``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def rel_path(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value or "\0" in value:
        raise OpError("bad_request", f"{what} must be a non-empty path")
    return value


def str_list(value: Any, what: str, *, allow_empty: bool = False) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise OpError("bad_request", f"{what} must be a list of strings")
    if not value and not allow_empty:
        raise OpError("bad_request", f"{what} must not be empty")
    return list(value)


def str_dict(value: Any, what: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise OpError("bad_request", f"{what} must map strings to strings")
    return dict(value)


def number(value: Any, what: str, default: float, maximum: float) -> float:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise OpError("bad_request", f"{what} must be a non-negative number")
    return min(float(value), maximum)


def home_path(home: Path, rel: str) -> Path:
    """A watched path: relative to $HOME and staying inside it."""
    p = Path(rel)
    if p.is_absolute():
        raise OpError("bad_request", f"watched path {rel!r} must be relative to home")
    full = Path(os.path.normpath(home / p))
    if full == home or home not in full.parents:
        raise OpError("bad_request", f"watched path {rel!r} leaves home")
    return full


def target_path(home: Path, value: str) -> Path:
    """A path to write or wipe: absolute as given, else relative to $HOME."""
    p = Path(value)
    return Path(os.path.normpath(p if p.is_absolute() else home / p))


FilePlan = list[tuple[str, Path, bytes, int]]  # (path as given, where it goes, content, mode)


def file_plan(value: Any, where: Callable[[str], Path]) -> FilePlan:
    """The ``files`` of a ``write_files`` op, every one checked before any is written (a bad
    one must not leave the others half written)."""
    if not isinstance(value, list):
        raise OpError("bad_request", "files must be a list")
    plan: FilePlan = []
    for item in value:
        if not isinstance(item, dict):
            raise OpError("bad_request", "each file must be an object")
        path = rel_path(item.get("path"), "path")
        try:
            content = base64.b64decode(item.get("content_b64", ""), validate=True)
        except (binascii.Error, TypeError, ValueError):
            raise OpError("bad_request", f"content_b64 of {path} is not base64") from None
        mode = item.get("mode", 0o600)
        if isinstance(mode, bool) or not isinstance(mode, int) or not 0 <= mode <= 0o7777:
            raise OpError("bad_request", f"mode of {path} must be an int in 0..0o7777")
        plan.append((path, where(path), content, mode))
    return plan


def run_args(
    message: dict[str, Any], max_timeout_s: float
) -> tuple[list[str], float, dict[str, str]]:
    """A ``run`` op's argv, its timeout (30 s unless given) and the environment it adds."""
    argv = str_list(message.get("argv"), "argv")
    timeout = number(message.get("timeout_s"), "timeout_s", 30.0, max_timeout_s)
    return argv, timeout, str_dict(message.get("env"), "env")
