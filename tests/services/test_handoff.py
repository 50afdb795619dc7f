"""The handoff with real parts: real sandboxes (browser VM and CLI VMs), the real vendor CLIs
from npm (scripts/setup.sh), the real guest agent and vault.

For each vendor: the vendor's own login runs in the browser VM; the test plays its last
step (the credential file, in the vendor's format, with test tokens: no vendor server is
reachable); the controller captures, normalises, stores, wipes, injects into the CLI VM, and
the CLI itself, run inside that VM, reports logged in. Vendor tests run on SQLite only: the
database plays no part the oauth2 tests below do not already cover on PostgreSQL.
"""

from __future__ import annotations

import json
import logging
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from airlock.agent.client import AgentClient
from airlock.domain.sessions import SessionStatus
from airlock.domain.vms import VmState
from airlock.errors import Conflict
from airlock.providers import claude_code, codex, gemini_cli
from airlock.providers.oauth2 import TOKENS_PATH
from airlock.services.core import Core
from airlock.store.tables import Credential
from tests.lifecycle_helpers import ACCESS_TOKEN, REFRESH_TOKEN, finish_login, wait_for
from tests.providers.vendor_files import (
    CLAUDE_ACCESS,
    CLAUDE_REFRESH,
    CODEX_REFRESH,
    GEMINI_ACCESS,
    GEMINI_REFRESH,
    claude_file,
    codex_file,
    gemini_file,
)
from tests.services.conftest import CoreFactory

pytestmark = pytest.mark.sandbox

SECRETS = (
    CLAUDE_ACCESS,
    CLAUDE_REFRESH,
    CODEX_REFRESH,
    GEMINI_ACCESS,
    GEMINI_REFRESH,
    ACCESS_TOKEN,
    REFRESH_TOKEN,
)
VENDORS: dict[str, tuple[str, Callable[[], bytes], str, str | None]] = {
    # provider id: (file it writes, the file, companion settings, where its login URL goes)
    "claude_code": (
        claude_code.CREDENTIALS_PATH,
        claude_file,
        claude_code.CONFIG_PATH,
        "https://claude.com/cai/oauth/authorize",
    ),
    "codex": (codex.AUTH_PATH, codex_file, codex.CONFIG_PATH, "https://auth.openai.com/oauth/"),
    "gemini_cli": (
        gemini_cli.CREDS_PATH,
        gemini_file,
        gemini_cli.SETTINGS_PATH,
        None,  # offline, its interactive start never reached the browser (gemini_cli.py)
    ),
}


def cli_home(core: Core, vm_id: str) -> Path:
    """The CLI VM's home as the host sees it (the sandbox binds it from its state dir)."""
    return core.settings.vms_dir / vm_id / "home"


async def wait_status(core: Core, session_id: str, status: SessionStatus) -> None:
    async def reached() -> bool:
        session, _ = await core.sessions.get(session_id, None)
        if SessionStatus(session.status).terminal and session.status != status.value:
            raise AssertionError(f"session ended {session.status}: {session.failure_reason}")
        return session.status == status.value

    await wait_for(reached, timeout=30)


async def wait_injected(core: Core, session_id: str, timeout: float) -> Credential:
    """Until the credentials row says injected; fails at once, with the reason, when the
    session failed or the handoff did."""

    async def done() -> bool:
        session, _ = await core.sessions.get(session_id, None)
        if session.status == SessionStatus.FAILED.value:
            raise AssertionError(f"session failed: {session.failure_reason}")
        cred = await core.sessions.credential(session_id)
        if cred is not None and cred.injected_at is not None:
            return True
        failed = [e.detail for e in await core.sessions.events(session)]
        failed = [d for d in failed if "error" in d]
        if failed:
            raise AssertionError(f"handoff failed: {failed}")
        return False

    await wait_for(done, timeout=timeout, interval=0.2)
    cred = await core.sessions.credential(session_id)
    assert cred is not None
    return cred


async def agent(core: Core, vm_id: str) -> AgentClient:
    return AgentClient(*await core.runtime.open_agent(vm_id))


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("provider_id", sorted(VENDORS))
async def test_vendor_login_is_captured_injected_and_the_cli_says_logged_in(
    make_core: CoreFactory, provider_id: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="airlock")
    path, make_file, companion, login_url = VENDORS[provider_id]
    core = await make_core(grace_success_ms=120_000, max_drain_ms=120_000)
    reason = core.providers[provider_id].available()
    assert reason is None, f"{reason} (run scripts/setup.sh)"
    cli = await core.vms.create_cli(user_id="alice", actor="test")
    session, browser = await core.sessions.start(
        user_id="alice", provider_id=provider_id, actor="test", cli_vm_id=cli.id
    )
    await wait_status(core, session.id, SessionStatus.AWAITING_USER)

    # The vendor's own login runs in the browser VM and hands its authorize URL to $BROWSER
    # (the VM's Chromium). Only then does the test play its last step, writing the file: a
    # starting `codex login` first logs out, deleting an auth.json it finds.
    content = make_file()
    a = await agent(core, browser.id)
    try:

        async def url_opened() -> bool:
            status = await a.login_status()
            assert status["state"] == "running", status
            return status["url"] is not None

        if login_url is not None:
            await wait_for(url_opened, timeout=60, interval=0.2)
            assert (await a.login_status())["url"].startswith(login_url)
        else:
            assert (await a.login_status())["state"] == "running"
        await a.write_files({path: content})
    finally:
        await a.close()

    cred = await wait_injected(core, session.id, timeout=150)
    events = await core.sessions.events(session)
    injected = [e for e in events if e.cause == "injected"]
    assert injected, [(e.cause, e.detail) for e in events]
    detail = injected[-1].detail
    assert cred.injected_vm_id == cli.id
    assert cred.injected_verified is True, detail
    print(f"{provider_id}: {detail['check']}: {detail['result']} in {detail['checkMs']} ms")

    # The vendor's file in the CLI VM: byte for byte, 0600, the VM user's; companion there.
    home = cli_home(core, cli.id)
    st = (home / path).stat()
    assert (home / path).read_bytes() == content
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert (home / companion).exists()

    # The browser VM's copy is gone (wiped at capture, before the handoff).
    a = await agent(core, browser.id)
    try:
        gone = await a.run(["/bin/sh", "-c", f'test -e "$HOME/{path}"'], timeout_s=10)
    finally:
        await a.close()
    assert gone.exit_code == 1

    # The session JSON's credentials.injected, and nothing secret in the logs.
    _, vm = await core.sessions.get(session.id, None)
    assert vm is not None
    for secret in SECRETS:
        assert secret not in caplog.text
        assert secret not in json.dumps([e.detail for e in events])
    await core.sessions.complete(session.id, None, "test")


async def capture_oauth2(core: Core, user: str, cli_vm_id: str | None = None) -> str:
    session, browser = await core.sessions.start(
        user_id=user, provider_id="oauth2", actor="test", cli_vm_id=cli_vm_id
    )
    await wait_status(core, session.id, SessionStatus.AWAITING_USER)
    await finish_login(core.runtime, browser.id)
    await wait_status(core, session.id, SessionStatus.COMPLETED)
    return session.id


async def test_oauth2_login_with_cli_vm_ends_with_the_tokens_in_that_vm(
    make_core: CoreFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="airlock")
    core = await make_core(grace_success_ms=120_000, max_drain_ms=120_000)
    cli = await core.vms.create_cli(user_id="alice", actor="test")
    session_id = await capture_oauth2(core, "alice", cli.id)
    cred = await wait_injected(core, session_id, timeout=30)
    assert cred.injected_vm_id == cli.id and cred.injected_verified is True

    tokens = cli_home(core, cli.id) / TOKENS_PATH
    assert stat.S_IMODE(tokens.stat().st_mode) == 0o600
    assert json.loads(tokens.read_bytes())["refresh_token"] == REFRESH_TOKEN

    _, browser = await core.sessions.get(session_id, None)
    assert browser is not None
    a = await agent(core, browser.id)
    try:
        gone = await a.run(["/bin/sh", "-c", f'test -e "$HOME/{TOKENS_PATH}"'], timeout_s=10)
    finally:
        await a.close()
    assert gone.exit_code == 1  # the browser VM's copy is gone
    for secret in (ACCESS_TOKEN, REFRESH_TOKEN):
        assert secret not in caplog.text
    await core.sessions.complete(session_id, None, "test")


async def test_a_later_vm_takes_the_login_from_the_first_and_a_dying_vm_gets_none(
    make_core: CoreFactory,
) -> None:
    """Injecting into a second VM moves the login (one holder): the first VM's file is gone.
    (This test said before that both VMs held it, with a notice that one may be logged out.)"""
    core = await make_core()
    session_id = await capture_oauth2(core, "bob")
    first = await core.vms.create_cli(user_id="bob", actor="test")
    second = await core.vms.create_cli(user_id="bob", actor="test")
    dying = await core.vms.create_cli(user_id="bob", actor="test")

    one = await core.handoff.inject_latest(
        vm_id=first.id, user_id="bob", provider_id="oauth2", actor="test"
    )
    assert one.verified and one.session_id == session_id and one.notice is None
    two = await core.handoff.inject_latest(
        vm_id=second.id, user_id="bob", provider_id="oauth2", actor="test"
    )
    assert two.verified and two.moved_from == first.id
    assert two.other_holders == [] and two.notice is None
    assert not (cli_home(core, first.id) / TOKENS_PATH).exists()
    assert (cli_home(core, second.id) / TOKENS_PATH).exists()

    # Another user's VM is not found; nothing is written there.
    with pytest.raises(Exception, match="no CLI VM") as info:
        await core.handoff.inject_latest(
            vm_id=first.id, user_id="carol", provider_id="oauth2", actor="test"
        )
    assert getattr(info.value, "status", None) == 404

    # A VM the scheduler is destroying: a clear refusal, recorded, nothing written.
    async with core.db.transaction() as repo:
        assert await repo.set_vm(dying.id, [VmState.RUNNING], state=VmState.DESTROYING.value)
    with pytest.raises(Conflict, match="is being destroyed"):
        await core.handoff.inject_latest(
            vm_id=dying.id, user_id="bob", provider_id="oauth2", actor="test"
        )
    assert not (cli_home(core, dying.id) / TOKENS_PATH).exists()
    cred = await core.sessions.credential(session_id)
    assert cred is not None and cred.injected_vm_id == second.id
    session, _ = await core.sessions.get(session_id, None)
    causes = [(e.cause, e.vm_id) for e in await core.sessions.events(session)]
    assert ("injection_failed", dying.id) in causes

    # A VM that is gone for good.
    await core.vms.delete(first.id, user_id="bob", actor="test")
    with pytest.raises(Conflict, match="not injected"):
        await core.handoff.inject_latest(
            vm_id=first.id, user_id="bob", provider_id="oauth2", actor="test"
        )
