"""The minimal guest image for the qemu tests: built once per machine (about a minute and
a half, cold) into the same content-addressed cache ``airlock image build`` uses, and reused
by every later run until the agent or the image code changes. Not memoised: the key
follows the working tree, so an edit to the agent between two tests builds a new image
instead of booting a stale agent."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from airlock.images import Image, build_image
from airlock.settings import Settings

NEEDS = ("qemu-system-x86_64", "qemu-img", "mmdebstrap", "mke2fs")


def image_dir() -> Path:
    return Settings(_env_file=None).image_dir


def _skip_without_qemu() -> None:
    missing = [b for b in NEEDS if not shutil.which(b)]
    if missing:
        pytest.skip(f"needs {', '.join(missing)}: scripts/setup.sh --with-qemu installs them")


def minimal_image() -> Image:
    _skip_without_qemu()
    return build_image(image_dir(), "minimal")


def cli_image() -> Image:
    """The cli image (minimal plus the host's Node.js and vendor CLIs): about two and a half
    minutes cold, cached like the minimal one."""
    _skip_without_qemu()
    return build_image(image_dir(), "cli")
