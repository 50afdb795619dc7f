"""``SessionBus``: a wait wakes on a change, no change is missed between reading a version
and waiting on it, and the bus forgets a session once nobody waits on it."""

from __future__ import annotations

import asyncio

from airlock.services.bus import SessionBus, decode, encode

A, B = "a" * 32, "b" * 32


async def test_a_wait_wakes_on_a_publish_and_the_entry_goes_with_the_last_waiter() -> None:
    bus = SessionBus()
    seen = bus.version(A)
    assert len(bus) == 0  # asking for a version records nothing
    waiters = [asyncio.create_task(bus.wait(A, seen, 5), name=f"wait-{i}") for i in range(3)]
    await asyncio.sleep(0)  # one loop turn: each wait registers at its first step
    assert len(bus) == 1
    await bus.publish(A)
    versions = await asyncio.gather(*waiters)
    assert all(v != seen for v in versions)
    assert len(bus) == 0


async def test_a_change_between_version_and_wait_is_not_missed() -> None:
    bus = SessionBus()
    seen = bus.version(A)
    await bus.publish(A)  # nobody waits yet
    moved = await asyncio.wait_for(bus.wait(A, seen, 5), 1)
    assert moved != seen
    # And a change seen by another waiter who has left is not lost either.
    seen = bus.version(A)
    other = asyncio.create_task(bus.wait(A, seen, 5), name="other")
    await asyncio.sleep(0)  # one loop turn: each wait registers at its first step
    assert len(bus) == 1
    await bus.publish(A)
    await other
    assert len(bus) == 0
    assert await asyncio.wait_for(bus.wait(A, seen, 5), 1) != seen


async def test_no_change_times_out_and_leaves_nothing() -> None:
    bus = SessionBus()
    seen = bus.version(A)
    await bus.publish(B)
    await bus.wait(B, bus.version(B), 0.01)  # B's own wait: a clean start
    seen = bus.version(A)
    assert await bus.wait(A, seen, 0.05) == seen
    assert len(bus) == 0


async def test_many_made_up_ids_leave_the_bus_empty() -> None:
    bus = SessionBus()
    for i in range(200):
        sid = f"{i:032x}"
        await bus.wait(sid, bus.version(sid), 0)
    assert len(bus) == 0


async def test_a_publish_wakes_the_waiters_of_its_session_only() -> None:
    bus = SessionBus()
    on_a = [asyncio.create_task(bus.wait(A, bus.version(A), 5)) for _ in range(2)]
    on_b = asyncio.create_task(bus.wait(B, bus.version(B), 5))
    await asyncio.sleep(0)  # one loop turn: each wait registers at its first step
    await bus.publish(A)
    await asyncio.gather(*on_a)
    await asyncio.sleep(0)
    assert bus.wakes == 2 and not on_b.done()
    bus.wake_all()  # after a reconnect: everyone, once
    await on_b
    assert bus.wakes == 3 and len(bus) == 0


async def test_peers_payloads_wake_and_our_own_echo_does_not() -> None:
    ours, peer = SessionBus(), SessionBus()
    sent: list[str] = []
    ours.attach(sent.append)
    await ours.publish(A, B)
    [payload] = sent
    waiter = asyncio.create_task(peer.wait(A, peer.version(A), 5))
    mine = asyncio.create_task(ours.wait(A, ours.version(A), 0.05))
    await asyncio.sleep(0)
    ours.receive(payload)  # the echo of our own NOTIFY: we woke our waiters already
    peer.receive(payload)
    await waiter
    assert await mine == ours.version(A) and ours.wakes == 0 and peer.wakes == 1
    for junk in ("", "origin-only", "x " + "y" * 100):
        peer.receive(junk)  # ignored, and nothing breaks
    assert peer.heard == 4


def test_many_ids_are_split_over_payloads_postgresql_accepts() -> None:
    ids = [f"{i:032x}" for i in range(450)]
    payloads = encode("abc", ids)
    assert len(payloads) == 3 and all(len(p.encode()) < 8000 for p in payloads)
    decoded = [decode(p) for p in payloads]
    assert [i for d in decoded if d for i in d[1]] == ids


async def test_a_subscription_keeps_its_entry_between_waits() -> None:
    """A stream's heartbeat wait that times out must not make its next wait wake for
    another session's change (which a wait that left the bus cannot rule out)."""
    bus = SessionBus()
    with bus.subscribe(A, bus.version(A)) as sub:
        assert not await sub.changed(0.01)  # a heartbeat: nothing changed
        other = asyncio.create_task(bus.wait(B, bus.version(B), 5))
        await asyncio.sleep(0)
        await bus.publish(B)
        await other  # B's waiter left: its version is folded into the unwatched mark
        assert not await sub.changed(0.01)  # still nothing for A: no needless re-read
        await bus.publish(A)
        assert await sub.changed(5)
        assert len(bus) == 1
    assert len(bus) == 0
