"""Each route does what http-api.md says: shapes, state changes, SSE, credentials,
timeline, providers, VMs, and the operations endpoints."""

from __future__ import annotations

import asyncio
import json
import re
import secrets
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from airlock.api import sse
from airlock.api.deps import ViewerSigner
from airlock.domain.sessions import SessionStatus
from airlock.domain.vms import VmRole, VmState
from airlock.store.tables import AuthSession, Credential
from tests.api.conftest import BASE_URL, Api, ApiFactory
from tests.api.live import read_sse
from tests.lifecycle_helpers import wait_for

ISO_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
SESSION_KEYS = {
    "sessionId",
    "userId",
    "provider",
    "status",
    "failureReason",
    "createdAt",
    "updatedAt",
    "completedAt",
    "novncURL",
    "eventsURL",
    "vm",
    "credentials",
}
VM_KEYS = {
    "vmId",
    "role",
    "runtime",
    "state",
    "createdAt",
    "destroyAfter",
    "destroyedAt",
    "destroyReason",
    "node",
}
SECRET = "access-token-that-must-not-leak-5b1e"


def assert_times(obj: dict[str, Any], *keys: str) -> None:
    for key in keys:
        value = obj[key]
        assert value is None or ISO_Z.match(value), (key, value)


def assert_session_shape(body: dict[str, Any]) -> None:
    assert set(body) == SESSION_KEYS
    assert_times(body, "createdAt", "updatedAt", "completedAt")
    assert set(body["vm"]) == VM_KEYS
    assert_times(body["vm"], "createdAt", "destroyAfter", "destroyedAt")
    assert set(body["credentials"]) == {"captured", "capturedAt", "injected"}
    assert_times(body["credentials"], "capturedAt")


async def add_credential(api: Api, session: AuthSession, *, injected: bool = False) -> None:
    assert api.core.vault is not None
    plaintext = json.dumps({"provider": "oauth2", "accessToken": SECRET}).encode()
    sealed = api.core.vault.seal(plaintext, context=f"{session.id}:oauth2")
    now = api.core.clock.now()
    async with api.core.db.transaction() as repo:
        repo.add_credential(
            Credential(
                id=secrets.token_hex(8),
                session_id=session.id,
                user_id=session.user_id,
                provider="oauth2",
                key_id=sealed.key_id,
                nonce=sealed.nonce,
                ciphertext=sealed.ciphertext,
                account={"id": "u-1", "email": "alice@example.test", "organization": None},
                scopes=["openid", "profile"],
                plan=None,
                expires_at=now + timedelta(hours=1),
                captured_at=now,
                injected_vm_id="vm-cli1" if injected else None,
                injected_at=now if injected else None,
                injected_verified=True if injected else None,
            )
        )


# --- the session object -------------------------------------------------------------------
async def test_session_object_has_every_key_of_the_contract(api: Api) -> None:
    session, vm = await api.add_session("alice")
    r = await api.client.get(f"/api/auth/session/{session.id}", headers=api.auth("alice"))
    assert r.status_code == 200
    body = r.json()
    assert_session_shape(body)
    assert body["sessionId"] == session.id
    assert (body["userId"], body["provider"], body["status"]) == (
        "alice",
        "oauth2",
        "awaiting_user",
    )
    assert body["vm"]["vmId"] == vm.id and body["vm"]["role"] == "browser"
    assert body["eventsURL"] == f"{BASE_URL}/api/auth/session/{session.id}/events"
    assert body["credentials"] == {"captured": False, "capturedAt": None, "injected": None}


async def test_novnc_url_carries_a_viewer_token_while_viewable(api: Api) -> None:
    session, vm = await api.add_session("alice")
    body = (
        await api.client.get(f"/api/auth/session/{session.id}", headers=api.auth("alice"))
    ).json()
    url = urlsplit(body["novncURL"])
    assert f"{url.scheme}://{url.netloc}{url.path}" == (
        f"{BASE_URL}/api/auth/session/{session.id}/novnc"
    )
    [token] = parse_qs(url.query)["token"]
    signer = api.app.state.viewer_signer
    assert isinstance(signer, ViewerSigner)
    claims = signer.verify(token, session.id, vm.id, now=datetime.now(UTC))
    assert (claims.session_id, claims.vm_id, claims.view_only) == (session.id, vm.id, False)
    # The rest of the token rules: tests/api/test_viewer_tokens.py.


@pytest.mark.parametrize(
    ("state", "viewable"),
    [
        (VmState.CREATING, True),
        (VmState.RUNNING, True),
        (VmState.DRAINING, True),
        (VmState.RETAINED, False),
        (VmState.DESTROYING, False),
        (VmState.DESTROYED, False),
        (VmState.LOST, False),
    ],
)
async def test_novnc_url_only_while_the_vm_can_be_viewed(
    api: Api, state: VmState, viewable: bool
) -> None:
    status = SessionStatus.AWAITING_USER if state is VmState.RUNNING else SessionStatus.COMPLETED
    session, _ = await api.add_session("alice", status=status, vm_state=state)
    body = (
        await api.client.get(f"/api/auth/session/{session.id}", headers=api.auth("alice"))
    ).json()
    assert (body["novncURL"] is not None) is viewable
    assert_session_shape(body)


async def test_start_answers_201_initializing_then_the_failure_is_recorded(api: Api) -> None:
    r = await api.client.post(
        "/api/auth/start", json={"provider": "oauth2"}, headers=api.auth("alice")
    )
    assert r.status_code == 201, r.text
    body = r.json()
    assert_session_shape(body)
    assert body["status"] == "initializing"
    assert body["vm"]["state"] == "creating"
    assert body["vm"]["destroyAfter"] is not None  # the login deadline, from the start

    # NoVmRuntime cannot boot: the record says so, with a reason a person can act on.
    async def failed_already() -> bool:
        got = await api.client.get(
            f"/api/auth/session/{body['sessionId']}", headers=api.auth("alice")
        )
        return bool(got.json()["status"] == "failed")

    await wait_for(failed_already, timeout=4, interval=0.02)
    got = await api.client.get(f"/api/auth/session/{body['sessionId']}", headers=api.auth("alice"))
    failed = got.json()
    assert failed["status"] == "failed"
    assert failed["failureReason"].startswith("vm_boot_failed")
    assert failed["vm"]["vmId"] == body["vm"]["vmId"]


async def test_list_sessions_newest_first_with_status_filter(api: Api) -> None:
    now = api.core.clock.now()
    old, _ = await api.add_session("alice", created=now - timedelta(minutes=5))
    new, _ = await api.add_session(
        "alice", status=SessionStatus.FAILED, vm_state=VmState.DESTROYED, created=now
    )
    r = await api.client.get("/api/auth/sessions", headers=api.auth("alice"))
    assert [s["sessionId"] for s in r.json()] == [new.id, old.id]
    for s in r.json():
        assert_session_shape(s)
    r = await api.client.get(
        "/api/auth/sessions", params={"status": "failed"}, headers=api.auth("alice")
    )
    assert [s["sessionId"] for s in r.json()] == [new.id]
    r = await api.client.get("/api/auth/sessions", params={"limit": 1}, headers=api.auth("alice"))
    assert [s["sessionId"] for s in r.json()] == [new.id]


async def test_keepalive_extends_the_deadline(api: Api) -> None:
    session, vm = await api.add_session("alice", destroy_after=timedelta(seconds=10))
    assert vm.destroy_after is not None
    r = await api.client.post(
        f"/api/auth/session/{session.id}/keepalive", headers=api.auth("alice")
    )
    assert r.status_code == 200
    assert set(r.json()) == {"destroyAfter"}
    assert_times(r.json(), "destroyAfter")
    _, fresh = await api.core.sessions.get(session.id, None)
    assert fresh is not None and fresh.destroy_after is not None
    assert fresh.destroy_after > vm.destroy_after  # idle extension (2 min) beyond 10 s
    assert r.json()["destroyAfter"].startswith(fresh.destroy_after.strftime("%Y-%m-%dT%H:%M:%S"))


async def test_keepalive_on_a_destroyed_vm_answers_null(api: Api) -> None:
    session, _ = await api.add_session(
        "alice", status=SessionStatus.COMPLETED, vm_state=VmState.DESTROYED, destroy_after=None
    )
    r = await api.client.post(
        f"/api/auth/session/{session.id}/keepalive", headers=api.auth("alice")
    )
    assert r.status_code == 200
    assert r.json() == {"destroyAfter": None}


async def test_complete_destroys_the_vm_and_is_idempotent(api: Api) -> None:
    session, vm = await api.add_session(
        "alice", status=SessionStatus.COMPLETED, vm_state=VmState.DRAINING
    )
    for _ in range(2):
        r = await api.client.post(
            f"/api/auth/session/{session.id}/complete", headers=api.auth("alice")
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert set(body) == {"success", "session"}
        assert body["success"] is True
        assert_session_shape(body["session"])
        assert body["session"]["status"] == "completed"
        assert body["session"]["vm"]["state"] == "destroyed"
        assert body["session"]["vm"]["destroyReason"] == "completed"
        assert body["session"]["novncURL"] is None
    assert api.runtime.destroyed == [vm.id]  # once


async def test_delete_cancels_and_destroys_and_is_idempotent(api: Api) -> None:
    session, vm = await api.add_session("alice")
    for _ in range(2):
        r = await api.client.delete(f"/api/auth/session/{session.id}", headers=api.auth("alice"))
        assert r.status_code == 200, r.text
        assert_session_shape(r.json())
        assert r.json()["status"] == "cancelled"
        assert r.json()["vm"]["state"] == "destroyed"
    assert api.runtime.destroyed == [vm.id]


# --- SSE ----------------------------------------------------------------------------------
def parse_sse(text: str) -> tuple[list[dict[str, Any]], int]:
    """The ``session`` events' data, and how many comment lines (heartbeats) came."""
    events, comments = [], 0
    for block in text.split("\n\n"):
        if not block:
            continue
        if block.startswith(":"):
            comments += 1
            continue
        lines = dict(line.split(": ", 1) for line in block.split("\n"))
        assert lines["event"] == "session"
        events.append(json.loads(lines["data"]))
    return events, comments


async def test_events_of_a_finished_session_send_the_state_and_close(api: Api) -> None:
    session, _ = await api.add_session(
        "alice", status=SessionStatus.COMPLETED, vm_state=VmState.DESTROYED
    )
    r = await asyncio.wait_for(
        api.client.get(f"/api/auth/session/{session.id}/events", headers=api.auth("alice")), 10
    )
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    [event], _ = parse_sse(r.text)
    assert_session_shape(event)
    assert event["vm"]["state"] == "destroyed"


async def _move_vm(api: Api, vm_id: str, frm: VmState, to: VmState, publish: str | None) -> None:
    now = api.core.clock.now()
    extra: dict[str, Any] = {"destroyed_at": now} if to.terminal else {}
    async with api.core.db.transaction() as repo:
        assert await repo.move_vm(vm_id, [frm], to, updated_at=now, **extra)
    if publish is not None:
        await api.core.bus.publish(publish)


async def test_events_follow_changes_until_the_vm_is_gone(make_api: ApiFactory) -> None:
    api = await make_api(events_resync_ms=200)  # the safety net's re-read, made short
    session, vm = await api.add_session("alice")

    async def change(line: str, _lines: list[str]) -> None:
        # Each change once the stream has sent the state before it.
        if line.startswith("data: ") and '"running"' in line:
            await _move_vm(api, vm.id, VmState.RUNNING, VmState.DRAINING, publish=session.id)
        elif line.startswith("data: ") and '"draining"' in line:
            # No publish: as if a process that announces nothing (the CLI on SQLite)
            # made the change; the safety net's re-read finds it.
            await _move_vm(api, vm.id, VmState.DRAINING, VmState.DESTROYED, publish=None)

    path = f"/api/auth/session/{session.id}/events"
    events, _ = parse_sse(await read_sse(api.app, path, change, headers=api.auth("alice")))
    states = [e["vm"]["state"] for e in events]
    assert states == ["running", "draining", "destroyed"]
    assert events[-1]["novncURL"] is None


async def test_events_send_heartbeats(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    """Over a real socket, read as it comes: two heartbeats, then the change, then the end.
    (It used to wait half a second and count what came: one heartbeat on a loaded host.)"""
    monkeypatch.setattr(sse, "SSE_HEARTBEAT_S", 0.1)
    session, vm = await api.add_session("alice")

    async def after_two_heartbeats(line: str, lines: list[str]) -> None:
        if line == ": keepalive" and lines.count(": keepalive") == 2:
            await _move_vm(api, vm.id, VmState.RUNNING, VmState.LOST, publish=session.id)

    path = f"/api/auth/session/{session.id}/events"
    text = await read_sse(api.app, path, after_two_heartbeats, headers=api.auth("alice"))
    events, heartbeats = parse_sse(text)
    assert [e["vm"]["state"] for e in events] == ["running", "lost"]  # nothing repeated
    assert heartbeats >= 2


# --- credentials and timeline -------------------------------------------------------------
async def test_credentials_404_until_captured(api: Api) -> None:
    session, _ = await api.add_session("alice")
    r = await api.client.get(
        f"/api/auth/session/{session.id}/credentials", headers=api.auth("alice")
    )
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "credentials_not_found"


async def test_credentials_metadata_never_the_secret(api: Api) -> None:
    session, _ = await api.add_session(
        "alice", status=SessionStatus.COMPLETED, vm_state=VmState.DRAINING
    )
    await add_credential(api, session, injected=True)
    r = await api.client.get(
        f"/api/auth/session/{session.id}/credentials", headers=api.auth("alice")
    )
    assert r.status_code == 200
    body = r.json()
    assert SECRET not in r.text
    assert body["provider"] == "oauth2"
    assert body["account"]["email"] == "alice@example.test"
    assert body["scopes"] == ["openid", "profile"]
    assert body["secret"] is None
    assert body["injected"]["vmId"] == "vm-cli1" and body["injected"]["verified"] is True
    assert_times(body, "expiresAt", "capturedAt")
    # the session object says the same
    s = (await api.client.get(f"/api/auth/session/{session.id}", headers=api.auth("alice"))).json()
    assert s["credentials"]["captured"] is True
    assert s["credentials"]["injected"] == body["injected"]
    # a user token never gets values, whatever the setting
    r = await api.client.get(
        f"/api/auth/session/{session.id}/credentials",
        params={"secrets": "true"},
        headers=api.auth("alice"),
    )
    assert r.status_code == 403
    assert SECRET not in r.text


async def test_secret_export_is_off_by_default(api: Api) -> None:
    session, _ = await api.add_session("alice", status=SessionStatus.COMPLETED)
    await add_credential(api, session)
    r = await api.client.get(
        f"/api/auth/session/{session.id}/credentials",
        params={"secrets": "true"},
        headers=api.auth("service"),
    )
    assert r.status_code == 403
    assert r.json()["error"]["code"] == "credential_export_disabled"
    assert SECRET not in r.text


async def test_secret_export_to_service_tokens_is_recorded(make_api: Any) -> None:
    api: Api = await make_api(credential_export=True)
    session, _ = await api.add_session("alice", status=SessionStatus.COMPLETED)
    await add_credential(api, session)
    r = await api.client.get(
        f"/api/auth/session/{session.id}/credentials",
        params={"secrets": "true"},
        headers=api.auth("service"),
    )
    assert r.status_code == 200, r.text
    assert r.json()["secret"]["accessToken"] == SECRET
    timeline = (
        await api.client.get(f"/api/auth/session/{session.id}/timeline", headers=api.auth("alice"))
    ).json()
    reads = [e for e in timeline if e["cause"] == "secret_read"]
    assert reads == [
        {
            "at": reads[0]["at"],
            "kind": "credential",
            "from": None,
            "to": None,
            "cause": "secret_read",
            "actor": "service:web-backend",
        }
    ]
    # user tokens still get none
    r = await api.client.get(
        f"/api/auth/session/{session.id}/credentials",
        params={"secrets": "true"},
        headers=api.auth("alice"),
    )
    assert r.status_code == 403


async def test_timeline_lists_transitions(api: Api) -> None:
    session, _ = await api.add_session("alice")
    await api.client.delete(f"/api/auth/session/{session.id}", headers=api.auth("alice"))
    r = await api.client.get(f"/api/auth/session/{session.id}/timeline", headers=api.auth("alice"))
    assert r.status_code == 200
    entries = r.json()
    for e in entries:
        assert set(e) == {"at", "kind", "from", "to", "cause", "actor"}
        assert_times(e, "at")
    moves = [(e["kind"], e["from"], e["to"]) for e in entries]
    assert ("session", "awaiting_user", "cancelled") in moves
    assert ("vm", "running", "destroying") in moves
    assert ("vm", "destroying", "destroyed") in moves
    assert all(e["actor"] for e in entries)


# --- providers and VMs --------------------------------------------------------------------
async def test_providers(api: Api) -> None:
    r = await api.client.get("/api/providers", headers=api.auth("alice"))
    assert r.status_code == 200
    assert r.json() == [{"id": "oauth2", "name": "OAuth 2.0", "available": True}]


async def test_vms_list_filters_and_tombstones(api: Api) -> None:
    cli = await api.add_vm("alice")
    gone = await api.add_vm("alice", role=VmRole.BROWSER, state=VmState.DESTROYED)
    r = await api.client.get("/api/vms", headers=api.auth("alice"))
    assert {v["vmId"] for v in r.json()} == {cli.id, gone.id}
    for v in r.json():
        assert set(v) == VM_KEYS | {"userId", "lastError"}
        assert_times(v, "createdAt", "destroyAfter", "destroyedAt")
    r = await api.client.get("/api/vms", params={"role": "cli"}, headers=api.auth("alice"))
    assert [v["vmId"] for v in r.json()] == [cli.id]
    r = await api.client.get("/api/vms", params={"state": "destroyed"}, headers=api.auth("alice"))
    assert [v["vmId"] for v in r.json()] == [gone.id]
    r = await api.client.get(f"/api/vms/{gone.id}", headers=api.auth("alice"))
    assert r.status_code == 200
    assert r.json()["state"] == "destroyed"


async def test_delete_vm_is_idempotent(api: Api) -> None:
    vm = await api.add_vm("alice")
    for _ in range(2):
        r = await api.client.delete(f"/api/vms/{vm.id}", headers=api.auth("alice"))
        assert r.status_code == 200, r.text
        assert r.json()["state"] == "destroyed"
        assert r.json()["destroyReason"] == "owner_delete"
    assert api.runtime.destroyed == [vm.id]


async def test_deleting_a_browser_vm_cancels_its_session(api: Api) -> None:
    session, vm = await api.add_session("alice")
    r = await api.client.delete(f"/api/vms/{vm.id}", headers=api.auth("alice"))
    assert r.status_code == 200
    s = (await api.client.get(f"/api/auth/session/{session.id}", headers=api.auth("alice"))).json()
    assert s["status"] == "cancelled"


# --- operations ---------------------------------------------------------------------------
LIFECYCLE_METRICS = [
    "airlock_vm_lifetime_seconds",
    "airlock_vm_boot_seconds",
    "airlock_session_ready_seconds",
    "airlock_completion_to_handoff_seconds",
    "airlock_destroy_lag_seconds",
    "airlock_premature_vm_destructions_total",
    "airlock_orphan_vms_reaped_total",
    "airlock_sessions_total",
    "airlock_vms",
]


async def test_metrics_expose_every_lifecycle_metric(api: Api) -> None:
    await api.add_session("alice")
    await api.add_vm("bob")
    r = await api.client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    for name in LIFECYCLE_METRICS:
        assert re.search(rf"^# TYPE {name} ", r.text, re.M), name
    assert 'airlock_vms{role="browser",state="running"} 1.0' in r.text
    assert 'airlock_vms{role="cli",state="running"} 1.0' in r.text
    assert 'airlock_vms{role="cli",state="destroyed"} 0.0' in r.text
    # the gauge follows the database at every scrape
    await api.client.delete(f"/api/vms/{(await api.add_vm('bob')).id}", headers=api.auth("bob"))
    r = await api.client.get("/metrics")
    assert 'airlock_vms{role="cli",state="destroyed"} 1.0' in r.text


async def test_health_and_readiness(api: Api) -> None:
    assert (await api.client.get("/healthz")).json() == {"status": "ok"}
    r = await api.client.get("/readyz")
    assert r.status_code == 200
    assert r.json() == {"status": "ready", "checks": {"database": "ok", "runtime": "ok"}}
    api.runtime.list_fails = True
    r = await api.client.get("/readyz")
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "not_ready"
    assert r.json()["checks"]["database"] == "ok"
    assert r.json()["checks"]["runtime"].startswith("failed")


EXPECTED_ROUTES = {
    ("GET", "/api/providers"),
    ("POST", "/api/auth/start"),
    ("GET", "/api/auth/sessions"),
    ("GET", "/api/auth/session/{sessionId}"),
    ("GET", "/api/auth/session/{sessionId}/events"),
    ("POST", "/api/auth/session/{sessionId}/keepalive"),
    ("POST", "/api/auth/session/{sessionId}/complete"),
    ("DELETE", "/api/auth/session/{sessionId}"),
    ("GET", "/api/auth/session/{sessionId}/credentials"),
    ("GET", "/api/auth/session/{sessionId}/timeline"),
    ("GET", "/api/auth/session/{sessionId}/egress"),
    ("POST", "/api/auth/session/{sessionId}/viewer-token"),
    ("GET", "/api/auth/session/{sessionId}/novnc"),
    ("GET", "/api/auth/session/{sessionId}/viewer/events"),
    ("POST", "/api/auth/session/{sessionId}/viewer/keepalive"),
    ("POST", "/api/auth/session/{sessionId}/viewer/complete"),
    ("POST", "/api/vms"),
    ("GET", "/api/vms"),
    ("GET", "/api/vms/{vmId}"),
    ("DELETE", "/api/vms/{vmId}"),
    ("POST", "/api/vms/{vmId}/credentials"),
    ("GET", "/api/nodes"),
    ("POST", "/internal/vms/{vmId}/destroy"),
    ("POST", "/internal/boots"),
    ("GET", "/api/credentials"),
    ("GET", "/api/credentials/events"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
}


async def test_openapi_lists_every_route(api: Api) -> None:
    r = await api.client.get("/openapi.json")
    assert r.status_code == 200
    listed = {(m.upper(), p) for p, ops in r.json()["paths"].items() for m in ops}
    assert listed == EXPECTED_ROUTES
    docs = await api.client.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()


# A count that keeps SQLite busy for a moment: a read a client can leave in the middle of.
SLOW_SQL = (
    "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 3000000) "
    "SELECT count(*) FROM c"
)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
async def test_a_stream_left_in_the_middle_of_a_read_lets_the_read_finish(api: Api) -> None:
    """A viewer closes the tab while its stream re-reads the session: the read runs to its
    end and gives its connection back to the pool. Cut inside a query instead, aiosqlite
    never closes the SQLite connection, and a task waits on it for ever (the orphan-task
    guard of every test reports it)."""
    from sqlalchemy import text

    session, _vm = await api.add_session("alice")
    r = await api.client.get(f"/api/auth/session/{session.id}", headers=api.auth("alice"))
    first = sse.schemas.SessionOut.model_validate(r.json())
    reading = asyncio.Event()

    async def slow_read() -> sse.schemas.SessionOut:
        async with api.core.db.read() as repo:
            reading.set()
            await repo.session.execute(text(SLOW_SQL))
        return first

    stream = sse.session_stream(
        api.core, session.id, version=api.core.bus.version(session.id), first=first, read=slow_read
    )

    async def watch() -> None:
        async for _text in stream:
            pass

    watcher = asyncio.create_task(watch())
    await wait_for(lambda: api.core.bus.parked() == 1, timeout=5, what="the stream waits")
    await api.core.bus.publish(session.id)
    await asyncio.wait_for(reading.wait(), 5)
    watcher.cancel()  # the client left, in the middle of the read
    await asyncio.sleep(0)
    watcher.cancel()  # a second cancel (the server closing the request) cuts the close too
    with pytest.raises(asyncio.CancelledError):
        await watcher
    pool = api.core.db.engine.pool
    await wait_for(lambda: pool.checkedout() == 0, timeout=10, what="the read's connection back")
