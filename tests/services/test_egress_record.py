"""What the egress proxies decide, counted per session and host in a real database (SQLite
and PostgreSQL): one row and one timeline event per denied host however many connections,
noise counted without an event, the metric's labels bounded, learn mode's suggestion.
Connections come from the VM's side: a client on the proxy's Unix socket."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from airlock.clock import Clock
from airlock.domain.egress_policy import EgressPolicy, HostRule, rules
from airlock.metrics import Metrics
from airlock.services import egress as egress_service
from airlock.services.bus import SessionBus
from airlock.services.egress import EgressManager, suggest
from airlock.store.db import Database

SESSION = "a" * 32


@pytest.fixture
async def db(db_url: str) -> AsyncIterator[Database]:
    database = Database(db_url)
    await database.migrate()
    yield database
    await database.close()


async def ask(sock: Path, host: str, port: int = 443) -> bytes:
    reader, writer = await asyncio.open_unix_connection(sock)
    writer.write(f"CONNECT {host}:{port} HTTP/1.1\r\n\r\n".encode())
    async with asyncio.timeout(10):
        answer = await reader.read()
    writer.close()
    return answer


def manager(
    db: Database,
    policy: EgressPolicy,
    *,
    bus: SessionBus | None = None,
    metrics: Metrics | None = None,
) -> EgressManager:
    return EgressManager(
        policies={policy.provider: policy},
        db=db,
        clock=Clock(),
        metrics=metrics if metrics is not None else Metrics(),
        # Not ``bus or SessionBus()``: a bus nobody waits on has len() 0, so it is falsy.
        bus=bus if bus is not None else SessionBus(),
        flush_interval=60,  # only the first sight of a host and explicit flushes write
    )


async def test_one_row_and_one_event_per_denied_host(db: Database, tmp_path: Path) -> None:
    bus = SessionBus()
    metrics = Metrics()
    egress = manager(
        db, EgressPolicy("codex", allow=rules("chatgpt.com")), bus=bus, metrics=metrics
    )
    sock = tmp_path / "egress.sock"
    await egress.start("vm-1", sock, "codex", session_id=SESSION)
    try:
        seen = bus.version(SESSION)
        for _ in range(50):
            assert (await ask(sock, "cdn.example")).startswith(b"HTTP/1.1 403")
        for _ in range(3):
            await ask(sock, "fonts.example")
        for _ in range(5):
            await ask(sock, "update.googleapis.com")  # the browser's own noise
        rows = {(r.host, r.decision): r.count for r in await egress.hosts(SESSION)}
        assert rows == {
            ("cdn.example", "denied"): 50,
            ("fonts.example", "denied"): 3,
            ("update.googleapis.com", "noise"): 5,
        }
        assert bus.version(SESSION) > seen  # the viewer's stream was woken
        for _ in range(10):
            await ask(sock, "cdn.example")
        assert (await egress.blocked(SESSION)) == (63, ["cdn.example", "fonts.example"])
    finally:
        await egress.close()
    async with db.read() as repo:
        events = await repo.events_for_session(SESSION, [])
    assert [(e.kind, e.cause, e.detail["host"]) for e in events] == [
        ("egress", "denied", "cdn.example"),
        ("egress", "denied", "fonts.example"),
    ]
    value = metrics.registry.get_sample_value(
        "airlock_egress_denials_total",
        {"provider": "codex", "kind": "denied", "domain": "cdn.example"},
    )
    assert value == 60
    noise = metrics.registry.get_sample_value(
        "airlock_egress_denials_total",
        {"provider": "codex", "kind": "noise", "domain": "googleapis.com"},
    )
    assert noise == 5


async def test_labels_and_rows_stay_bounded(
    db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A page that asks for ever new hosts grows neither the metric nor the table."""
    monkeypatch.setattr(egress_service, "MAX_METRIC_HOSTS", 5)
    monkeypatch.setattr(egress_service, "MAX_HOSTS_PER_SESSION", 8)
    metrics = Metrics()
    egress = manager(db, EgressPolicy("codex"), metrics=metrics)
    sock = tmp_path / "egress.sock"
    await egress.start("vm-1", sock, "codex", session_id=SESSION)
    try:
        for i in range(20):
            await ask(sock, f"h{i}.example{i}.com")
        rows = await egress.hosts(SESSION)
    finally:
        await egress.close()
    assert len(rows) == 9  # 8 hosts by name, the rest counted as one
    assert {r.host: r.count for r in rows}["(other)"] == 12
    domains = {
        s.labels["domain"]
        for m in metrics.registry.collect()
        if m.name == "airlock_egress_denials"
        for s in m.samples
        if s.name.endswith("_total")
    }
    assert len(domains) == 6 and "other" in domains


async def test_learn_mode_records_and_suggests(db: Database, tmp_path: Path) -> None:
    policy = EgressPolicy(
        "oauth2",
        required=(HostRule("idp.example"),),
        learn=True,
        targets=((HostRule("*.example", 443), ("127.0.0.1", 9)),),  # nothing listens: 502
    )
    egress = manager(db, policy)
    sock = tmp_path / "egress.sock"
    await egress.start("vm-1", sock, "oauth2", session_id=SESSION)
    try:
        for host in ("idp.example", "static.example", "static.example", "fonts.gstatic.com"):
            answer = await ask(sock, host)
            assert not answer.startswith(b"HTTP/1.1 403"), (host, answer)
        assert (await ask(sock, "10.0.0.1")).startswith(b"HTTP/1.1 403")  # never learned
        report = {(r.host, r.decision): r.count for r in await egress.hosts(SESSION)}
    finally:
        await egress.close()
    assert report == {
        ("idp.example", "allowed"): 1,
        ("static.example", "learned"): 2,
        ("fonts.gstatic.com", "learned"): 1,
        ("10.0.0.1", "denied"): 1,
    }
    text = await suggest(db, policy)
    assert text.splitlines()[-1] == "AIRLOCK_EGRESS_OAUTH2_POLICY=static.example,@google"
    assert "# always allowed: idp.example" in text
