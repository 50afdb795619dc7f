"""The login a VM runs and the watcher that captures its credential files. Standard library
only."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from airlock.agent.oparg import home_path

log = logging.getLogger("airlock.agent")

MAX_CAPTURE_FILE = 1024 * 1024
POLL_S = 0.15  # capture poll period: a file must look the same on two polls this far apart


@dataclass(slots=True)
class Login:
    """The one login this VM runs, and what it has captured so far."""

    provider: str
    proc: asyncio.subprocess.Process
    watch: list[str]
    captured: dict[str, bytes] | None = None
    captured_event: asyncio.Event = field(default_factory=asyncio.Event)


def _snapshot(home: Path, login: Login) -> dict[str, tuple[int, int]] | None:
    """(size, mtime) of every watched file, or None until they all exist."""
    snap: dict[str, tuple[int, int]] = {}
    for rel in login.watch:
        try:
            st = os.stat(home_path(home, rel))
        except (FileNotFoundError, NotADirectoryError):
            return None
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_CAPTURE_FILE:
            return None
        snap[rel] = (st.st_size, st.st_mtime_ns)
    return snap


def _read_capture(home: Path, login: Login) -> dict[str, bytes] | None:
    files: dict[str, bytes] = {}
    for rel in login.watch:
        try:
            data = home_path(home, rel).read_bytes()
            json.loads(data)
        except (OSError, ValueError):
            return None  # not there any more, or not (yet) complete JSON
        files[rel] = data
    return files


async def watch(home: Path, login: Login) -> None:
    """Poll until every watched file exists, parses, and looked the same last poll."""
    previous: dict[str, tuple[int, int]] | None = None
    while login.captured is None:
        snap = _snapshot(home, login)
        if snap is not None and snap == previous:
            files = _read_capture(home, login)
            if files is not None and _snapshot(home, login) == snap:
                login.captured = files
                login.captured_event.set()
                log.info("captured %d file(s) for %s", len(files), login.provider)
                return
        previous = snap
        await asyncio.sleep(POLL_S)
