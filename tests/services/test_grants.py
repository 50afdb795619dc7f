"""A login has exactly one holder, with real parts: real sandboxes (browser VM, CLI VMs), the
real guest agent, the real vault, SQLite and PostgreSQL, and the real demo IdP on a loopback
port, whose refresh tokens rotate with reuse detection and which counts every rotated
refresh token presented again (``tests/idp_live.py``).

A VM "refreshes" by running the ``oauth2`` refresher in it (``agent.oauth2_refresh``, what a
vendor CLI does: new tokens from the token endpoint through the VM's egress proxy, the token
file rewritten). The IdP's reuse counter must stay 0: a reuse is a copy the controller let
live in two places.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Iterator
from datetime import timedelta

import pytest

from airlock.domain.grants import MoveOutcome
from airlock.domain.sessions import SessionStatus
from airlock.domain.vms import VmState
from airlock.providers.oauth2 import TOKENS_PATH, OAuth2Provider
from airlock.services.core import Core
from airlock.services.grants import HolderUnreachable
from airlock.store.tables import Event, Grant
from tests.idp_live import LiveIdp, grant_of, live_idp
from tests.lifecycle_helpers import finish_login, wait_for
from tests.providers.vendor_files import (
    CLAUDE_REFRESH,
    CODEX_REFRESH,
    GEMINI_REFRESH,
    claude_file,
    codex_file,
    gemini_file,
)
from tests.services.conftest import CoreFactory
from tests.services.test_handoff import VENDORS, agent, cli_home, wait_injected, wait_status

pytestmark = pytest.mark.sandbox

REFRESHED_REFRESH = "test-refresh-token-after-a-refresh-9f8e"


@pytest.fixture
def idp() -> Iterator[LiveIdp]:
    with live_idp(refresh_ttl=3 * 24 * 3600) as server:
        yield server


async def token_file(core: Core, vm_id: str) -> bytes | None:
    """The login's token file in a VM, read from inside it; None when there is none."""
    a = await agent(core, vm_id)
    try:
        r = await a.run(["/bin/sh", "-c", f'cat "$HOME/{TOKENS_PATH}"'], timeout_s=20)
    finally:
        await a.close()
    return r.stdout.encode() if r.exit_code == 0 else None


async def refresh_in(core: Core, vm_id: str) -> bytes:
    """The CLI in ``vm_id`` refreshes (the refresher, in the VM); its new token file."""
    provider = core.providers["oauth2"]
    assert isinstance(provider, OAuth2Provider)
    a = await agent(core, vm_id)
    try:
        r = await a.run(provider.refresh_argv(), timeout_s=60)
    finally:
        await a.close()
    report = json.loads(r.stdout.strip().splitlines()[-1]) if r.stdout.strip() else {}
    assert (r.exit_code, report.get("result")) == (0, "refreshed"), (r.stdout, r.stderr[-2000:])
    fresh = await token_file(core, vm_id)
    assert fresh is not None
    return fresh


def counters(idp: LiveIdp, tokens: bytes) -> dict[str, object]:
    """The IdP's counters for the login ``tokens`` belong to."""
    return idp.grants()[grant_of(tokens)]


def no_reuse(idp: LiveIdp, tokens: bytes, accepted: int) -> None:
    seen = counters(idp, tokens)
    assert seen["reusedRefreshTokens"] == 0 and seen["refreshesRefused"] == 0, seen
    assert seen["revoked"] is False and seen["refreshesAccepted"] == accepted, seen


async def login(
    core: Core, idp: LiveIdp, user: str, cli_vm_id: str | None = None
) -> tuple[str, bytes]:
    """A real login at the IdP, its last step played in the browser VM: the session id and
    the token file the login wrote."""
    session, browser = await core.sessions.start(
        user_id=user, provider_id="oauth2", actor="test", cli_vm_id=cli_vm_id
    )
    await wait_status(core, session.id, SessionStatus.AWAITING_USER)
    tokens = json.dumps(idp.sign_in()).encode()
    await finish_login(core.runtime, browser.id, tokens)
    await wait_status(core, session.id, SessionStatus.COMPLETED)
    return session.id, tokens


async def the_login(core: Core, user: str) -> Grant:
    async with core.db.read() as repo:
        grants = await repo.grants(user_id=user, provider="oauth2")
    assert len(grants) == 1, grants
    return grants[0]


async def vault_file(core: Core, user: str) -> bytes:
    assert core.grants is not None
    creds = await core.grants.current(await the_login(core, user))
    return creds.raw[TOKENS_PATH]


async def login_events(core: Core, grant: Grant) -> list[Event]:
    session, _ = await core.sessions.get(grant.session_id or "", None)
    return [
        e
        for e in await core.sessions.events(session)
        if e.kind == "credential" and e.detail.get("grantId") == grant.id
    ]


async def test_the_login_moves_vm1_vm2_vault_vm3_and_the_idp_never_sees_a_reused_token(
    make_core: CoreFactory, idp: LiveIdp, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="airlock")
    core = await make_core(demo_idp_port=idp.port, grace_success_ms=120_000, max_drain_ms=120_000)
    vm1 = await core.vms.create_cli(user_id="alice", actor="test")
    vm2 = await core.vms.create_cli(user_id="alice", actor="test")

    # Login with cliVmId = VM1; VM1's CLI refreshes twice.
    session_id, tokens = await login(core, idp, "alice", vm1.id)
    await wait_injected(core, session_id, timeout=60)
    grant = await the_login(core, "alice")
    assert grant.holder_vm_id == vm1.id and grant.account == "demo@airlock.test"
    files = [tokens, await refresh_in(core, vm1.id)]
    latest = await refresh_in(core, vm1.id)
    files.append(latest)

    # Move to VM2: the controller takes VM1's newest file (not the vault's stale capture).
    started = time.monotonic()
    moved = await core.handoff.inject_latest(
        vm_id=vm2.id, user_id="alice", provider_id="oauth2", actor="test"
    )
    print(f"move VM1 -> VM2: {(time.monotonic() - started) * 1000:.0f} ms")
    assert moved.verified and moved.moved_from == vm1.id and moved.other_holders == []
    assert moved.version == 2  # the capture, then what the move took from VM1
    assert await token_file(core, vm2.id) == latest
    assert await token_file(core, vm1.id) is None  # VM1 can no longer refresh
    latest = await refresh_in(core, vm2.id)  # the IdP accepts VM2's refresh
    files.append(latest)

    # Destroy VM2: the vault takes VM2's latest token first.
    await core.vms.delete(vm2.id, user_id="alice", actor="test")
    grant = await the_login(core, "alice")
    assert grant.holder_vm_id is None
    assert await vault_file(core, "alice") == latest
    # The opt-in export for service tokens gives that newest version, not the capture's.
    session, _ = await core.sessions.get(session_id, None)
    cred = await core.sessions.credential(session_id)
    assert cred is not None
    exported = await core.sessions.export_secret(
        session, cred, actor="service:test", is_service=True, export_enabled=True
    )
    assert exported["refreshToken"] == json.loads(latest)["refresh_token"]

    # Inject into a new VM3: it refreshes, and the IdP accepts.
    vm3 = await core.vms.create_cli(user_id="alice", actor="test")
    third = await core.handoff.inject_latest(
        vm_id=vm3.id, user_id="alice", provider_id="oauth2", actor="test"
    )
    assert third.verified and third.moved_from is None
    assert await token_file(core, vm3.id) == latest
    files.append(await refresh_in(core, vm3.id))

    no_reuse(idp, tokens, accepted=4)
    # The event log tells the story; no refresh token anywhere in events or logs.
    events = await login_events(core, grant)
    moves = [(e.detail["from"], e.detail["to"]) for e in events if e.cause == "injected"]
    assert moves == [(None, vm1.id), (vm1.id, vm2.id), (None, vm3.id)]
    assert [e.vm_id for e in events if e.cause == "returned"] == [vm2.id]
    dumped = json.dumps([e.detail for e in events])
    for token in (json.loads(f)["refresh_token"] for f in files):
        assert token not in dumped and token not in caplog.text
    # Every superseded version is kept (metadata) but the newest is the only one needed.
    async with core.db.read() as repo:
        versions = await repo.grant_versions([grant.id])
    assert [(v.version, v.source) for v in versions] == [
        (1, "capture"),
        (2, "move"),
        (3, "sync"),
    ]
    assert [v.superseded_at is None for v in versions] == [False, False, True]
    await core.vms.delete(vm1.id, user_id="alice", actor="test")
    await core.vms.delete(vm3.id, user_id="alice", actor="test")


async def test_fifty_concurrent_moves_through_two_controllers_end_with_one_holder(
    make_core: CoreFactory, idp: LiveIdp
) -> None:
    core = await make_core(demo_idp_port=idp.port)
    # A second controller of the same host and database.
    other = await make_core(demo_idp_port=idp.port, start=False)
    _, tokens = await login(core, idp, "bob")
    vms = [(await core.vms.create_cli(user_id="bob", actor="test")).id for _ in range(3)]
    pick = random.Random(12)
    targets = [pick.choice(vms) for _ in range(50)]

    async def move(i: int, vm_id: str) -> MoveOutcome:
        controller = core if i % 2 else other
        done = await controller.handoff.inject_latest(
            vm_id=vm_id, user_id="bob", provider_id="oauth2", actor=f"mover-{i}"
        )
        assert done.verified
        return MoveOutcome.MOVED if done.moved_from else MoveOutcome.INJECTED

    # Meanwhile the CLI in every VM keeps refreshing whatever login it finds there (exit 5:
    # none). A copy left behind by a move, or a file written back over a newer one, would
    # show as a rotated refresh token presented again.
    provider = core.providers["oauth2"]
    assert isinstance(provider, OAuth2Provider)
    moving = True
    exits: list[int | None] = []

    async def cli_refreshing(vm_id: str) -> None:
        a = await agent(core, vm_id)
        try:
            while moving:
                exits.append((await a.run(provider.refresh_argv(), timeout_s=60)).exit_code)
        finally:
            await a.close()

    refreshers = [asyncio.create_task(cli_refreshing(vm)) for vm in vms]
    try:
        await asyncio.gather(*(move(i, vm) for i, vm in enumerate(targets)))
    finally:
        moving = False
        await asyncio.gather(*refreshers)
    refreshed = exits.count(0)
    assert set(exits) <= {0, 5} and refreshed >= 5, exits
    print(f"{refreshed} refreshes in the VMs during the 50 moves; {exits.count(5)} found none")

    grant = await the_login(core, "bob")
    holder = grant.holder_vm_id
    assert holder in vms
    holding = [vm for vm in vms if (cli_home(core, vm) / TOKENS_PATH).exists()]
    assert holding == [holder]
    assert core.grants is not None
    assert await core.grants.sync(grant.id, wait=True) in (None, grant.current_version + 1)
    assert await token_file(core, holder) == await vault_file(core, "bob")
    await refresh_in(core, holder)  # the one holder's token is the live one
    no_reuse(idp, tokens, accepted=refreshed + 1)

    # The event log tells every move, in an order that chains: each starts where the one
    # before it ended.
    events = [e for e in await login_events(core, grant) if e.cause == "injected"]
    assert len(events) == 50
    assert sorted(e.actor for e in events) == sorted(f"mover-{i}" for i in range(50))
    where: str | None = None
    for e in events:
        if e.detail["move"] == MoveOutcome.ALREADY_THERE.value:
            assert e.detail["to"] == where
        else:
            assert e.detail["from"] == where, [(x.detail["from"], x.detail["to"]) for x in events]
        where = e.detail["to"]
    assert where == holder
    async with core.db.read() as repo:
        row = await repo.grant(grant.id)
    assert row is not None and row.move_owner is None and row.move_lease_until is None


async def test_an_unreachable_holder_refuses_the_move_unless_forced(
    make_core: CoreFactory, idp: LiveIdp
) -> None:
    # The test stops VM1's agent, not the reconciler.
    core = await make_core(demo_idp_port=idp.port, reconcile_interval_ms=600_000)
    vm1 = await core.vms.create_cli(user_id="carol", actor="test")
    vm2 = await core.vms.create_cli(user_id="carol", actor="test")
    session_id, _ = await login(core, idp, "carol", vm1.id)
    await wait_injected(core, session_id, timeout=60)
    # VM1's agent dies (the runtime stops it behind the controller's back).
    await core.runtime.destroy(vm1.id)

    with pytest.raises(HolderUnreachable, match="force") as refused:
        await core.handoff.inject_latest(
            vm_id=vm2.id, user_id="carol", provider_id="oauth2", actor="test"
        )
    assert refused.value.status == 503 and refused.value.code == "holder_unreachable"
    grant = await the_login(core, "carol")
    assert grant.holder_vm_id == vm1.id  # nothing moved
    assert await token_file(core, vm2.id) is None

    forced = await core.handoff.inject_latest(
        vm_id=vm2.id, user_id="carol", provider_id="oauth2", actor="test", force=True
    )
    assert forced.verified and forced.moved_from == vm1.id
    assert forced.other_holders == [vm1.id]
    assert forced.notice is not None and "stale copy" in forced.notice
    assert (await the_login(core, "carol")).holder_vm_id == vm2.id
    causes = [e.cause for e in await login_events(core, grant)]
    assert "move_refused" in causes and "move_forced" in causes


async def test_a_lost_vm_hands_its_login_back_to_the_vault(
    make_core: CoreFactory, idp: LiveIdp
) -> None:
    core = await make_core(demo_idp_port=idp.port)
    vm1 = await core.vms.create_cli(user_id="dan", actor="test")
    session_id, tokens = await login(core, idp, "dan", vm1.id)
    await wait_injected(core, session_id, timeout=60)
    await core.runtime.destroy(vm1.id)  # vanishes: the reconciler marks it lost

    async def returned() -> bool:
        vm = await core.vms.get(vm1.id, None)
        return (
            vm.state == VmState.LOST.value and (await the_login(core, "dan")).holder_vm_id is None
        )

    await wait_for(returned, timeout=60, interval=0.2)
    vm2 = await core.vms.create_cli(user_id="dan", actor="test")
    again = await core.handoff.inject_latest(
        vm_id=vm2.id, user_id="dan", provider_id="oauth2", actor="test"
    )
    assert again.verified and again.moved_from is None
    await refresh_in(core, vm2.id)
    no_reuse(idp, tokens, accepted=1)


async def test_the_schedule_syncs_back_and_superseded_secrets_are_wiped(
    make_core: CoreFactory, idp: LiveIdp
) -> None:
    core = await make_core(
        demo_idp_port=idp.port, credential_sync_ms=300, credential_retention_ms=0
    )
    vm1 = await core.vms.create_cli(user_id="erin", actor="test")
    session_id, tokens = await login(core, idp, "erin", vm1.id)
    await wait_injected(core, session_id, timeout=60)
    latest = await refresh_in(core, vm1.id)

    async def synced() -> bool:
        return (await the_login(core, "erin")).current_version == 2

    await wait_for(synced, timeout=60, interval=0.2)
    assert await vault_file(core, "erin") == latest
    grant = await the_login(core, "erin")

    async def wiped() -> bool:
        async with core.db.read() as repo:
            first = await repo.grant_version(grant.id, 1)
            cred = await repo.credential_of_session(session_id)
        assert first is not None and cred is not None
        return first.ciphertext is None and first.wiped_at is not None and cred.ciphertext == b""

    await wait_for(wiped, timeout=60, interval=0.2)
    async with core.db.read() as repo:
        current = await repo.grant_version(grant.id, 2)
    assert current is not None and current.ciphertext and current.source == "sync"
    # Nothing changed since: another round seals nothing new.
    assert core.grants is not None
    await core.grants.sync_all()
    assert (await the_login(core, "erin")).current_version == 2
    no_reuse(idp, tokens, accepted=1)


async def test_a_new_login_of_the_same_account_replaces_the_old_in_place(
    make_core: CoreFactory, idp: LiveIdp
) -> None:
    core = await make_core(demo_idp_port=idp.port, grace_success_ms=120_000, max_drain_ms=120_000)
    vm1 = await core.vms.create_cli(user_id="fay", actor="test")
    vm2 = await core.vms.create_cli(user_id="fay", actor="test")
    first, _ = await login(core, idp, "fay", vm1.id)
    await wait_injected(core, first, timeout=60)
    old = await the_login(core, "fay")

    # Log in again for VM1: the new login replaces the old one there.
    second, _ = await login(core, idp, "fay", vm1.id)
    await wait_injected(core, second, timeout=60)
    new = await the_login(core, "fay")
    assert new.id != old.id and new.holder_vm_id == vm1.id
    assert await token_file(core, vm1.id) == await vault_file(core, "fay")
    async with core.db.read() as repo:
        gone = await repo.grant(old.id)
        old_versions = await repo.grant_versions([old.id])
    assert gone is not None and gone.superseded_by == new.id and gone.holder_vm_id is None
    assert all(v.ciphertext is None and v.wiped_at is not None for v in old_versions)

    # A third login started for VM2: VM1 gives the login up, VM2 has the new files.
    third, tokens = await login(core, idp, "fay", vm2.id)
    await wait_injected(core, third, timeout=60)
    newest = await the_login(core, "fay")
    assert newest.holder_vm_id == vm2.id
    assert await token_file(core, vm1.id) is None
    await refresh_in(core, vm2.id)
    no_reuse(idp, tokens, accepted=1)


REFRESHED = {
    # provider id: its file as the CLI rewrites it at a refresh (new tokens, new expiry)
    "claude_code": lambda: claude_file(
        accessToken="sk-ant-oat01-test-access-refreshed", refreshToken=REFRESHED_REFRESH
    ),
    "codex": lambda: codex_file(
        last_refresh="2026-12-01T22:00:00Z", refresh_token=REFRESHED_REFRESH
    ),
    "gemini_cli": lambda: gemini_file(
        access_token="ya29.test-access-refreshed", refresh_token=REFRESHED_REFRESH
    ),
}


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("provider_id", sorted(VENDORS))
async def test_vendor_login_moves_with_what_its_cli_refreshed(
    make_core: CoreFactory, provider_id: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The real CLIs' files: the test changes the file in VM1 as the CLI's refresh would;
    the move takes that version to VM2, where the CLI's own check passes, and VM1 holds
    nothing."""
    caplog.set_level(logging.DEBUG, logger="airlock")
    path, make_file, _, login_url = VENDORS[provider_id]
    core = await make_core(grace_success_ms=120_000, max_drain_ms=120_000)
    assert core.providers[provider_id].available() is None, "run scripts/setup.sh"
    vm1 = await core.vms.create_cli(user_id="gus", actor="test")
    vm2 = await core.vms.create_cli(user_id="gus", actor="test")
    session, browser = await core.sessions.start(
        user_id="gus", provider_id=provider_id, actor="test", cli_vm_id=vm1.id
    )
    await wait_status(core, session.id, SessionStatus.AWAITING_USER)
    a = await agent(core, browser.id)
    try:
        if login_url is not None:  # a starting `codex login` first deletes an auth.json

            async def url_opened() -> bool:
                return (await a.login_status())["url"] is not None

            await wait_for(url_opened, timeout=60, interval=0.2)
        await a.write_files({path: make_file()})
    finally:
        await a.close()
    cred = await wait_injected(core, session.id, timeout=150)
    assert cred.injected_vm_id == vm1.id and cred.injected_verified is True

    refreshed = REFRESHED[provider_id]()
    a = await agent(core, vm1.id)
    try:
        await a.write_files({path: refreshed})
    finally:
        await a.close()
    moved = await core.handoff.inject_latest(
        vm_id=vm2.id, user_id="gus", provider_id=provider_id, actor="test"
    )
    assert moved.moved_from == vm1.id and moved.version == 2
    assert moved.verified, moved.summary  # the CLI's own check, in VM2
    print(f"{provider_id}: moved; {moved.check}: {moved.summary}")
    assert (cli_home(core, vm2.id) / path).read_bytes() == refreshed
    assert not (cli_home(core, vm1.id) / path).exists()
    leftovers = [p.name for p in (cli_home(core, vm1.id) / path).parent.iterdir()]
    assert not [n for n in leftovers if "airlock-take" in n], leftovers
    assert core.grants is not None
    async with core.db.read() as repo:
        grant = (await repo.grants(user_id="gus", provider=provider_id))[0]
    assert (await core.grants.current(grant)).raw[path] == refreshed
    events = json.dumps([e.detail for e in await core.sessions.events(session)])
    for secret in (REFRESHED_REFRESH, CLAUDE_REFRESH, CODEX_REFRESH, GEMINI_REFRESH):
        assert secret not in caplog.text and secret not in events


async def test_a_move_that_died_half_way_is_taken_back_by_the_next(
    make_core: CoreFactory, idp: LiveIdp
) -> None:
    """A controller died after writing the login into its target but before recording it:
    the row still shows its lease (run out) and target. The next move takes that copy back
    first, so no second holder is left behind."""
    core = await make_core(demo_idp_port=idp.port)
    _, tokens = await login(core, idp, "hal")
    half, vm3 = [(await core.vms.create_cli(user_id="hal", actor="test")).id for _ in range(2)]
    grant = await the_login(core, "hal")
    written = await vault_file(core, "hal")
    a = await agent(core, half)
    try:
        await a.write_files({TOKENS_PATH: written})  # what the dead controller wrote
    finally:
        await a.close()
    now = core.clock.now()
    async with core.db.transaction() as repo:
        await repo.set_grant(
            grant.id,
            move_owner="dead-controller",
            move_lease_until=now - timedelta(seconds=1),
            move_target_vm_id=half,
        )
    latest = await refresh_in(core, half)  # and its CLI even refreshed since

    moved = await core.handoff.inject_latest(
        vm_id=vm3, user_id="hal", provider_id="oauth2", actor="test"
    )
    assert moved.verified and await token_file(core, half) is None
    assert await token_file(core, vm3) == latest
    causes = [e.cause for e in await login_events(core, grant)]
    assert "move_recovered" in causes
    await refresh_in(core, vm3)
    no_reuse(idp, tokens, accepted=2)
