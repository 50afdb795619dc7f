"""Chromium's managed policy: written where a microVM's Chromium reads it, or laid over a
copy of the host's ``/etc/chromium`` for a sandbox (whose ``/etc`` is read-only)."""

from __future__ import annotations

import json
from pathlib import Path

from airlock.agent import chromium_policy


def test_install_writes_the_policy_once(tmp_path: Path) -> None:
    etc = tmp_path / "etc-chromium"
    assert chromium_policy.install(etc)
    path = etc / chromium_policy.POLICY_FILE
    policy = json.loads(path.read_text())
    assert policy["ComponentUpdatesEnabled"] is False
    assert policy["BrowserSignin"] == 0  # no ListAccounts
    before = path.stat().st_mtime_ns
    assert chromium_policy.install(etc)  # already there: not rewritten
    assert path.stat().st_mtime_ns == before


def test_install_where_it_cannot_write_says_so(tmp_path: Path) -> None:
    etc = tmp_path / "not-a-dir"
    etc.write_text("a file where /etc/chromium would be")  # even root cannot mkdir in it
    assert chromium_policy.install(etc) is False


def test_the_overlay_keeps_what_the_host_has(tmp_path: Path) -> None:
    host = tmp_path / "host-etc-chromium"
    host.mkdir()
    (host / "master_preferences").write_text('{"distribution": {}}')
    overlay = chromium_policy.etc_overlay(tmp_path / "overlay", source=host)
    assert (overlay / "master_preferences").read_text() == '{"distribution": {}}'
    assert json.loads((overlay / chromium_policy.POLICY_FILE).read_text()) == chromium_policy.POLICY
    # And a microVM's install() over that overlay finds it in place.
    assert chromium_policy.install(overlay)
