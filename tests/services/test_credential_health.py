"""Logins' health with real parts: a real CLI VM (sandbox) holds a real demo IdP login; the
scheduled check runs the provider's check in that VM through its agent; the IdP revokes.

Runs on SQLite and PostgreSQL: the decision is recorded with a conditional update.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta

import pytest

from airlock.agent.client import AgentClient
from airlock.domain.grants import GrantState, version_context
from airlock.domain.sessions import SessionStatus
from airlock.providers import claude_code, codex
from airlock.providers.oauth2 import TOKENS_PATH
from airlock.services.core import Core
from airlock.services.credential_health import bus_key
from airlock.services.grant_records import credentials_body
from airlock.store.tables import Grant, GrantVersion
from tests.idp_live import LiveIdp, grant_of, live_idp
from tests.lifecycle_helpers import finish_login, wait_for
from tests.providers.vendor_files import claude_file, codex_file
from tests.services.conftest import CoreFactory
from tests.services.test_handoff import wait_injected, wait_status

pytestmark = pytest.mark.sandbox


@pytest.fixture
def idp() -> Iterator[LiveIdp]:
    with live_idp(refresh_ttl=30 * 24 * 3600) as server:
        yield server


async def login_into(core: Core, idp: LiveIdp, user: str, cli_vm_id: str) -> tuple[Grant, str]:
    """A real login of the demo user, captured in a browser VM and placed in the CLI VM:
    the grant and the IdP's id of it."""
    session, browser = await core.sessions.start(
        user_id=user, provider_id="oauth2", actor="test", cli_vm_id=cli_vm_id
    )
    await wait_status(core, session.id, SessionStatus.AWAITING_USER)
    tokens = idp.sign_in()
    await finish_login(core.runtime, browser.id, json.dumps(tokens).encode())
    await wait_status(core, session.id, SessionStatus.COMPLETED)
    await wait_injected(core, session.id, timeout=60)
    grant = await one_grant(core, user)
    assert grant.holder_vm_id == cli_vm_id
    return grant, grant_of(tokens)


async def one_grant(core: Core, user: str) -> Grant:
    async with core.db.read() as repo:
        [grant] = await repo.grants(user_id=user)
    return grant


async def test_a_revoked_login_is_revoked_after_one_check_and_stays_so(
    make_core: CoreFactory, idp: LiveIdp
) -> None:
    core = await make_core(demo_idp_port=idp.port, credential_check_ms=0)
    cli = await core.vms.create_cli(user_id="alice", actor="test")
    grant, sid = await login_into(core, idp, "alice", cli.id)

    assert await core.health.check_all() == []  # active, checked: nothing changed
    checked = await one_grant(core, "alice")
    assert checked.state == GrantState.ACTIVE.value and checked.last_checked_at is not None
    assert checked.refresh_expires_at is not None  # from the token response's lifetime
    assert idp.grants()[sid]["refreshesAccepted"] == 0  # the check used nothing up

    idp.revoke(sid)
    seen = core.bus.version(bus_key("alice"))
    stream = asyncio.create_task(core.bus.wait(bus_key("alice"), seen, 60))  # an SSE stream
    [change] = await core.health.check_all()
    assert (change.old, change.new) == (GrantState.ACTIVE, GrantState.REVOKED)
    assert await asyncio.wait_for(stream, 10) != seen  # it woke, well before its timeout
    revoked = await one_grant(core, "alice")
    assert revoked.state == GrantState.REVOKED.value
    assert revoked.state_reason and "revoked" in revoked.state_reason
    session, _ = await core.sessions.get(grant.session_id or "", None)
    timeline = [
        (e.kind, e.from_state, e.to_state, e.cause) for e in await core.sessions.events(session)
    ]
    assert ("grant", "active", "revoked", "health_check") in timeline
    assert await core.health.check_all() == []  # stays revoked, no second event
    assert idp.grants()[sid]["reusedRefreshTokens"] == 0


async def test_the_schedule_finds_a_revocation_within_one_period(
    make_core: CoreFactory, idp: LiveIdp
) -> None:
    period_ms = 2000
    core = await make_core(demo_idp_port=idp.port, credential_check_ms=period_ms)
    cli = await core.vms.create_cli(user_id="bob", actor="test")
    _, sid = await login_into(core, idp, "bob", cli.id)
    idp.revoke(sid)
    revoked_at = time.monotonic()

    async def revoked() -> bool:
        return (await one_grant(core, "bob")).state == GrantState.REVOKED.value

    # One period, plus one check's run in the VM (a loaded machine: its own allowance).
    await wait_for(revoked, timeout=period_ms / 1000 + 30, interval=0.1)
    print(f"revoked seen {time.monotonic() - revoked_at:.2f} s after the IdP revoked it")


async def test_a_holder_without_the_files_needs_login_and_a_found_login_is_active_again(
    make_core: CoreFactory, idp: LiveIdp
) -> None:
    core = await make_core(demo_idp_port=idp.port, credential_check_ms=0)
    cli = await core.vms.create_cli(user_id="carol", actor="test")
    await login_into(core, idp, "carol", cli.id)
    home = core.settings.vms_dir / cli.id / "home"
    saved = (home / TOKENS_PATH).read_bytes()
    agent = AgentClient(*await core.runtime.open_agent(cli.id))
    try:
        assert (await agent.run(["rm", TOKENS_PATH], timeout_s=10)).exit_code == 0
        [change] = await core.health.check_all()
        assert change.new is GrantState.NEEDS_LOGIN
        assert await core.health.check_all() == []
        await agent.write_files({TOKENS_PATH: saved})
    finally:
        await agent.close()
    [change] = await core.health.check_all()
    assert (change.old, change.new) == (GrantState.NEEDS_LOGIN, GrantState.ACTIVE)


async def test_a_refresh_token_near_its_end_is_expiring(make_core: CoreFactory) -> None:
    with live_idp(refresh_ttl=2 * 24 * 3600) as idp:
        core = await make_core(demo_idp_port=idp.port, credential_check_ms=0)
        cli = await core.vms.create_cli(user_id="dave", actor="test")
        await login_into(core, idp, "dave", cli.id)
        [change] = await core.health.check_all()  # the 7-day window covers its 2 days
        assert change.new is GrantState.EXPIRING
        assert "refresh token ends" in change.reason


VENDOR_CHECKS: dict[str, tuple[str, Callable[[], bytes]]] = {
    # provider: (its file, the file in the vendor's format)
    "claude_code": (claude_code.CREDENTIALS_PATH, claude_file),
    "codex": (codex.AUTH_PATH, codex_file),
}


def active_grant(
    grant_id: str, user: str, provider_id: str, *, holder: str | None, now: datetime
) -> Grant:
    """A login's row at version 1, ``active``, held by ``holder`` (None: the vault)."""
    return Grant(
        id=grant_id,
        user_id=user,
        provider=provider_id,
        account="",
        holder_vm_id=holder,
        state=GrantState.ACTIVE.value,
        current_version=1,
        created_at=now,
        updated_at=now,
    )


async def hold(core: Core, user: str, provider_id: str, files: dict[str, bytes], vm_id: str) -> str:
    """A login of ``provider_id`` held by ``vm_id``, as a move leaves it: its files sealed
    as the newest version in the vault, and written into the VM."""
    provider = core.providers[provider_id]
    creds = provider.normalise(files, now=core.clock.now())
    assert core.vault is not None
    grant_id = f"g-{provider_id}-{user}"
    sealed = core.vault.seal(
        credentials_body(creds),
        context=version_context(
            grant_id=grant_id, version=1, provider=provider_id, source="move", session_id=None
        ),
    )
    now = core.clock.now()
    async with core.db.transaction() as repo:
        repo.add_grant(active_grant(grant_id, user, provider_id, holder=vm_id, now=now))
        await repo.session.flush()
        repo.add_grant_version(
            GrantVersion(
                grant_id=grant_id,
                version=1,
                source="move",
                vm_id=vm_id,
                key_id=sealed.key_id,
                nonce=sealed.nonce,
                ciphertext=sealed.ciphertext,
                created_at=now,
            )
        )
    agent = AgentClient(*await core.runtime.open_agent(vm_id))
    try:
        await agent.write_files(files)
    finally:
        await agent.close()
    return grant_id


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("provider_id", sorted(VENDOR_CHECKS))
async def test_the_vendor_clis_own_status_check_runs_in_the_holder_vm(
    make_core: CoreFactory, provider_id: str
) -> None:
    """The real CLI (from npm) says logged in: active and checked; its file gone from the
    VM: it says logged out, and the login needs one."""
    core = await make_core(credential_check_ms=0)
    assert core.providers[provider_id].available() is None, "run scripts/setup.sh"
    path, make_file = VENDOR_CHECKS[provider_id]
    cli = await core.vms.create_cli(user_id="erin", actor="test")
    await hold(core, "erin", provider_id, {path: make_file()}, cli.id)
    assert await core.health.check_all() == []
    grant = await one_grant(core, "erin")
    assert grant.last_checked_at is not None and grant.state == GrantState.ACTIVE.value
    agent = AgentClient(*await core.runtime.open_agent(cli.id))
    try:
        assert (await agent.run(["rm", path], timeout_s=10)).exit_code == 0
    finally:
        await agent.close()
    [change] = await core.health.check_all()
    assert change.new is GrantState.NEEDS_LOGIN, change
    print(f"{provider_id}: {change.reason}")


async def test_a_login_whose_files_are_on_their_way_is_not_judged(
    make_core: CoreFactory, idp: LiveIdp
) -> None:
    """A move has taken the files from the holder and not yet written them elsewhere (its
    lease is held): the holder has no file, and that is not a logged-out CLI."""
    core = await make_core(demo_idp_port=idp.port, credential_check_ms=0)
    cli = await core.vms.create_cli(user_id="fay", actor="test")
    grant, _ = await login_into(core, idp, "fay", cli.id)
    now = core.clock.now()
    async with core.db.transaction() as repo:
        assert await repo.grant(grant.id, lock=True) is not None
        assert await repo.claim_move(
            grant.id, owner="a-move", now=now, until=now + timedelta(minutes=2), target=None
        )
    agent = AgentClient(*await core.runtime.open_agent(cli.id))
    try:
        assert (await agent.run(["rm", TOKENS_PATH], timeout_s=10)).exit_code == 0
    finally:
        await agent.close()
    assert await core.health.check_all() == []
    assert (await one_grant(core, "fay")).state == GrantState.ACTIVE.value


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
async def test_a_login_whose_check_fails_leaves_the_others_judged_and_nothing_running(
    make_core: CoreFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One login's check raises (its VM's agent broke, say) while another's is still going:
    the round goes on to judge the other and ends with no check running. A gather let the
    first exception end the round at once, with the other check left running past it."""
    core = await make_core(credential_check_ms=0)
    now = core.clock.now()
    async with core.db.transaction() as repo:
        for grant_id in ("g-fails", "g-slow"):
            repo.add_grant(active_grant(grant_id, "erin", "oauth2", holder=None, now=now))
    running: set[str] = set()
    judged: list[str] = []

    async def check_one(grant: Grant, version: object, vm: object) -> None:
        running.add(grant.id)
        try:
            if grant.id == "g-fails":
                raise RuntimeError("the holder's agent broke")
            await asyncio.sleep(0.2)  # a check that takes a moment (its VM's CLI runs)
            judged.append(grant.id)
        finally:
            running.discard(grant.id)

    monkeypatch.setattr(core.health, "_check_one", check_one)
    assert await core.health.check_all() == []
    assert judged == ["g-slow"] and running == set()
