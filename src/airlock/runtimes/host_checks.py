"""What a runtime needs of this host, as rows ``airlock doctor`` shows: each runtime module
answers ``host_checks()`` for its own needs (binaries, KVM, containment), so the doctor asks
the runtimes instead of knowing them. ``Runtime.check()`` stays the short list of problems
that stop a configured runtime; these rows also say what is fine and how to fix the rest.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass


@dataclass(frozen=True)
class HostCheck:
    """One row. ``needed``: the runtime cannot work without it (pasta, or KVM for qemu,
    which falls back to TCG, are not)."""

    name: str
    ok: bool
    needed: bool
    detail: str
    fix: str | None = None


def binary(
    name: str, candidates: tuple[str, ...], package: str, *, needed: bool, why: str
) -> HostCheck:
    """Whether one of ``candidates`` is on PATH; the fix names the package to install."""
    for candidate in candidates:
        if found := shutil.which(candidate):
            return HostCheck(name, True, needed, found)
    return HostCheck(name, False, needed, f"not found ({why})", f"apt-get install {package}")
