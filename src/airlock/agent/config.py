"""What the agent was started with (``server.parse_args``). Standard library only."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(slots=True)
class Config:
    state_dir: Path
    role: str
    screen: tuple[int, int]
    home: Path
    run_dir: Path
    xvnc: str
    chromium: str
    egress_socket: Path
    single_process: bool = True  # Chromium's process model: see display.Display
