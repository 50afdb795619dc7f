"""The store on real SQLite and a real PostgreSQL, through the Alembic migrations."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import StatementError

from airlock.domain.vms import VmRole, VmState
from airlock.store.db import Database
from airlock.store.tables import Base, Vm

T0 = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)


@pytest.fixture
async def db(db_url: str) -> AsyncIterator[Database]:
    database = Database(db_url)
    await database.migrate()
    yield database
    await database.close()


def vm_row(vm_id: str, *, state: VmState = VmState.RUNNING, due: datetime | None = T0) -> Vm:
    return Vm(
        id=vm_id,
        role="browser",
        runtime="sandbox",
        user_id="alice",
        state=state.value,
        created_at=T0 - timedelta(minutes=1),
        updated_at=T0 - timedelta(minutes=1),
        destroy_after=due,
        destroy_attempts=0,
        warm=False,
        detail={},
    )


async def test_migrations_create_exactly_the_models(db: Database) -> None:
    await db.migrate()  # a second run is a no-op

    def diff(conn: Connection) -> list[object]:
        return list(compare_metadata(MigrationContext.configure(conn), Base.metadata))

    async with db.engine.connect() as conn:
        differences = await conn.run_sync(diff)
    assert differences == []


async def test_times_come_back_aware_utc(db: Database) -> None:
    async with db.transaction() as repo:
        repo.add_vm(vm_row("vm-a", due=T0.astimezone(ZoneInfo("Asia/Tokyo"))))
    async with db.transaction() as repo:
        vm = await repo.vm("vm-a")
    assert vm is not None and vm.destroy_after == T0
    assert vm.destroy_after.tzinfo is not None


async def test_naive_times_are_refused(db: Database) -> None:
    with pytest.raises(Exception, match="naive"):
        async with db.transaction() as repo:
            repo.add_vm(vm_row("vm-naive", due=datetime(2026, 1, 1)))
    async with db.transaction() as repo:
        assert await repo.vm("vm-naive") is None  # nothing half-written


async def test_due_rows_and_next_wakeup(db: Database) -> None:
    async with db.transaction() as repo:
        repo.add_vm(vm_row("vm-due", due=T0))
        repo.add_vm(vm_row("vm-later", due=T0 + timedelta(seconds=30)))
        repo.add_vm(vm_row("vm-cli", due=None))
        repo.add_vm(vm_row("vm-gone", state=VmState.DESTROYED, due=T0 - timedelta(hours=1)))
    async with db.transaction() as repo:
        due = await repo.due_vms(T0, 10)
        assert [v.id for v in due] == ["vm-due"]
        assert await repo.next_wakeup() == T0


async def test_ten_concurrent_claims_make_one_destroy(db: Database) -> None:
    """Invariant 3 in the store: racing claimers, one winner, on both databases."""
    async with db.transaction() as repo:
        repo.add_vm(vm_row("vm-race", due=T0))

    async def claim() -> bool:
        async with db.transaction() as repo:
            rows = await repo.due_vms(T0, 10)
            won = False
            for vm in rows:
                won = (
                    await repo.claim_destroy(
                        vm, now=T0, lease=timedelta(seconds=60), reason="grace_ended"
                    )
                    or won
                )
            return won

    results = await asyncio.gather(*(claim() for _ in range(10)))
    assert results.count(True) == 1
    async with db.transaction() as repo:
        vm = await repo.vm("vm-race")
        assert vm is not None and vm.state == VmState.DESTROYING.value
        assert vm.lease_until == T0 + timedelta(seconds=60)
        # While the lease holds nobody else may claim it; after it runs out, one may.
        assert await repo.due_vms(T0 + timedelta(seconds=59), 10) == []
        [again] = await repo.due_vms(T0 + timedelta(seconds=61), 10)
        assert await repo.claim_destroy(
            again, now=T0 + timedelta(seconds=61), lease=timedelta(seconds=60), reason=None
        )


async def test_conditional_moves_report_the_winner(db: Database) -> None:
    async with db.transaction() as repo:
        repo.add_vm(vm_row("vm-m"))
    async with db.transaction() as repo:
        assert await repo.move_vm("vm-m", [VmState.RUNNING], VmState.DRAINING, updated_at=T0)
        assert not await repo.move_vm("vm-m", [VmState.RUNNING], VmState.LOST, updated_at=T0)


async def test_a_node_sees_only_its_own_vms(db_url: str) -> None:
    """Several controllers on one database, one per host: a host's scheduler and
    reconciler never see another host's VMs as due or live."""
    here, there = Database(db_url, node="host-a"), Database(db_url, node="host-b")
    try:
        await here.migrate()
        async with here.transaction() as repo:
            repo.add_vm(vm_row("vm-here", due=T0))
        async with there.transaction() as repo:
            repo.add_vm(vm_row("vm-there", due=T0 - timedelta(seconds=5)))
        async with here.transaction() as repo:
            assert [v.id for v in await repo.due_vms(T0, 10)] == ["vm-here"]
            assert [v.id for v in await repo.live_vms()] == ["vm-here"]
            assert await repo.next_wakeup() == T0
            assert {v.id for v in await repo.vms()} == {"vm-here", "vm-there"}  # reads: all
        async with there.transaction() as repo:
            assert [v.id for v in await repo.due_vms(T0, 10)] == ["vm-there"]
    finally:
        await here.close()
        await there.close()


async def test_states_come_back_as_members_and_are_stored_as_their_values(db: Database) -> None:
    """``EnumText``: the columns stay plain strings with the same values (no migration);
    rows read back hold the enums' members; strings and members query alike."""
    async with db.transaction() as repo:
        repo.add_vm(vm_row("vm-e"))  # role and state given as strings, as older code does
    async with db.read() as repo:
        vm = await repo.vm("vm-e")
        by_string = [v.id for v in await repo.vms(states=["running"], role="browser")]
        by_member = [v.id for v in await repo.vms(states=[VmState.RUNNING], role=VmRole.BROWSER)]
    assert vm is not None
    assert vm.state is VmState.RUNNING and vm.role is VmRole.BROWSER
    assert vm.destroy_reason is None
    assert by_string == by_member == ["vm-e"]
    async with db.engine.connect() as conn:
        raw = (await conn.execute(text("SELECT role, state FROM vms WHERE id = 'vm-e'"))).one()
    assert tuple(raw) == ("browser", "running")
    assert type(raw[1]) is str


async def test_an_unknown_state_is_refused_before_it_is_stored(db: Database) -> None:
    row = vm_row("vm-x")
    row.state = "exploded"  # type: ignore[assignment]  # what a typo in older code would do
    with pytest.raises(StatementError, match="exploded"):
        async with db.transaction() as repo:
            repo.add_vm(row)
    async with db.read() as repo:
        assert await repo.vm("vm-x") is None
